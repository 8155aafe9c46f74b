"""Supported-models table: optimize and export every model family, record what was found.

For each model (tiny random-weight HF architectures in eager and sdpa mode, the two real
pretrained models from PyPI packages): attention sites found vs what the config implies, fused,
masks recognised, end-to-end error, and the ONNX export per target (attention ops in the graph,
parity error). Writes benchmarks/results/models.{json,md}.

    .venv/bin/python benchmarks/model_table.py [--no-export] [--no-pretrained]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx

import attnopt
from attnopt.models import TINY, build

RESULTS = Path(__file__).parent / "results"


def one(spec: str, export: bool) -> dict:
    built = build(spec, batch=2, seq=24)
    t0 = time.perf_counter()
    fast = attnopt.optimize(built.model, built.inputs)
    r = fast.report
    row = {
        "spec": spec,
        "model": built.description,
        "expected": built.expected_sites,
        "found": len(r.rows),
        "fused": r.count("fused"),
        "masks": dict(Counter(s.mask for s in r.sites)),
        "gqa": sorted({f"{s.heads}/{s.kv_heads}" for s in r.sites if s.kv_heads != s.heads}),
        "kinds": dict(Counter(s.kind for s in r.sites)),
        "error": max((e.rel for e in r.end_to_end.values()), default=None),
        "optimize_s": round(time.perf_counter() - t0, 1),
    }
    if export:
        for target in ("onnxruntime", "onnx"):
            with tempfile.TemporaryDirectory() as d:
                try:
                    res = attnopt.export_onnx(fast, built.inputs, Path(d) / "m.onnx",
                                              target=target)
                    ops = Counter(n.op_type for n in onnx.load(str(res.path)).graph.node
                                  if "Attention" in n.op_type)
                    row[target] = {"ok": True, "ops": dict(ops), "error": res.report.max_error}
                except Exception as e:  # noqa: BLE001 - a failure is a result here
                    row[target] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | sites found / config | fused | masks recognised | GQA | end-to-end error "
            "| ONNX Runtime export (ops, parity) | standard ONNX export (ops, parity) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        masks = ", ".join(f"{k} ×{v}" for k, v in r["masks"].items())

        def exp(t, r=r):
            e = r.get(t)
            if e is None:
                return "-"
            if not e["ok"]:
                return "failed"
            ops = ", ".join(f"{k} ×{v}" for k, v in e["ops"].items())
            return f"{ops}, {e['error']:.1e}"

        lines.append(f"| {r['spec']} | {r['found']} / {r['expected']} | {r['fused']} | {masks} | "
                     f"{', '.join(r['gqa']) or '-'} | {r['error']:.1e} | {exp('onnxruntime')} | "
                     f"{exp('onnx')} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--no-pretrained", action="store_true")
    args = p.parse_args()
    specs = [f"tiny:{a}{m}" for a in TINY for m in ("", "-sdpa")]
    if not args.no_pretrained:
        specs += ["pkg:all-minilm-l6-v2", "pkg:smollm2"]
    rows = []
    for spec in specs:
        rows.append(one(spec, export=not args.no_export))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "models.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
