"""More HF transformers architectures (random weights from configs, ``attnopt._tiny_archs``).

Each is optimized once (cached per module): sites found = what the config implies and every site
fused exactly, or, for the architectures whose attention code the matcher does not rewrite yet,
every site reported with its reason and no exception. The default run covers a lean subset with
distinct attention code; ``ATTNOPT_ALL_ARCHS=1`` runs every architecture in every attention mode
(about 10 s each, Swin ~1 min: its dynamic image size makes torch.export slow).
``benchmarks/model_table.py`` exports all of them to both ONNX targets.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch

import attnopt
from attnopt._tiny_archs import BUILDERS
from attnopt.models import ATTENTION_MODES, tiny
from attnopt.report import FUSED

ALL = [f"{a}-{m}" for a in BUILDERS for m in ATTENTION_MODES[a]]

#: architectures whose sites the matcher does not rewrite yet; each must still be reported with
#: its reason. Empty since Swin-v2 eager (cosine attention with a per-head logit scale) is fused.
PENDING: set[str] = set()

#: default run: one of each kind of attention code (ALiBi + masked_fill, MQA through SDPA,
#: alternating sliding-window layers, spatial-reduction keys, DETR's cross attention with
#: positions on q/k), and BLOOM's baddbmm + ALiBi.
DEFAULT = ["mpt-eager", "falcon-sdpa", "gemma3-eager", "segformer-eager", "detr-eager",
           "bloom-eager"]

EVERYTHING = os.environ.get("ATTNOPT_ALL_ARCHS") == "1"


SELECTED = ALL if EVERYTHING else DEFAULT


@pytest.mark.slow
@pytest.mark.skipif(EVERYTHING, reason="every architecture runs in the tests below")
def test_other_architectures_run_on_request():
    pytest.skip(f"{len(ALL) - len(DEFAULT)} more architecture/mode pairs run with "
                "ATTNOPT_ALL_ARCHS=1 (~10 s each) and in benchmarks/model_table.py")


@cache
def _optimized(spec: str):
    torch.manual_seed(0)
    built = tiny(spec, batch=2, seq=24)
    return built, attnopt.optimize(built.model, built.inputs)


def test_every_architecture_has_a_builder_per_attention_mode():
    assert len(BUILDERS) >= 18
    assert all(ATTENTION_MODES[a] in (("eager",), ("eager", "sdpa")) for a in BUILDERS)
    with pytest.raises(attnopt.ConfigError, match="eager attention only"):
        tiny("bloom-sdpa")


@pytest.mark.parametrize("spec", SELECTED)
def test_sites_found_fused_and_verified(spec):
    built, fast = _optimized(spec)
    report = fast.report
    if spec in PENDING:
        # Not rewritten yet: nothing crashes, and every softmax examined says why it stays.
        assert report.count(FUSED) < built.expected_sites, "now fused: move it out of PENDING"
        for row in report.rows:
            assert row.outcome == FUSED or row.note or row.site.reason, report.table()
        assert len(report.rows) + len(report.rejected) >= built.expected_sites, report.table()
        assert all(r.reason for r in report.rejected)
        return
    assert len(report.rows) == built.expected_sites, report.table()
    assert report.count(FUSED) == built.expected_sites, report.table()
    assert len(report.end_to_end) == 2, report.notes  # example + another batch size / length
    assert all(e.rel <= 1e-4 for e in report.end_to_end.values()), report.end_to_end


@pytest.mark.parametrize("spec", [s for s in DEFAULT if s not in PENDING])
def test_attention_properties_are_recognised(spec):
    _, fast = _optimized(spec)
    sites = fast.report.sites
    arch = spec.split("-")[0]
    if arch == "mpt":
        assert all("bias" in s.mask for s in sites)  # ALiBi stays an additive bias
    elif arch == "falcon":
        assert all(s.heads == 4 and s.kv_heads == 1 for s in sites)  # multi-query
    elif arch == "gemma3":
        assert [s.window for s in sites] == [12, None]  # sliding layer, then a global one
        assert all(s.causal for s in sites)
    elif arch == "segformer":
        assert sites[0].q_len == 4 * sites[0].kv_len  # keys reduced 2x2 (sr_ratio 2)
        assert sites[1].q_len == sites[1].kv_len
    elif arch == "detr":
        assert [s.kind for s in sites] == ["self", "self", "cross"]
    elif arch == "wav2vec2":
        assert not any(s.causal for s in sites)


# One export in the default run (seconds each); benchmarks/model_table.py exports every one.
@pytest.mark.parametrize("spec,target", [("gemma3-eager", "onnxruntime")])
def test_export_has_one_attention_op_per_site(spec, target, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    built, fast = _optimized(spec)
    res = attnopt.export_onnx(fast, built.inputs, tmp_path / "m.onnx", target=target)
    ops = [n.op_type for n in onnx.load(str(res.path)).graph.node]
    attention = [o for o in ops if o in ("Attention", "MultiHeadAttention",
                                         "GroupQueryAttention")]
    assert len(attention) == built.expected_sites and "Softmax" not in ops
    assert len(res.report.parity) == 2 and res.report.max_error <= 1e-4, res.report.parity
