"""Real HF transformers architectures (random weights, eager and sdpa attention)."""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt._tiny_archs import BUILDERS
from attnopt.models import TINY, tiny
from attnopt.report import FUSED

CAUSAL_SELF = {"gpt2", "llama", "mistral"}  # every site causal
# The first ten architectures; the others are tested in tests/test_hf_archs.py.
MODELS = [f"{a}-{m}" for a in TINY if a not in BUILDERS for m in ("eager", "sdpa")]


@pytest.fixture(scope="module", params=MODELS)
def optimized(request):
    built = tiny(request.param, batch=2, seq=24)
    fast = attnopt.optimize(built.model, built.inputs)
    return request.param, built, fast


def test_every_attention_layer_is_found_and_fused(optimized):
    name, built, fast = optimized
    report = fast.report
    assert len(report.rows) == built.expected_sites, report.table()
    assert report.count(FUSED) == built.expected_sites, report.table()
    assert not report.rejected


def test_outputs_match_on_example_and_resized_inputs(optimized):
    _, _, fast = optimized
    report = fast.report
    assert len(report.end_to_end) == 2, "verified on a second batch size / length"
    for name, err in report.end_to_end.items():
        assert err.rel <= 1e-4, (name, err)


def test_optimized_model_stays_valid_for_other_shapes(optimized):
    """A third input, neither the example's nor verify's shape, still matches."""
    name, built, fast = optimized
    arch = name.split("-")[0]
    other = tiny(name, batch=3, seq=20 if arch not in ("vit", "clip") else 24)
    other.model.load_state_dict(built.model.state_dict())
    with torch.no_grad():
        ref = built.model(**other.inputs, **fast.call_defaults)
        out = fast(**other.inputs)
    assert attnopt.verify.compare(ref, out).rel <= 1e-4


def test_no_softmax_left_in_graph(optimized):
    _, _, fast = optimized
    targets = {n.target for n in fast.graph_module.graph.nodes}
    assert torch.ops.aten.softmax.int not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets


def test_causal_masks_become_causal_attention(optimized):
    name, _, fast = optimized
    arch = name.split("-")[0]
    sites = fast.report.sites
    if arch in CAUSAL_SELF:
        assert all(s.causal for s in sites)
    elif arch in ("whisper", "bart", "t5"):
        decoder_self = [s for s in sites if "decoder" in s.location and s.kind == "self"]
        assert decoder_self and all(s.causal or "mask" in s.mask for s in decoder_self)
        assert not any(s.causal for s in sites if "encoder" in s.location)
    elif arch in ("bert", "distilbert", "vit"):
        assert not any(s.causal for s in sites)


def test_gqa_and_cross_attention_are_recognised(optimized):
    name, _, fast = optimized
    arch = name.split("-")[0]
    sites = fast.report.sites
    if arch in ("llama", "mistral"):
        assert all(s.heads == 4 and s.kv_heads == 2 for s in sites)
    if arch in ("whisper", "t5", "bart"):
        cross = [s for s in sites if s.kind == "cross"]
        assert len(cross) == 2, fast.report.table()
    if arch == "mistral":
        assert all(s.window == 12 for s in sites), fast.report.table()
