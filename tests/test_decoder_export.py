"""Decoder export with a KV cache: tokens and logits vs HF generate, both cache modes, genai."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_prompt

import attnopt
from attnopt.errors import ConfigError

VOCAB, PROMPT, NEW, PAD = 120, 12, 10, 3


def _tiny(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256,
                  attn_implementation="eager")
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    if arch == "mistral":  # the window is shorter than the prompt
        return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=6,
                                                      **common))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    if arch == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2, **common))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                n_positions=256, attn_implementation="eager"))
    if arch == "nanogpt":
        return NanoGPT()
    raise ValueError(arch)


class NanoAttention(torch.nn.Module):
    """nanoGPT's causal self-attention with a tensor KV cache and a key padding mask."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.c_attn = torch.nn.Linear(d, 3 * d)
        self.c_proj = torch.nn.Linear(d, d)
        self.heads = heads

    def forward(self, x, mask, past):
        b, s, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (t.view(b, s, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        t = k.shape[2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        i = torch.arange(s)[:, None] + (t - s)
        j = torch.arange(t)[None, :]
        keep = (j <= i)[None, None] & mask[:, None, None, :].bool()
        att = att.masked_fill(~keep, torch.finfo(att.dtype).min)
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, s, c)), (k, v)


class NanoGPT(torch.nn.Module):
    """A hand-written decoder: (ids, mask, positions, [(k, v)] or None) -> (logits, presents)."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, d)
        self.wpe = torch.nn.Embedding(256, d)
        self.ln = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(2 * layers + 1))
        self.attn = torch.nn.ModuleList(NanoAttention(d, heads) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
            for _ in range(layers))
        self.head = torch.nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None):
        x = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            a, kv = attn(self.ln[2 * i](x), attention_mask,
                         None if past_key_values is None else past_key_values[i])
            x = x + a
            x = x + mlp(self.ln[2 * i + 1](x))
            presents.append(kv)
        return self.head(self.ln[-1](x)), presents



def _reference(model, ids, mask, new: int = NEW):
    """HF generate (greedy) or, for the hand-written model, greedy by full recomputation."""
    if hasattr(model, "generate"):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return out.sequences, [lg.float() for lg in out.logits]
    from attnopt.export._decoder_capture import position_ids_for

    seq, m, logits = ids, mask, []
    with torch.no_grad():
        for _ in range(new):
            lg = model(seq, m, position_ids_for(m, seq.shape[1]), None)[0][:, -1]
            logits.append(lg)
            seq = torch.cat([seq, lg.argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
    return seq, logits


ARCHS = ["llama", "mistral", "qwen2", "phi3", "gpt2", "nanogpt"]


_EXPORTS: dict[str, tuple] = {}


def _export(arch: str, tmp_path_factory) -> tuple:
    """One onnxruntime-target export per architecture, shared by the tests of this module."""
    if arch not in _EXPORTS:
        torch.manual_seed(0)
        model = _tiny(arch).eval()
        ids, _ = left_padded_prompt(VOCAB, PROMPT, PAD)
        out = tmp_path_factory.mktemp(arch)
        _EXPORTS[arch] = (arch, model, attnopt.export_decoder(model, {"input_ids": ids}, out))
    return _EXPORTS[arch]


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
    return _export(request.param, tmp_path_factory)


def _rel(ref: torch.Tensor, out: np.ndarray) -> float:
    ref = ref.double().numpy()
    return float(np.abs(ref - out).max() / np.abs(ref).max())


@pytest.mark.parametrize("cache", ["shared", "growing"])
def test_greedy_tokens_and_logits_match_hf(exported, cache):
    """Batch 2 with left padding: same tokens as HF, logits within 1e-4 at every step."""
    arch, model, res = exported
    ids, mask = left_padded_prompt(VOCAB, PROMPT, PAD)
    ref_seq, ref_logits = _reference(model, ids, mask)
    gen = res.generate(ids, NEW, attention_mask=mask, cache=cache, keep_logits=True)
    assert gen.sequences.shape == tuple(ref_seq.shape)
    assert np.array_equal(gen.sequences, ref_seq.numpy()), (arch, gen.sequences, ref_seq)
    assert len(gen.logits) == NEW
    errs = [_rel(r, o) for r, o in zip(ref_logits, gen.logits)]
    assert max(errs) <= 1e-4, (arch, errs)


def test_directory_and_contract(exported):
    arch, model, res = exported
    names = set(res.files)
    assert {"model.onnx", "genai_config.json"} <= names
    if arch != "nanogpt":
        assert {"config.json", "generation_config.json"} <= names
    m = onnx.load(str(res.path), load_external_data=False)
    ins = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
           for v in m.graph.input}
    outs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in m.graph.output}
    L = res.layout
    assert ins["input_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["past_key_values.1.value"] == ["batch_size", L.kv_heads, "past_sequence_length",
                                              L.head_dim]
    assert outs["present.0.key"] == ["batch_size", L.kv_heads, "total_sequence_length",
                                     L.head_dim]
    assert outs["logits"] == ["batch_size", "sequence_length", VOCAB]
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == L.layers == 2
    window = {a.name: a.i for n in gqa for a in n.attribute}.get("local_window_size", -1)
    assert window == (6 if arch == "mistral" else -1)
    assert [s.applied_window for s in res.sites] == [6 if arch == "mistral" else 0] * 2


def test_onnx_target_standard_attention_with_past(tmp_path):
    """target='onnx': Attention-23 with past_key/past_value; the window goes into its mask."""
    torch.manual_seed(0)
    model = _tiny("mistral").eval()
    ids, mask = left_padded_prompt(VOCAB, PROMPT, PAD)
    res = attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / "m", target="onnx")
    m = onnx.load(str(res.path), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    assert "Attention" in ops and "GroupQueryAttention" not in ops
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    ref_seq, ref_logits = _reference(model, ids, mask)
    gen = res.generate(ids, NEW, attention_mask=mask, keep_logits=True)
    assert np.array_equal(gen.sequences, ref_seq.numpy())
    assert max(_rel(r, o) for r, o in zip(ref_logits, gen.logits)) <= 1e-4
    with pytest.raises(ConfigError, match="growing"):
        res.generate(ids, 2, cache="shared")


def test_sliding_window_variant_is_applied_and_reported(tmp_path):
    """SlidingWindow on a model without a window: applied in the graph, error measured."""
    torch.manual_seed(0)
    model = _tiny("nanogpt").eval()
    ids, mask = left_padded_prompt(VOCAB, PROMPT, PAD)
    cfg = attnopt.Config(variant=attnopt.SlidingWindow(window=4))
    res = attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / "w", config=cfg)
    assert [s.applied_window for s in res.sites] == [4, 4]
    assert [s.window for s in res.sites] == [0, 0]
    assert any("approximate" in n for n in res.notes)
    assert res.parity["shared"] > 1e-4  # a real approximation, and it is measured
    m = onnx.load(str(res.path), load_external_data=False)
    windows = [a.i for n in m.graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size"]
    assert windows == [4, 4]


def test_genai_runs_the_directory_with_the_same_tokens(tmp_path_factory):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed")
    _, model, res = _export("llama", tmp_path_factory)
    ids, _ = left_padded_prompt(VOCAB, PROMPT, PAD)
    prompt = ids[:1]
    ref, _ = _reference(model, prompt, torch.ones_like(prompt))
    gm = og.Model(str(res.out_dir))
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=PROMPT + NEW, do_sample=False)
    gen = og.Generator(gm, params)
    gen.append_tokens(prompt.numpy().astype(np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == ref[0, PROMPT:].tolist() and len(tokens) == NEW


def test_errors_are_typed(tmp_path):
    import transformers as tf

    ids, _ = left_padded_prompt(VOCAB, PROMPT, PAD)
    model = _tiny("llama").eval()
    with pytest.raises(ConfigError, match="target"):
        attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / "x", target="tensorrt")
    with pytest.raises(ConfigError, match="token ids"):
        attnopt.export_decoder(model, {"input_ids": ids.float()}, tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / "file")
    with pytest.raises(ConfigError, match="block_topk|BlockTopK"):
        attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / "x", config=attnopt.Config(
            variant=attnopt.BlockTopK(block=4, k=2)))
    bert = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ConfigError, match="cannot be called as a decoder"):
        attnopt.export_decoder(bert.eval(), {"input_ids": ids}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_64_greedy_tokens_match_hf(tmp_path):
    if not os.environ.get("ATTNOPT_SLOW_DECODER"):
        pytest.skip("SmolLM2 decode export takes ~2 min: set ATTNOPT_SLOW_DECODER=1")
    from attnopt.models import load_smollm2

    model, tok = load_smollm2()
    enc = tok(["The capital of France is", "Attention is computed from queries, keys and"],
              return_tensors="pt", padding=True, padding_side="left")
    res = attnopt.export_decoder(model, {"input_ids": enc.input_ids}, tmp_path / "s",
                                 tokenizer=tok)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=64, do_sample=False)
    for cache in res.cache_modes:
        gen = res.generate(enc.input_ids, 64, attention_mask=enc.attention_mask, cache=cache)
        assert np.array_equal(gen.sequences, ref.numpy()), cache
