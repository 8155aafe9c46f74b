"""TensorRT-target export survey: every tiny model, zoo spelling and variant, checked without a GPU.

Each row is one ``attnopt.export_onnx(..., target="tensorrt")`` call: the attention ops written,
whether the TensorRT compatibility check (``attnopt.tensorrt.check``) passed for that version,
and the onnxruntime (CPU) vs torch parity the export validated (relative to the output's
scale, max over the example inputs and inputs of another batch size and length). No engine is
built here (no GPU); the rows say what a TensorRT build would be given.

Writes benchmarks/results/tensorrt_exports.{json,md}; ``--only`` re-runs a few rows (fp32,
TensorRT 11.4) into tensorrt_exports_only.{json,md} and leaves the survey's files alone.

    .venv/bin/python benchmarks/tensorrt_exports.py [--quick]
    .venv/bin/python benchmarks/tensorrt_exports.py --only tiny:opt zoo:t5_relative_bias
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

#: (label, zoo case or tiny spec, variant config) for the approximate variants.
VARIANTS = [
    ("sliding_window", "tiny:llama", attnopt.SlidingWindow(window=8)),
    ("streaming", "tiny:llama", attnopt.Streaming(sinks=2, window=8)),
    ("block_topk", "tiny:bert", attnopt.BlockTopK(block=8, k=1)),
    ("neighborhood2d", "tiny:vit", attnopt.Neighborhood2D(kernel=3)),
    ("linear", "tiny:bert", attnopt.Linear(feature_map="elu")),
    ("linear causal", "tiny:gpt2", attnopt.Linear(feature_map="relu")),
    ("group_kv", "tiny:bert", attnopt.GroupKV(groups=2)),
    ("streaming_heads", "tiny:llama", attnopt.StreamingHeads(sinks=2, window=8,
                                                             full_fraction=0.5)),
    ("prune_heads", "tiny:bert", attnopt.PruneHeads(fraction=0.5)),
]


def export_row(label: str, model, inputs, *, version: str = "11.4", precision=None,
               config=None) -> dict:
    row = {"spec": label, "version": version, "precision": precision or "model"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        try:
            res = attnopt.export_onnx(model, inputs, Path(d) / "m.onnx", target="tensorrt",
                                      tensorrt_version=version, precision=precision,
                                      config=config)
            proto = onnx.load(str(res.path))
            ops = Counter(n.op_type for n in proto.graph.node
                          if n.op_type in ("Attention", "Softmax"))
            row.update(ok=True, ops=dict(ops), error=res.report.max_error if res.report.parity
                       else None, check=attnopt.tensorrt.check(res.path, version).ok,
                       opset=res.report.opset, mb=round(res.report.file_size / 1e6, 2))
        except Exception as e:  # noqa: BLE001 - a failure is a result here
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def only_jobs(specs: list[str]):
    """One fp32 / 11.4 row per ``tiny:<arch>`` or ``zoo:<case>`` spec."""
    from zoo import CASES

    for spec in specs:
        if spec.startswith("zoo:"):
            case = next(c for c in CASES if c.name == spec[4:])
            yield lambda case=case: _zoo_row(case)
        else:
            yield lambda s=spec: export_row(s, *_built(s))


def _zoo_row(case) -> dict:
    torch.manual_seed(0)
    model = case.build().eval()
    dtype = case.extra.get("dtype")
    if dtype is not None:
        model = model.to(dtype)
    # bf16: onnxruntime's CPU has no bf16 MatMul, so the file is checked structurally only
    return export_row(f"zoo:{case.name}", model, case.inputs(),
                      precision="bf16" if dtype == torch.bfloat16 else None)


def jobs(quick: bool, fp32_only: bool = False):
    """Variants, every tiny model (fp32, fp16, pre-10.14 form; ``fp32_only``: fp32 at 11.4
    only), the sdpa twins, then the zoo.
    """
    from zoo import CASES

    archs = ["bert", "llama", "whisper"] if quick else list(TINY)
    for label, spec, cfg in VARIANTS:
        yield lambda label=label, s=spec, c=cfg: export_row(
            label, *_built(s), config=attnopt.Config(variant=c))
    for arch in archs:
        yield lambda s=f"tiny:{arch}": export_row(s, *_built(s))
        if fp32_only:
            continue
        yield lambda s=f"tiny:{arch}": export_row(s, *_built(s), precision="fp16")
        yield lambda s=f"tiny:{arch}": export_row(s, *_built(s), version="10.13")
    for arch in archs:
        if "sdpa" in ATTENTION_MODES[arch]:
            yield lambda s=f"tiny:{arch}-sdpa": export_row(s, *_built(s))
    for case in ([] if quick else CASES):
        yield lambda case=case: _zoo_row(case)


def _built(spec: str):
    b = build(spec, batch=2, seq=24)
    return b.model, b.inputs


def markdown(rows: list[dict], command: str = "benchmarks/tensorrt_exports.py") -> str:
    def cell(r: dict) -> str:
        if not r["ok"]:
            return "failed: " + " ".join(r["error"].split())[:220].replace("|", "/")
        ops = ", ".join(f"{k} ×{v}" for k, v in r["ops"].items()) or "no attention"
        err = "not run (bf16)" if r["error"] is None else f"{r['error']:.1e}"
        return (f"{ops} | {'pass' if r['check'] else 'FAIL'} | opset {r['opset']} | {err} | "
                f"{r['seconds']}")

    lines = [f"# TensorRT-target exports (`{command}`)", "",
             "Every row: `export_onnx(..., target=\"tensorrt\")`; attention ops in the file; "
             "the GPU-free TensorRT compatibility check for that version; ONNX opset; "
             "onnxruntime (CPU) vs torch parity (max over the example inputs and inputs of "
             "another batch size and length, relative to the output's scale); export seconds "
             "(shared 2-core machine). No engine was built (no GPU here).", "",
             "| model / spelling | TensorRT | precision | attention ops | check | opset | "
             "parity | s |", "|---|---|---|---|---|---|---|---:|"]
    for r in rows:
        body = cell(r) if r["ok"] else f"{cell(r)} | | | | |"
        lines.append(f"| {r['spec']} | {r['version']} | {r['precision']} | {body} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="three models, no zoo")
    p.add_argument("--only", nargs="+", metavar="SPEC",
                   help="just these rows, fp32 at 11.4 (tiny:<arch> or zoo:<case>)")
    p.add_argument("--fp32", action="store_true",
                   help="every model fp32 at 11.4 only (no fp16, no pre-10.14 rows): ~1/3 of "
                        "the time; written to tensorrt_exports_fp32.{json,md}")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an interrupted run of the same mode (its json) and run "
                        "only the jobs after them (the job order is fixed)")
    args = p.parse_args()
    rows = []
    RESULTS.mkdir(exist_ok=True)
    name = "tensorrt_exports" + ("_only" if args.only else "_quick" if args.quick else
                                 "_fp32" if args.fp32 else "")
    command = "benchmarks/tensorrt_exports.py" + (
        " --only " + " ".join(args.only) if args.only else " --quick" if args.quick else
        " --fp32" if args.fp32 else "")
    if args.resume and (RESULTS / f"{name}.json").exists():
        rows = json.loads((RESULTS / f"{name}.json").read_text())
    for i, job in enumerate(only_jobs(args.only) if args.only else jobs(args.quick, args.fp32)):
        if i < len(rows):
            continue
        rows.append(job())
        print(json.dumps(rows[-1]), flush=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))  # partial runs count
        (RESULTS / f"{name}.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
