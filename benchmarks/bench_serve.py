"""Load on a real Triton server: attnopt's export vs the plain dynamo export, served the same way.

Model: a BERT encoder (random weights from a config, eager attention, fp32) wrapped as
``(input_ids, attention_mask) -> last_hidden_state``: hidden 128, 4 heads, 2 layers,
intermediate 512 (small: the machine's 2 cores are shared); requests of batch 1 x ``--seq``
tokens (last 1/8 padded).

Two ONNX files of the same wrapper, both with dynamic batch and sequence axes:

* **plain**: ``torch.onnx.export(wrapper, ..., dynamo=True)`` (attention decomposed into
  MatMul/Softmax/MatMul);
* **attnopt**: ``attnopt.export_onnx(wrapper, ..., target="onnxruntime")`` (one
  MultiHeadAttention per layer, standard fusions).

Both go into one model repository with the same config (Python backend running onnxruntime,
which is what the pip-installed tritonserver can load; ``max_batch_size`` 16, dynamic batching
with a 500 µs queue delay, one instance, one ORT intra-op thread: the load generator needs the
other core) and are served by one
tritonserver on 127.0.0.1. Each model first answers one request checked against torch; then for
each concurrency (1, 8, 32) the two models take turns, ``--rounds`` rounds each (the order
alternating per round, so load from other jobs on the shared cores hits both alike), of
``--requests / --rounds`` requests of the same input with that many in flight (closed loop, gRPC
``async_infer``, after 20 warm-up requests). Recorded over all rounds: p50 / p99 latency,
throughput, errors (must be 0), the server's request and execution counts (executions <
requests = the dynamic batcher merged requests); the attnopt / plain throughput ratio is the
median of the per-round ratios, with their range. For reference, the same run times the two files
directly in onnxruntime (1 thread, no spinning, CPU time per call, interleaved, medians) at the
batch sizes the batcher forms (1, 4, 16): the model's own compute, which other jobs on the shared
cores do not inflate.
Results go to ``benchmarks/results/serve.{json,md}``.

    .venv/bin/python benchmarks/bench_serve.py                 # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/bench_serve.py --requests 300  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_onnx_peers import build_model, make_inputs  # noqa: E402

import attnopt  # noqa: E402
from attnopt.serving import (  # noqa: E402
    DynamicBatching,
    client,
    start_server,
    write_triton_repository,
)

RESULTS = Path(__file__).parent / "results"
CONFIG = {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 512, "max_len": 512}


def export_plain(model, inputs: dict, path: Path) -> None:
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=2, max=CONFIG["max_len"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (inputs["input_ids"], inputs["attention_mask"]), str(path),
                          dynamo=True, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)


def export_attnopt(model, inputs: dict, path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnopt.export_onnx(model, inputs, path, target="onnxruntime")


def _rename_output(path: Path, name: str) -> None:
    """Give the single output the same name in both files (requests are then identical)."""
    import onnx

    m = onnx.load(str(path))
    old = m.graph.output[0].name
    if old != name:
        for n in m.graph.node:
            n.output[:] = [name if o == old else o for o in n.output]
        m.graph.output[0].name = name
        onnx.save(m, str(path))


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = build_model("bert", **CONFIG)
    example = make_inputs(args.seq, model.model.config.vocab_size, batch=2)
    t0 = time.perf_counter()
    export_plain(model, example, work / "plain.onnx")
    res = export_attnopt(model, example, work / "attnopt.onnx")
    _rename_output(work / "attnopt.onnx", "last_hidden_state")
    export_s = time.perf_counter() - t0
    repo = work / "repo"
    for name in ("plain", "attnopt"):
        write_triton_repository(work / f"{name}.onnx", repo, name, backend="python",
                                max_batch_size=16, dynamic_batching=DynamicBatching(),
                                threads=1)
    request = {k: v.numpy() for k, v in make_inputs(args.seq, model.model.config.vocab_size,
                                                    seed=1).items()}
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in request.items()})
    rows, parity = [], {}
    with start_server(repo) as server:
        for name in ("plain", "attnopt"):
            out, _ = client.infer(server, name, [request])
            got = torch.from_numpy(out[0]["last_hidden_state"])
            parity[name] = float((got - ref).abs().max() / ref.abs().max())
        for c in args.concurrency:
            rounds: dict[str, list[dict]] = {"plain": [], "attnopt": []}
            for i in range(args.rounds):
                for name in (("plain", "attnopt") if i % 2 == 0 else ("attnopt", "plain")):
                    rounds[name].append(client.load(server, name, request, concurrency=c,
                                                    requests=args.requests // args.rounds))
            ratios = [a["throughput_rps"] / p["throughput_rps"]
                      for a, p in zip(rounds["attnopt"], rounds["plain"])]
            for name in ("plain", "attnopt"):
                r = _merge(rounds[name], name, c)
                if name == "attnopt":
                    r["ratio_rounds"] = [round(x, 3) for x in ratios]
                    r["ratio_median"] = float(np.median(ratios))
                rows.append(r)
                print(f"  {name:8s} c={c:3d}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} "
                      f"ms, {r['throughput_rps']:.0f} req/s, errors {r['errors']}, executions "
                      f"{r['server_executions']} / requests {r['server_requests']}", flush=True)
    compute = compute_times(work, model.model.config.vocab_size, args.seq)
    return {"compute": compute, "config": CONFIG, "seq": args.seq, "requests": args.requests,
            "rounds": args.rounds,
            "export_s": round(export_s, 1), "parity_vs_torch": parity,
            "attnopt_sites": [s.attention_op for s in res.report.sites],
            "machine": {"cpus": os.cpu_count(), "glibc": os.confstr("CS_GNU_LIBC_VERSION")},
            "rows": rows}


def compute_times(work: Path, vocab: int, seq: int, reps: int = 30) -> list[dict]:
    """CPU time per onnxruntime call of each file at batch 1, 4, 16 (interleaved, medians)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = {n: ort.InferenceSession(str(work / f"{n}.onnx"), so,
                                    providers=["CPUExecutionProvider"])
            for n in ("plain", "attnopt")}
    out = []
    for batch in (1, 4, 16):
        feed = {k: v.numpy() for k, v in make_inputs(seq, vocab, batch=batch).items()}
        times: dict[str, list[float]] = {n: [] for n in sess}
        for r in range(reps + 3):
            for n in (("plain", "attnopt") if r % 2 else ("attnopt", "plain")):
                t0 = time.process_time()
                sess[n].run(None, feed)
                if r >= 3:
                    times[n].append(time.process_time() - t0)
        med = {n: float(np.median(v)) * 1e3 for n, v in times.items()}
        out.append({"batch": batch, "plain_ms": med["plain"], "attnopt_ms": med["attnopt"],
                    "plain_over_attnopt": med["plain"] / med["attnopt"]})
    return out


