"""Public API surface, configs, errors, reports, overrides, and the reversal safety net."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from zoo import CausalTrilBuffer, MulScale

import attnopt
from attnopt.report import FUSED, LEFT_EXACT, REVERTED

PUBLIC = {
    "AttentionSite", "AttnoptError", "CaptureError", "Config", "ConfigError", "ExportError",
    "Fused", "OptimizedModel", "Report", "SiteResult", "ValidationError", "Variant",
    "VariantNotApplicableError", "find_attention", "optimize",
}
# Public names besides PUBLIC and the variant configs; adding one is a decision, made here.
ENTRY_POINTS = {"ExportResult", "export_onnx", "DecoderExport", "export_decoder", "save", "load",
                "Auto"}


def test_public_api_is_small_and_explicit():
    exported = set(attnopt.__all__)
    assert PUBLIC <= exported
    extra = exported - PUBLIC
    # every other public name must be a variant config, an error or an entry point added on
    # purpose
    variants = {n for n in extra if isinstance(getattr(attnopt, n), type)
                and issubclass(getattr(attnopt, n), (attnopt.Variant, attnopt.AttnoptError))}
    assert extra - variants <= ENTRY_POINTS, sorted(extra - variants - ENTRY_POINTS)
    assert {n for n in dir(attnopt) if not n.startswith("__")} == exported | {"serving"}, \
        "dir(attnopt) must show the public API only (no internal submodules)"
    for name in exported:
        assert not name.startswith("_") and hasattr(attnopt, name)


def test_config_round_trips_through_json():
    cfg = attnopt.Config(overrides={"layer.0.*": None, "*": attnopt.Fused()}, tolerance=1e-3)
    again = attnopt.Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("bad", [
    dict(variant="fused"),
    dict(tolerance=-1.0),
    dict(overrides={"x": "fast"}),
])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(attnopt.ConfigError):
        attnopt.Config(**bad)


def test_unknown_variant_name_raises():
    with pytest.raises(attnopt.ConfigError, match="unknown variant"):
        attnopt.Variant.from_dict({"variant": "nope"})


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(attnopt.ConfigError, match="nn.Module"):
        attnopt.optimize(lambda x: x, (torch.randn(2, 3),))
    with pytest.raises(attnopt.ConfigError, match="example_inputs"):
        attnopt.optimize(MulScale(), "not inputs")
    with pytest.raises(attnopt.ConfigError, match="attnopt.Config"):
        attnopt.optimize(MulScale(), (torch.randn(2, 12, 32),), config={"variant": "fused"})


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on tensor values: not capturable
            return x.softmax(-1)
        return x


def test_capture_error_names_the_construct():
    with pytest.raises(attnopt.CaptureError) as info:
        attnopt.optimize(DataDependent(), (torch.randn(2, 4),))
    err = info.value
    assert err.construct == "data-dependent control flow"
    assert "torch.cond" in err.hint and "test_api.py" in str(err)


def test_dict_inputs_and_report_data():
    model = MulScale().eval()
    x = torch.randn(2, 12, 32)
    fast = attnopt.optimize(model, {"x": x})
    data = json.loads(fast.report.to_json())
    assert data["summary"]["sites"] == 1 and data["summary"][FUSED] == 1
    row = data["sites"][0]
    for key in ("location", "spelling", "heads", "head_dim", "q_len", "kv_len", "scale",
                "causal", "mask", "kind", "outcome", "error"):
        assert key in row
    assert row["heads"] == 4 and row["head_dim"] == 8 and row["error"]["rel"] < 1e-5
    assert "fused" in fast.report.table()
    assert torch.allclose(fast(x=x), model(x), atol=1e-6)


def test_override_none_leaves_site_untouched():
    model = CausalTrilBuffer().eval()
    fast = attnopt.optimize(model, (torch.randn(2, 12, 32),),
                            attnopt.Config(overrides={"<root>": None}))
    assert fast.report.rows[0].outcome == LEFT_EXACT
    targets = {n.target for n in fast.graph_module.graph.nodes}
    assert torch.ops.attnopt.attention.default not in targets


def test_exact_rewrite_over_tolerance_is_reverted_not_kept():
    """With an impossible tolerance every exact rewrite must be reverted and reported."""
    model = MulScale().eval()
    x = torch.randn(2, 12, 32)
    fast = attnopt.optimize(model, (x,), attnopt.Config(tolerance=1e-30))
    row = fast.report.rows[0]
    assert row.outcome == REVERTED and "exceeds tolerance" in row.note
    targets = {n.target for n in fast.graph_module.graph.nodes}
    assert torch.ops.attnopt.attention.default not in targets
    assert torch.equal(fast(x), model(x))


def test_find_attention_is_read_only():
    model = MulScale().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sites = attnopt.find_attention(model, (torch.randn(2, 12, 32),))
    assert len(sites) == 1 and sites[0].fusable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exported_program_contains_fused_ops():
    fast = attnopt.optimize(MulScale().eval(), (torch.randn(2, 12, 32),))
    ep = fast.exported_program()
    assert isinstance(ep, torch.export.ExportedProgram)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.attnopt.attention.default) == 1


VARIANT_EXAMPLES = {
    "fused": lambda: attnopt.Fused(),
    "sliding_window": lambda: attnopt.SlidingWindow(window=64),
    "streaming": lambda: attnopt.Streaming(sinks=4, window=64),
    "streaming_heads": lambda: attnopt.StreamingHeads(sinks=4, window=64, full_fraction=0.5),
    "block_topk": lambda: attnopt.BlockTopK(block=16, k=2),
    "neighborhood2d": lambda: attnopt.Neighborhood2D(kernel=3),
    "linear": lambda: attnopt.Linear(feature_map="elu"),
    "group_kv": lambda: attnopt.GroupKV(groups=2),
    "prune_heads": lambda: attnopt.PruneHeads(fraction=0.5, scope="model"),
}


@pytest.mark.parametrize("name", sorted(attnopt.variants.registered()))
def test_every_registered_variant_config_round_trips(name):
    assert name in VARIANT_EXAMPLES, f"add an example config for new variant {name!r}"
    cfg = VARIANT_EXAMPLES[name]()
    again = attnopt.Variant.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and type(again) is type(cfg)
    whole = attnopt.Config(variant=cfg)
    assert attnopt.Config.from_dict(json.loads(json.dumps(whole.to_dict()))) == whole
