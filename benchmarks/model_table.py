"""Supported-models table: optimize and export every model family, record what was found.

For each model (tiny random-weight HF architectures in every attention mode transformers offers
for them, the two real pretrained models from PyPI packages): attention sites found vs what the
config implies, fused,
masks recognised, end-to-end error, and the ONNX export per target (attention ops in the graph,
parity error). Writes benchmarks/results/models.{json,md}.

``--zoo`` instead exports every hand-written attention module of ``tests/zoo.py`` (the
spellings the matcher is tested on) to both targets and writes
benchmarks/results/zoo_export.{json,md}.

    .venv/bin/python benchmarks/model_table.py [--no-export] [--no-pretrained] [--zoo]
        [--only tiny:bloom,tiny:opt-sdpa]   # rerun these rows, keep the others

A model that cannot be captured gets its CaptureError text as its row; a site left exact or
missed is listed under the table with the report's reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

import attnopt
from attnopt.models import ATTENTION_MODES, TINY, build

RESULTS = Path(__file__).parent / "results"


def one(spec: str, export: bool) -> dict:
    """Optimize (and export) one model; a capture failure or a crash is a row, not an abort."""
    built = build(spec, batch=2, seq=24)
    t0 = time.perf_counter()
    row = {"spec": spec, "model": built.description, "expected": built.expected_sites}
    try:
        fast = attnopt.optimize(built.model, built.inputs)
    except attnopt.CaptureError as e:
        return {**row, "capture_error": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - optimize must never raise on a model that runs
        return {**row, "crash": f"{type(e).__name__}: {e}"[:300]}
    r = fast.report
    row.update({
        "found": len(r.rows),
        "fused": r.count("fused"),
        "masks": dict(Counter(s.mask for s in r.sites)),
        "gqa": sorted({f"{s.heads}/{s.kv_heads}" for s in r.sites if s.kv_heads != s.heads}),
        "kinds": dict(Counter(s.kind for s in r.sites)),
        "left": sorted({row.note or row.site.reason or row.outcome for row in r.rows
                        if row.outcome != "fused"}),
        "missed": sorted({rj.reason for rj in r.rejected}),
        "error": max((e.rel for e in r.end_to_end.values()), default=None),
        "verified_on": len(r.end_to_end),
        "optimize_s": round(time.perf_counter() - t0, 1),
    })
    if export:
        _export_row(fast, built.inputs, row)
    return row


def _export_row(fast, inputs, row: dict) -> None:
    """Export ``fast`` to both targets; per target: ok, attention ops (or Softmax), parity."""
    for target in ("onnxruntime", "onnx"):
        with tempfile.TemporaryDirectory() as d:
            try:
                res = attnopt.export_onnx(fast, inputs, Path(d) / "m.onnx", target=target)
                ops = Counter(n.op_type for n in onnx.load(str(res.path)).graph.node
                              if "Attention" in n.op_type or n.op_type == "Softmax")
                row[target] = {"ok": True, "ops": dict(ops), "error": res.report.max_error,
                               "notes": [n for n in res.report.notes
                                         if not n.startswith("dynamic axes")]}
            except Exception as e:  # noqa: BLE001 - a failure is a result here
                row[target] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}


def zoo_row(case) -> dict:
    """One hand-written spelling: sites found / fused, then the export to both targets."""
    torch.manual_seed(0)
    model = case.build().eval()
    if case.extra.get("dtype") is not None:
        model = model.to(case.extra["dtype"])
    inputs = case.inputs()
    fast = attnopt.optimize(model, inputs)
    row = {"spec": case.name, "sites": len(fast.report.rows),
           "fused": fast.report.count("fused")}
    _export_row(fast, inputs, row)
    return row


def zoo_markdown(rows: list[dict]) -> str:
    def cell(e: dict) -> str:
        if not e["ok"]:
            missing = re.search(r"Could not find an implementation for (\S+)", e["error"])
            if missing:
                return f"not validated: ORT CPU has no {missing.group(1)} kernel for its dtype"
            return "failed: " + e["error"][:120]
        ops = ", ".join(f"{k} ×{v}" for k, v in e["ops"].items()) or "none"
        note = " (fusions dropped)" if any("fusions dropped" in n for n in e["notes"]) else ""
        return f"{ops}, {e['error']:.1e}{note}"

    lines = ["# ONNX export of the hand-written attention spellings (tests/zoo.py)", "",
             "Produced by `benchmarks/model_table.py --zoo`: each module (random weights, "
             "seed 0) optimized, then exported with `attnopt.export_onnx` to both targets; ops "
             "= attention ops (or Softmax) in the file; parity = onnxruntime vs torch, max over "
             "the example inputs and inputs of another batch size and length, relative to the "
             "output's scale.", "",
             "| spelling (tests/zoo.py) | sites | fused | ONNX Runtime export (ops, parity) "
             "| standard ONNX export (ops, parity) |", "|---|---:|---:|---|---|"]
    lines += [f"| {r['spec']} | {r['sites']} | {r['fused']} | {cell(r['onnxruntime'])} | "
              f"{cell(r['onnx'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    head = ("| model | sites found / config | fused | masks recognised | GQA | end-to-end error "
            "| ONNX Runtime export (ops, parity) | standard ONNX export (ops, parity) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines, reasons = [], []
    for r in rows:
        if "found" not in r:
            what = r.get("capture_error") or "optimize raised " + r.get("crash", "?")
            lines.append(f"| {r['spec']} | not captured | - | - | - | - | - | - |")
            reasons.append(f"* `{r['spec']}`: {what}")
            continue
        masks = ", ".join(f"{k} ×{v}" for k, v in r["masks"].items())

        def exp(t, r=r):
            e = r.get(t)
            if e is None:
                return "-"
            if not e["ok"]:
                return "failed: " + e["error"][:80]
            ops = ", ".join(f"{k} ×{v}" for k, v in e["ops"].items())
            return f"{ops}, {e['error']:.1e}"

        err = "-" if r["error"] is None else f"{r['error']:.1e}"
        lines.append(f"| {r['spec']} | {r['found']} / {r['expected']} | {r['fused']} | {masks} | "
                     f"{', '.join(r['gqa']) or '-'} | {err} | {exp('onnxruntime')} | "
                     f"{exp('onnx')} |")
        why = r.get("left", []) + [f"not found: {m}" for m in r.get("missed", [])]
        if why:
            reasons.append(f"* `{r['spec']}`: " + "; ".join(why))
    out = head + "\n".join(lines) + "\n"
    if reasons:
        out += ("\nSites not fused, with the reason the report gives:\n\n"
                + "\n".join(reasons) + "\n")
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--only", default="",
                   help="comma-separated specs to (re)run; the other rows of results/models.json "
                        "are kept")
    p.add_argument("--zoo", action="store_true",
                   help="export the hand-written spellings of tests/zoo.py instead")
    args = p.parse_args()
    if args.zoo:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from zoo import CASES

        _run_and_save("zoo_export", [(c.name, lambda c=c: zoo_row(c)) for c in CASES],
                      zoo_markdown)
        return
    specs = [f"tiny:{a}{'' if m == 'eager' else '-' + m}" for a in TINY
             for m in ATTENTION_MODES[a]]
    if not args.no_pretrained:
        specs += ["pkg:all-minilm-l6-v2", "pkg:smollm2"]
    only = set(args.only.split(",")) if args.only else None
    if only:
        unknown = only - set(specs)
        if unknown:
            p.error(f"--only: unknown specs {sorted(unknown)}")
    _run_and_save("models", [(s, lambda s=s: one(s, export=not args.no_export)) for s in specs
                             if only is None or s in only], markdown, keep_others=bool(only),
                  order=specs)


def _run_and_save(name: str, jobs, render, *, keep_others: bool = False,
                  order: list[str] | None = None) -> None:
    """Run each ``(spec, job)`` (printing its row as it ends), then write results/<name>.{json,md}.

    With ``keep_others``, rows of the existing JSON whose spec was not rerun are kept, in
    ``order``.
    """
    rows = []
    for _spec, job in jobs:
        torch.manual_seed(0)
        rows.append(job())
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    if keep_others and path.exists():
        new = {r["spec"]: r for r in rows}
        old = {r["spec"]: r for r in json.loads(path.read_text())}
        merged = {**old, **new}
        rank = {s: i for i, s in enumerate(order or [])}
        rows = sorted(merged.values(), key=lambda r: rank.get(r["spec"], len(rank)))
    path.write_text(json.dumps(rows, indent=2))
    (RESULTS / f"{name}.md").write_text(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