def _merge(rounds: list[dict], name: str, concurrency: int) -> dict:
    lat = np.concatenate([r.pop("latencies_ms") for r in rounds])
    return {"model": name, "concurrency": concurrency, "rounds": len(rounds),
            "requests": sum(r["requests"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "throughput_rps": sum(r["completed"] for r in rounds)
            / sum(r["elapsed_s"] for r in rounds),
            "server_requests": sum(r["server_requests"] for r in rounds),
            "server_executions": sum(r["server_executions"] for r in rounds),
            "per_round": rounds}


def markdown(data: dict) -> str:
    cfg = data["config"]
    lines = [
        "# Serving load: attnopt export vs plain dynamo export (tritonserver, 127.0.0.1)",
        "",
        f"BERT encoder hidden {cfg['hidden']}, {cfg['heads']} heads, {cfg['layers']} layers, "
        f"batch-1 requests of {data['seq']} tokens, {data['requests']} requests per cell in "
        f"{data['rounds']} alternating rounds; "
        "Python backend running onnxruntime (CPU), max_batch_size 16, dynamic batching "
        f"(500 µs), 1 instance, 1 ORT thread; {data['machine']['cpus']} shared CPU cores. "
        "attnopt's file: "
        f"{', '.join(sorted(set(map(str, data['attnopt_sites']))))} per layer. Parity with "
        "torch (max |diff| / max |torch|): "
        + ", ".join(f"{k} {v:.1e}" for k, v in data["parity_vs_torch"].items()) + ".",
        "",
        "| concurrency | export | p50 ms | p99 ms | req/s | errors | executions / requests |"
        " throughput attnopt / plain: median of rounds (range) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["model"], r["concurrency"]): r for r in data["rows"]}
    for c in sorted({r["concurrency"] for r in data["rows"]}):
        for name in ("plain", "attnopt"):
            r = by[(name, c)]
            ratio = ""
            if name == "attnopt":
                ratio = (f"{r['ratio_median']:.2f} ({min(r['ratio_rounds']):.2f}–"
                         f"{max(r['ratio_rounds']):.2f})")
            lines.append(f"| {c} | {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['throughput_rps']:.0f} | {r['errors']} | "
                         f"{r['server_executions']} / {r['server_requests']} | {ratio} |")
    lines += ["", "Model compute alone (onnxruntime, 1 thread, CPU time per call, medians): "
              + "; ".join(f"batch {c['batch']}: plain {c['plain_ms']:.2f} ms, attnopt "
                          f"{c['attnopt_ms']:.2f} ms (plain / attnopt "
                          f"{c['plain_over_attnopt']:.2f})" for c in data["compute"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per cell")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS / "serve"))
    args = p.parse_args()
    data = run(args)
    Path(args.out + ".json").write_text(json.dumps(data, indent=2))
    Path(args.out + ".md").write_text(markdown(data))
    print(markdown(data))
    bad = [r for r in data["rows"] if r["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
