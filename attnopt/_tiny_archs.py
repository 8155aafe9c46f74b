"""More tiny random-weight HF architectures for ``tiny:<arch>`` specs (see ``attnopt.models``).

Chosen for how differently their attention is written: ALiBi through ``baddbmm`` (BLOOM), MQA and
fused qkv (Falcon), partial rotary (GPT-NeoX, GPT-J), learned-position decoders (OPT), ALiBi
bias added to scores (MPT), fused qkv + GQA (Phi-3), q/k norms (Qwen3), logit soft-capping and
alternating sliding layers (Gemma-2/3), disentangled relative attention (DeBERTa-v2), window
attention with a shift mask (Swin) and cosine attention with a learned logit scale (Swin-v2),
spatial-reduction attention (SegFormer), positions added to q/k only (DETR), audio frames from
a conv feature extractor (Wav2Vec2), and the RoBERTa encoder family (XLM-RoBERTa).

Each builder returns ``(model, example inputs, attention sites the config implies)``.
"""

from __future__ import annotations

import torch

LAYERS = 2
HIDDEN = 64
HEADS = 4
VOCAB = 120


def _text(batch: int, seq: int, *, padding: bool) -> dict:
    ids = torch.randint(3, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding and batch > 1:
        mask[-1, -max(1, seq // 4):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _decoder(cls_name: str, cfg_name: str, attn: str, batch: int, seq: int, **cfg):
    import transformers

    config = getattr(transformers, cfg_name)(vocab_size=VOCAB, attn_implementation=attn, **cfg)
    model = getattr(transformers, cls_name)(config)
    return model, _text(batch, seq, padding=False), LAYERS


def bloom(attn, batch, seq):
    return _decoder("BloomForCausalLM", "BloomConfig", attn, batch, seq, hidden_size=HIDDEN,
                    n_layer=LAYERS, n_head=HEADS)


def falcon(attn, batch, seq):
    return _decoder("FalconForCausalLM", "FalconConfig", attn, batch, seq, hidden_size=HIDDEN,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, multi_query=True,
                    max_position_embeddings=4096)


def gpt_neox(attn, batch, seq):
    return _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", attn, batch, seq, hidden_size=HIDDEN,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=2 * HIDDEN, rotary_pct=0.25, max_position_embeddings=4096)


def gptj(attn, batch, seq):
    return _decoder("GPTJForCausalLM", "GPTJConfig", attn, batch, seq, n_embd=HIDDEN,
                    n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_positions=4096)


def opt(attn, batch, seq):
    return _decoder("OPTForCausalLM", "OPTConfig", attn, batch, seq, hidden_size=HIDDEN,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=2 * HIDDEN,
                    word_embed_proj_dim=HIDDEN, max_position_embeddings=4096)


def mpt(attn, batch, seq):
    return _decoder("MptForCausalLM", "MptConfig", attn, batch, seq, d_model=HIDDEN,
                    n_heads=HEADS, n_layers=LAYERS, max_seq_len=4096)


def phi3(attn, batch, seq):
    return _decoder("Phi3ForCausalLM", "Phi3Config", attn, batch, seq, hidden_size=HIDDEN,
                    intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, pad_token_id=0,
                    max_position_embeddings=4096)


def qwen2(attn, batch, seq):
    return _decoder("Qwen2ForCausalLM", "Qwen2Config", attn, batch, seq, hidden_size=HIDDEN,
                    intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2,
                    max_position_embeddings=4096)


def qwen3(attn, batch, seq):
    return _decoder("Qwen3ForCausalLM", "Qwen3Config", attn, batch, seq, hidden_size=HIDDEN,
                    intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=4096)


def gemma2(attn, batch, seq):
    # Layer 0 slides over a window shorter than the example, layer 1 is global; both soft-cap.
    return _decoder("Gemma2ForCausalLM", "Gemma2Config", attn, batch, seq, hidden_size=HIDDEN,
                    intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16,
                    sliding_window=max(4, seq // 2), max_position_embeddings=4096)


def gemma3(attn, batch, seq):
    return _decoder("Gemma3ForCausalLM", "Gemma3TextConfig", attn, batch, seq,
                    hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16,
                    sliding_window=max(4, seq // 2), max_position_embeddings=4096,
                    layer_types=["sliding_attention", "full_attention"])


def deberta_v2(attn, batch, seq):
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                          relative_attention=True, position_buckets=16, max_relative_positions=64,
                          pos_att_type=["p2c", "c2p"], attn_implementation=attn)
    return DebertaV2Model(cfg), _text(batch, seq, padding=True), LAYERS


def xlm_roberta(attn, batch, seq):
    from transformers import XLMRobertaConfig, XLMRobertaModel

    cfg = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                           max_position_embeddings=4096, attn_implementation=attn)
    return XLMRobertaModel(cfg), _text(batch, seq, padding=True), LAYERS


def _image(batch: int, size: int = 32) -> dict:
    return {"pixel_values": torch.randn(batch, 3, size, size)}


def swin(attn, batch, seq):
    from transformers import SwinConfig, SwinModel

    # 32 px, patch 2: a 16x16 token grid in windows of 4x4; block 1 shifts its windows (the
    # shift mask). One stage: a patch merging makes the guards of a dynamic image size explode.
    cfg = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                     window_size=4, attn_implementation=attn)
    return SwinModel(cfg), _image(batch), 2


def swinv2(attn, batch, seq):
    from transformers import Swinv2Config, Swinv2Model

    cfg = Swinv2Config(image_size=32, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                       window_size=4, attn_implementation=attn)
    return Swinv2Model(cfg), _image(batch), 2


def segformer(attn, batch, seq):
    from transformers import SegformerConfig, SegformerModel

    # Stage 1 reduces keys 2x2 (spatial-reduction attention), stage 2 attends densely.
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                          hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                          num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                          attn_implementation=attn)
    return SegformerModel(cfg), _image(batch), 2


def detr(attn, batch, seq):
    from transformers import DetrConfig, DetrModel, ResNetConfig

    # A tiny ResNet from transformers itself (no timm, no weights): 64 px → a 4x4 feature map.
    # The ResNet has no attention; only the transformer takes ``attn``.
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])
    cfg = DetrConfig(backbone_config=backbone, use_timm_backbone=False,
                     use_pretrained_backbone=False, d_model=HIDDEN, encoder_layers=1,
                     decoder_layers=1, encoder_attention_heads=HEADS,
                     decoder_attention_heads=HEADS, encoder_ffn_dim=2 * HIDDEN,
                     decoder_ffn_dim=2 * HIDDEN, num_queries=10,
                     attn_implementation={"": attn, "backbone_config": "eager"})
    inputs = _image(batch, 64)
    inputs["pixel_mask"] = torch.ones(batch, 64, 64, dtype=torch.long)
    return DetrModel(cfg), inputs, 3


def wav2vec2(attn, batch, seq):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=2 * HIDDEN, conv_dim=(16, 16), conv_stride=(5, 2),
                         conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=4, attn_implementation=attn)
    return Wav2Vec2Model(cfg), {"input_values": torch.randn(batch, 40 * seq)}, LAYERS


#: builder per architecture name, and the attention implementations the model offers
BUILDERS = {
    "bloom": bloom, "falcon": falcon, "gpt_neox": gpt_neox, "gptj": gptj, "opt": opt, "mpt": mpt,
    "phi3": phi3, "qwen2": qwen2, "qwen3": qwen3, "gemma2": gemma2, "gemma3": gemma3,
    "deberta_v2": deberta_v2, "xlm_roberta": xlm_roberta, "swin": swin, "swinv2": swinv2,
    "segformer": segformer, "detr": detr, "wav2vec2": wav2vec2,
}
EAGER_ONLY = frozenset({"bloom", "gptj", "mpt", "gemma2", "deberta_v2", "swinv2"})
