"""Causal Linear in decoder export: a recurrent state (S, z) instead of a KV cache. The op equals
the whole-sequence Linear reference chunk by chunk, the exported file's greedy tokens and logits
equal the whole-sequence Linear-optimized model's (both targets, MHA and GQA, left padding), the
state keeps its shape, and the maps a state cannot carry are refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import left_padded_prompt, whole_sequence_logits

import attnopt
from attnopt.errors import ConfigError, VariantNotApplicableError
from attnopt.export._linear_state import (
    empty_state,
    linear_state_attention,
    reference_linear_state,
    state_features,
)
from attnopt.variants._feature_maps import MapParams
from attnopt.variants.linear import reference_quadratic

VOCAB, PROMPT, NEW, PAD = 120, 12, 20, 3
HEAD_DIM = 16


def _llama(kv_heads: int):
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        attn_implementation="eager")).eval()


# -- (1) the op --------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map", ["elu", "relu", "taylor"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)], ids=["GQA4-2", "MHA2"])
def test_chunked_state_equals_whole_sequence_linear(feature_map, heads, kv_heads):
    """Prefill of 9 tokens (4 left-padded in row 1) then 6 decode steps == causal Linear over
    the 15 tokens (``reference_quadratic``, fp64), and == the token-by-token recurrence."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    n, prefill, scale = 15, 9, 0.3
    q = torch.randn(2, heads, n, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, n, 8, generator=g) for _ in range(2))
    mask = torch.ones(2, n, dtype=torch.int64)
    mask[1, :4] = 0
    ref = reference_quadratic(q, k, v, mask.bool()[:, None, None, :],
                              MapParams(feature_map, scale), is_causal=True)
    s, z = empty_state(2, kv_heads, state_features(feature_map, 8), 8)
    outs = []
    for a, b in [(0, prefill), *((t, t + 1) for t in range(prefill, n))]:
        out, s, z = linear_state_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], s, z,
                                           mask[:, :b], scale, feature_map)
        assert s.shape == (2, kv_heads, state_features(feature_map, 8), 8)
        assert z.shape == (2, kv_heads, state_features(feature_map, 8), 1)
        outs.append(out)
    out = torch.cat(outs, 2)
    assert (out.double() - ref).abs().max() < 1e-5
    rec, rs, rz = reference_linear_state(q, k, v, *empty_state(2, kv_heads, s.shape[2], 8), mask,
                                         scale, feature_map)
    assert (rec - ref).abs().max() < 1e-9
    assert (rs - s.double()).abs().max() < 1e-4 * rs.abs().max()
    assert (rz - z.double()).abs().max() < 1e-4 * rz.abs().max()


def test_padded_keys_do_not_enter_the_state():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :3] = 0
    s0, z0 = empty_state(2, 2, 8, 8)
    out, s, z = linear_state_attention(q, k, v, s0, z0, mask, 0.3, "elu")
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :3], v2[1, :, :3] = 50.0, -50.0  # garbage under the padding
    out2, s2, z2 = linear_state_attention(q, k2, v2, s0, z0, mask, 0.3, "elu")
    assert torch.equal(s, s2) and torch.equal(z, z2)
    assert torch.equal(out[1, :, 3:], out2[1, :, 3:])
    assert not torch.equal(s[0], s2[0] * 0)  # the valid keys did enter


# -- (2, 3) export, parity with the whole-sequence Linear model -------------------------------


def _whole_sequence(model):
    """The whole-sequence ``Linear("elu")``-optimized model: ``sequences -> [B, T, V]`` logits."""
    return whole_sequence_logits(model, attnopt.Linear(feature_map="elu"), VOCAB, PROMPT, PAD)


@pytest.mark.parametrize("target,kv_heads", [("onnxruntime", 4), ("onnx", 2)],
                         ids=["onnxruntime-MHA", "onnx-GQA"])
def test_state_file_equals_whole_sequence_linear(target, kv_heads, tmp_path):
    model = _llama(kv_heads)
    ids, mask = left_padded_prompt(VOCAB, PROMPT, PAD)
    res = attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / "d", target=target,
                                 config=attnopt.Config(variant=attnopt.Linear(feature_map="elu")))
    assert res.state_features == HEAD_DIM and res.cache_modes == ("growing",)
    assert [s.op for s in res.sites] == ["linear_state_attention"] * 2
    assert res.sites[0].state["S"] == [kv_heads, HEAD_DIM, HEAD_DIM]
    assert res.sites[0].state["bytes_per_token"] == 0
    assert res.lowering_error is not None and res.lowering_error <= 1e-4
    assert "genai_config.json" not in res.files and "recurrent state" in res.table()
    m = onnx.load(str(res.path), load_external_data=False)
    assert not {"GroupQueryAttention", "Attention"} & {n.op_type for n in m.graph.node}
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.input, *m.graph.output]}
    assert dims["past_key_values.1.key"] == ["batch_size", kv_heads, HEAD_DIM, HEAD_DIM]
    assert dims["present.1.value"] == ["batch_size", kv_heads, HEAD_DIM, 1]

    gen = res.generate(ids, NEW, attention_mask=mask, keep_logits=True, eos_token_id=None)
    seq = torch.from_numpy(gen.sequences)
    # The reference is causal: its logits at t are those of greedy recomputation on seq[:t+1].
    ref = _whole_sequence(model)(seq)[:, PROMPT - 1:-1]
    assert torch.equal(ref.argmax(-1), seq[:, PROMPT:])
    errs = [float(np.abs(ref[:, t].double().numpy() - o).max() / ref[:, t].abs().max())
            for t, o in enumerate(gen.logits)]
    assert len(errs) == NEW and max(errs) <= 1e-4, errs
    # (3) O(1) memory per token: the same state shape at step 1 and step 20
    assert gen.cache_shapes[0] == gen.cache_shapes[NEW - 1] == (2, kv_heads, HEAD_DIM, HEAD_DIM)
    assert gen.cache_lengths == [HEAD_DIM] * NEW
    with pytest.raises(ConfigError, match="recurrent state"):
        res.generate(ids, 2, attention_mask=mask, cache="shared")


# -- (4) refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,calibration,match", [
    (attnopt.Linear(feature_map="learned"), None, "learned maps are per-site projections"),
    (attnopt.Linear(feature_map="performer"), None, "maximum over all keys"),
    (attnopt.Linear(feature_map="elu"), [{"input_ids": torch.ones(1, 4, dtype=torch.long)}],
     "calibration"),
], ids=["learned", "performer", "elu-calibrated"])
def test_maps_a_state_cannot_carry_are_refused(variant, calibration, match, tmp_path):
    ids, _ = left_padded_prompt(VOCAB, PROMPT, PAD)
    cfg = attnopt.Config(variant=variant, calibration=calibration)
    with pytest.raises(VariantNotApplicableError, match=match) as e:
        attnopt.export_decoder(_llama(2), {"input_ids": ids}, tmp_path / "x", config=cfg)
    assert variant.describe() in str(e.value) and "Linear(feature_map='elu')" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_mixing_state_and_kv_cache_sites_is_refused(tmp_path):
    ids, _ = left_padded_prompt(VOCAB, PROMPT, PAD)
    cfg = attnopt.Config(variant=attnopt.Linear(feature_map="relu"),
                         overrides={"model.layers.1.*": attnopt.Fused()})
    with pytest.raises(ConfigError, match="same Linear feature map on every attention site"):
        attnopt.export_decoder(_llama(2), {"input_ids": ids}, tmp_path / "x", config=cfg)
