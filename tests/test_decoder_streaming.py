"""Streaming(sinks, window) in decoder export: the op's sinks, a bounded (evicting) cache whose
tokens and logits equal the whole-sequence Streaming model's, both targets, shared and growing
buffers, compaction every step or amortised (``evict_every``), typed refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import left_padded_prompt, whole_sequence_logits

import attnopt
from attnopt.errors import ConfigError
from attnopt.export._kv_attention import kv_attention, reference_kv_attention, visible
from attnopt.variants.streaming import streaming_pattern

VOCAB, PROMPT, NEW, PAD = 120, 12, 40, 3
SINKS, WINDOW = 2, 8
KEPT = SINKS + WINDOW - 1


def _llama():
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation="eager")).eval()



def _rel(ref: torch.Tensor, out: np.ndarray) -> float:
    ref = ref.double().numpy()
    return float(np.abs(ref - out).max() / np.abs(ref).max())


# -- (a) the op --------------------------------------------------------------------------------


@pytest.mark.parametrize("window,sinks", [(0, 0), (5, 0), (5, 2), (3, 4), (1, 3)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("past,new", [(0, 9), (11, 1), (6, 3)], ids=["prefill", "decode", "chunk"])
def test_op_matches_reference_with_sinks(window, sinks, past, new):
    """GQA heads 4/2, a left-padded row: op == reference; the pattern is ``streaming_pattern``."""
    g = torch.Generator().manual_seed(past * 10 + new)
    q = torch.randn(2, 4, new, 8, generator=g)
    k, v = (torch.randn(2, 2, new, 8, generator=g) for _ in range(2))
    pk, pv = (torch.randn(2, 2, past, 8, generator=g) for _ in range(2))
    mask = torch.ones(2, past + new, dtype=torch.int64)
    mask[1, :2] = 0
    out, present_k, _ = kv_attention(q, k, v, pk, pv, mask, window, sinks, 0.3)
    ref, ref_k, _ = reference_kv_attention(q, k, v, pk, pv, mask, window, sinks, 0.3)
    assert torch.equal(present_k, ref_k)
    assert (out - ref).abs().max() < 1e-5
    allowed = visible(torch.ones(1, past + new, dtype=torch.int64), new, window, sinks)[0, 0]
    if window:
        whole = streaming_pattern(past + new, past + new, sinks, window)[past:]
    else:
        whole = torch.ones(past + new, past + new, dtype=torch.bool).tril()[past:]
    assert torch.equal(allowed, whole)
    if sinks and window and past + new > sinks + window:
        # the sinks matter: without them the last row would see fewer keys
        assert int(allowed[-1].sum()) == sinks + window


# -- (b, c) export, bounded cache, parity with the whole-sequence Streaming model ------------


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def whole_sequence(llama):
    """The whole-sequence Streaming-optimized model: ``sequences -> [B, T, V]`` logits."""
    return whole_sequence_logits(llama, attnopt.Streaming(sinks=SINKS, window=WINDOW), VOCAB,
                                 PROMPT, PAD)


def _export(llama, path, target):
    ids, _ = left_padded_prompt(VOCAB, PROMPT, PAD)
    cfg = attnopt.Config(variant=attnopt.Streaming(sinks=SINKS, window=WINDOW))
    return attnopt.export_decoder(llama, {"input_ids": ids}, path, target=target, config=cfg)


def _lengths(every: int) -> list[int]:
    """``Generation.cache_lengths`` of a bounded cache compacted at ``KEPT + every`` slots."""
    out, t = [], PROMPT
    for _ in range(NEW):
        out.append(t)
        t = (KEPT if t >= KEPT + every else t) + 1
    return out


def _same(a, b) -> None:
    """Two generations: the same tokens, logits within 1e-5 (only summation order differs)."""
    assert np.array_equal(a.sequences, b.sequences)
    assert max(float(np.abs(x - y).max() / np.abs(x).max())
               for x, y in zip(a.logits, b.logits)) <= 1e-5


def _check_bounded(res, whole_sequence, **kwargs):
    """Greedy tokens and every step's logits (1e-4) equal the whole-sequence Streaming model's.

    The reference runs once on the generated sequence: the model is causal, so its logits at
    position t are those of the recomputation on the first t + 1 tokens, and "every generated
    token is the argmax of the reference logits at its position" is greedy decoding with the
    reference, step by step (by induction on the steps).
    """
    ids, mask = left_padded_prompt(VOCAB, PROMPT, PAD)
    gen = res.generate(ids, NEW, attention_mask=mask, keep_logits=True, eos_token_id=None,
                       **kwargs)
    seq = torch.from_numpy(gen.sequences)
    assert seq.shape == (2, PROMPT + NEW)
    ref = whole_sequence(seq)[:, PROMPT - 1:-1]  # the logits that chose each new token
    assert torch.equal(ref.argmax(-1), seq[:, PROMPT:])
    errs = [_rel(ref[:, t], o) for t, o in enumerate(gen.logits)]
    assert len(errs) == NEW and max(errs) <= 1e-4, errs
    return gen


def test_onnxruntime_bounded_cache_equals_whole_sequence_streaming(llama, whole_sequence,
                                                                    tmp_path):
    res = _export(llama, tmp_path / "s", "onnxruntime")
    assert res.streaming == (SINKS, WINDOW)
    assert res.cache_modes == ("shared", "growing")
    assert [(s.applied_sinks, s.applied_window, s.window) for s in res.sites] == \
        [(SINKS, WINDOW, 0)] * 2
    assert any("approximate" in n and "sinks 2" in n for n in res.notes)
    assert any("genai" in n and "unbounded" in n for n in res.notes)
    assert "sinks 2, window 8" in res.table() and "bounded cache" in res.table()
    assert set(res.parity) == {"shared", "growing"}  # measured vs eager, not enforced
    m = onnx.load(str(res.path), load_external_data=False)
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert [a.i for n in gqa for a in n.attribute if a.name == "local_window_size"] == [-1, -1]

    # the default: a shared buffer compacted in place every WINDOW steps
    gen = _check_bounded(res, whole_sequence)
    assert gen.cache_lengths == _lengths(WINDOW) and gen.max_cache_length == KEPT + WINDOW
    assert gen.cache_capacity == KEPT + WINDOW  # never more, whatever the generated length
    # eviction after every step (growing mode): the same tokens
    every_step = _check_bounded(res, whole_sequence, cache="growing", evict_every=1)
    # the presents: the prompt at prefill, then the kept slots + the new token at every step
    assert every_step.cache_lengths == [PROMPT] + [KEPT + 1] * (NEW - 1)
    _same(every_step, gen)
    # shared every 2 steps: a prompt longer than KEPT + 2 sizes the buffer, then is compacted;
    # the in-place copy overlaps its source (2 < WINDOW - 1)
    short = _check_bounded(res, whole_sequence, evict_every=2)
    assert short.cache_lengths == _lengths(2) and short.cache_capacity == PROMPT
    _same(every_step, short)
    _same(every_step, _check_bounded(res, whole_sequence, cache="growing"))
    # without eviction the same file computes the same attention (genai's shared buffer)
    unbounded = _check_bounded(res, whole_sequence, cache="shared", evict=False)
    assert unbounded.max_cache_length == PROMPT + NEW - 1  # the last token is not fed back
    assert unbounded.cache_capacity == PROMPT + NEW
    ids, mask = left_padded_prompt(VOCAB, PROMPT, PAD)
    with pytest.raises(ConfigError, match="evict_every"):
        res.generate(ids, 2, attention_mask=mask, evict_every=0)
    with pytest.raises(ConfigError, match="max_length 10 < the 17 slots"):
        res.generate(ids, 20, attention_mask=mask, max_length=10)


def test_onnx_target_bounded_cache(llama, whole_sequence, tmp_path):
    res = _export(llama, tmp_path / "o", "onnx")
    m = onnx.load(str(res.path), load_external_data=False)
    assert "Attention" in {n.op_type for n in m.graph.node}
    assert res.cache_modes == ("growing",)
    gen = _check_bounded(res, whole_sequence)  # growing, compacted every WINDOW steps
    assert gen.cache_lengths == _lengths(WINDOW) and gen.max_cache_length == KEPT + WINDOW
    _same(gen, _check_bounded(res, whole_sequence, evict_every=1))


# -- (d) refusals --------------------------------------------------------------------------------


def test_streaming_on_a_model_with_its_own_window_is_refused(tmp_path):
    import transformers as tf

    model = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=6,
        max_position_embeddings=256, attn_implementation="eager")).eval()
    ids, _ = left_padded_prompt(VOCAB, PROMPT, PAD)
    cfg = attnopt.Config(variant=attnopt.Streaming(sinks=2, window=4))
    with pytest.raises(ConfigError, match="sliding window of 6.*self_attn|self_attn.*window of 6"):
        attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / "x", config=cfg)
    assert not (tmp_path / "x").exists()
