"""GPU check of issue 16, one run: CUDA tests, then fused / sparse / linear vs their baselines.

    python benchmarks/bench_gpu.py OUTDIR [--budget-s 420]    # on a CUDA machine
    python benchmarks/bench_gpu.py OUTDIR --cpu-smoke           # tiny sizes on CPU (code paths)

Sections, in order (each in its own try/except; results are written after every measurement to
``OUTDIR/gpu_results.json`` and ``OUTDIR/gpu_results.md``; a section that would start past the
time budget is recorded as skipped):
  1. ``pytest -m gpu`` in a subprocess (output in ``OUTDIR/pytest_gpu.txt``);
  2. fused: a hand-written eager attention module (bf16, batch 1, 16 heads × 128) optimized by
     ``attnopt.optimize`` vs the original eager code at 4k / 16k / 64k tokens: time (CUDA events,
     median after warm-up), peak memory (``torch.cuda.max_memory_allocated`` above the inputs),
     the SDPA backend the fused op reached. Eager at 64k would need 16 × N² bf16 scores
     (128 GiB, more with softmax): skipped when it cannot fit;
  3. sparse: each variant's op (FlexAttention on CUDA) vs SDPA flash at 16k / 64k: time, the
     variant's density (pairs computed / pairs flash computes), speedup, and the fraction of the
     ideal speedup ``1 / density`` reached;
  4. linear: ``Linear(elu)`` causal vs flash (causal) at 64k;
  5. CPU tests on this machine's torch (``tests/test_api.py``, ``tests/test_fused_op.py``):
     the package on another torch release than CI's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import attnopt  # noqa: E402
from attnopt.variants import _backends, _flex, _sparse  # noqa: E402
from attnopt.variants.block_topk import topk_pairs  # noqa: E402
from attnopt.variants.streaming import streaming_pairs  # noqa: E402

GiB = 2**30


class Run:
    """Results so far, the deadline, and the files they are written to after every change."""

    def __init__(self, out: Path, budget_s: float, smoke: bool) -> None:
        self.out, self.smoke = out, smoke
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {"machine": {}, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"rows": []})

    def save(self) -> None:
        (self.out / "gpu_results.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu_results.md").write_text(markdown(self.data))


# -- helpers ---------------------------------------------------------------------------------------


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], dev: str, warmup: int = 2, reps: int = 5,
          max_s: float = 20.0) -> dict[str, float]:
    """Median and min ms of ``fn`` after ``warmup`` calls (the first call's time kept apart)."""
    t0 = time.perf_counter()
    fn()
    sync(dev)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup - 1):
        fn()
    sync(dev)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start > max_s:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times),
            "first_call_ms": first}


def peak_bytes(fn: Callable[[], Any], dev: str) -> int | None:
    """Peak allocated bytes of one call above what was allocated before it (CUDA only)."""
    if dev != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated() - base


def free_bytes(dev: str) -> int:
    if dev != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info()
    return free


def release(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.empty_cache()


def qkv(n: int, heads: int, dim: int, dev: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return tuple(torch.randn(1, heads, n, dim, device=dev, dtype=dtype, generator=g)
                 for _ in range(3))


def flash(q, k, v, causal: bool) -> torch.Tensor:
    """The baseline: SDPA restricted to flash (CPU: SDPA's own choice)."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def guarded(run: Run, name: str, fn: Callable[[], None], min_left: float = 20.0) -> None:
    """Run one section; record skips (time budget) and failures, never raise."""
    sec = run.section(name)
    if run.left() < min_left:
        sec["status"] = f"skipped: time budget ({run.left():.0f} s left)"
        run.save()
        print(f"[{name}] {sec['status']}", flush=True)
        return
    t0 = time.perf_counter()
    print(f"[{name}] start ({run.left():.0f} s left)", flush=True)
    try:
        fn()
        sec.setdefault("status", "done")
    except Exception as e:  # noqa: BLE001 - one section's failure must not stop the others
        first = str(e).splitlines()[0][:300] if str(e) else ""
        sec["status"] = f"failed: {type(e).__name__}: {first}"
        sec["traceback"] = traceback.format_exc()[-3000:]
        print(sec["traceback"], flush=True)
    sec["seconds"] = round(time.perf_counter() - t0, 1)
    run.save()
    print(f"[{name}] {sec['status']} in {sec['seconds']} s", flush=True)


# -- 0. machine ------------------------------------------------------------------------------------


def machine(run: Run, dev: str) -> None:
    m = run.data["machine"]
    m.update({"python": platform.python_version(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "device": dev})
    if dev == "cuda":
        m["gpu"] = torch.cuda.get_device_name(0)
        m["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
        m["cudnn"] = torch.backends.cudnn.version()
    for pkg in ("triton", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx_ir"):
        try:
            m[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001
            m[pkg] = f"missing ({type(e).__name__})"
    print(json.dumps(m), flush=True)
    run.save()


# -- 1. pytest -m gpu ------------------------------------------------------------------------------


def pytest_section(run: Run, name: str, args: list[str], log: str, timeout: float) -> None:
    sec = run.section(name)
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "-rs",
           "--continue-on-collection-errors"]
    sec["command"] = " ".join(cmd)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\n[timed out after {timeout:.0f} s]"
        rc = "timeout"
    (run.out / log).write_text(text)
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
    sec["returncode"] = rc
    sec["summary"] = tail[0][:300]
    sec["status"] = "passed" if rc == 0 else f"rc={rc}: {sec['summary']}"
    print(f"[{name}] {sec['summary']}", flush=True)


def gpu_test_files() -> list[str]:
    """Test files with tests marked ``gpu`` (collecting only these keeps the run short)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


# -- 2. fused vs eager -----------------------------------------------------------------------------


def fused_section(run: Run, dev: str, dtype: torch.dtype, lengths: list[int], heads: int,
                  dim: int) -> None:
    from bench_fused import HandAttention

    sec = run.section("fused")
    hidden = heads * dim
    torch.manual_seed(0)
    model = HandAttention(hidden, heads, causal=False).to(dev, dtype).eval()
    small = (torch.randn(1, 256, hidden, device=dev, dtype=dtype),)
    fast = attnopt.optimize(model, small)
    sec["report"] = fast.report.to_dict()["summary"]
    for n in lengths:
        if run.left() < 15:
            sec["rows"].append({"n": n, "status": "skipped: time budget"})
            continue
        row = _fused_row(model, fast, n, heads, dev, dtype)
        sec["rows"].append(row)
        release(dev)
        run.save()
        print(f"  fused n={n}: {row}", flush=True)


def _fused_row(model, fast, n: int, heads: int, dev: str, dtype: torch.dtype) -> dict[str, Any]:
    hidden = model.q.in_features
    x = (torch.randn(1, n, hidden, device=dev, dtype=dtype),)
    row: dict[str, Any] = {"n": n}
    with torch.no_grad():
        _, names = _backends.sdpa_backends(fast, *x)
        row["backend"] = ",".join(names) or "none"
        t = timed(lambda: fast(*x), dev)
        row["fused_ms"], row["fused_first_ms"] = t["median_ms"], t["first_call_ms"]
        row["fused_peak_gib"] = _gib(peak_bytes(lambda: fast(*x), dev))
        # eager: scores, their softmax and the masked copy, in the model dtype
        need = 3 * heads * n * n * x[0].element_size()
        if need > 0.85 * free_bytes(dev):
            row["eager"] = f"OOM/skipped (needs ~{need / GiB:.0f} GiB)"
            return row
        try:
            t = timed(lambda: model(*x), dev, warmup=1, reps=3)
            row["eager_ms"] = t["median_ms"]
            row["eager_peak_gib"] = _gib(peak_bytes(lambda: model(*x), dev))
            row["speedup"] = row["eager_ms"] / row["fused_ms"]
            ref, out = model(*x).float(), fast(*x).float()
            row["rel_err"] = float(((out - ref).abs().max() / ref.abs().max()).item())
        except torch.cuda.OutOfMemoryError:
            row["eager"] = "OOM"
    return row


def _gib(b: int | None) -> float | None:
    return None if b is None else round(b / GiB, 3)


# -- 3. sparse vs flash ----------------------------------------------------------------------------


def sparse_cases(n: int, smoke: bool) -> list[dict[str, Any]]:
    """Each variant at length ``n``: its op call, causality and density."""
    exact_causal = _sparse.exact_pairs(n, n, True)
    win, sinks, swin, block, k = (512, 4, 508, 128, 8) if not smoke else (64, 4, 60, 128, 2)
    cases = [
        {"variant": f"SlidingWindow({win})", "causal": True,
         "call": ("sliding_window", (win, True)),
         "density": _sparse.band_pairs(n, n, win - 1, 0) / exact_causal},
        {"variant": f"Streaming({sinks}, {swin})", "causal": True,
         "call": ("streaming", (sinks, swin)),
         "density": streaming_pairs(n, n, sinks, swin) / exact_causal},
        {"variant": f"BlockTopK({block}, k={k})", "causal": True,
         "call": ("block_topk", (block, k, True, True)),
         "density": topk_pairs(n, n, block, k, True, True) / exact_causal},
    ]
    side = math.isqrt(n)
    if side * side == n:
        kernel = 13 if not smoke else 5
        cases.append({"variant": f"Neighborhood2D({kernel}) on {side}x{side}", "causal": False,
                      "call": ("neighborhood2d", (kernel, 1, side, side)),
                      "density": kernel * kernel / n})
    return cases


def _variant_fn(name: str, q, k, v, args, scale: float, use_flex: bool):
    if use_flex:  # CPU smoke of the flex code: call the FlexAttention form directly
        fn = getattr(_flex, name)
        return lambda: fn(q, k, v, None, *args, scale)
    op = getattr(torch.ops.attnopt, name)
    return lambda: op(q, k, v, None, *args, scale)


def sparse_section(run: Run, dev: str, dtype: torch.dtype, lengths: list[int], heads: int,
                   dim: int, use_flex: bool) -> None:
    sec = run.section("sparse")
    for n in lengths:
        for row in _sparse_rows(run, n, dev, dtype, heads, dim, use_flex):
            sec["rows"].append(row)
            run.save()
            print(f"  sparse {row}", flush=True)
        release(dev)


def _sparse_rows(run: Run, n: int, dev: str, dtype: torch.dtype, heads: int, dim: int,
                 use_flex: bool):
    """One row per variant at length ``n`` (yielded as measured)."""
    q, k, v = qkv(n, heads, dim, dev, dtype)
    scale = dim ** -0.5
    base: dict[bool, float] = {}
    for case in sparse_cases(n, run.smoke):
        row: dict[str, Any] = {"n": n, "variant": case["variant"], "density": case["density"]}
        if run.left() < 15:
            row["status"] = "skipped: time budget"
            yield row
            continue
        try:
            causal = case["causal"]
            if causal not in base:
                base[causal] = timed(lambda c=causal: flash(q, k, v, c), dev)["median_ms"]
            name, args = case["call"]
            _flex._warned.clear()
            t = timed(_variant_fn(name, q, k, v, args, scale, use_flex), dev)
            row.update({"flash_ms": base[causal], "variant_ms": t["median_ms"],
                        "first_call_ms": t["first_call_ms"],
                        "flex_fallback": sorted(_flex._warned)})
            row["speedup"] = base[causal] / t["median_ms"]
            row["ideal"] = 1 / case["density"]
            row["fraction_of_ideal"] = row["speedup"] / row["ideal"]
        except Exception as e:  # noqa: BLE001
            row["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
        yield row


# -- 4. linear vs flash ----------------------------------------------------------------------------


def linear_section(run: Run, dev: str, dtype: torch.dtype, n: int, heads: int, dim: int) -> None:
    sec = run.section("linear")
    q, k, v = qkv(n, heads, dim, dev, dtype)
    scale = dim ** -0.5
    row: dict[str, Any] = {"n": n, "variant": "Linear(elu) causal"}
    row["flash_ms"] = timed(lambda: flash(q, k, v, True), dev)["median_ms"]

    def lin():
        return torch.ops.attnopt.linear_attention(q, k, v, None, None, None, None, None, None,
                                                  True, scale, "elu", 64)

    t = timed(lin, dev)
    row.update({"variant_ms": t["median_ms"], "speedup": row["flash_ms"] / t["median_ms"],
                "peak_gib": _gib(peak_bytes(lin, dev))})
    sec["rows"].append(row)
    run.save()
    print(f"  linear {row}", flush=True)


# -- tables ----------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "–"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [f"# GPU check ({m.get('gpu', m.get('device', '?'))}, torch {m.get('torch')}, "
             f"CUDA {m.get('cuda')})", ""]
    secs = data["sections"]
    st = data.get("setup", {})
    setup = f"{st.get('dtype', '?')}, batch 1, {st.get('heads', '?')} heads × {st.get('dim', '?')}"
    for name, sec in secs.items():
        if "status" in sec or "summary" in sec:
            lines.append(f"- **{name}**: {sec.get('status', '')} "
                         f"{('— ' + sec['summary']) if sec.get('summary') else ''}")
    lines.append("")
    fused = secs.get("fused", {}).get("rows", [])
    if fused:
        lines += [f"## Fused vs eager ({setup}, bidirectional)", "",
                  "| N | SDPA backend | fused ms | eager ms | speedup | fused peak GiB | "
                  "eager peak GiB | rel err |", "|---|---|---|---|---|---|---|---|"]
        for r in fused:
            eager = _f(r.get("eager_ms")) if "eager_ms" in r else r.get("eager",
                                                                         r.get("status", "–"))
            lines.append(f"| {r['n']} | {r.get('backend', '–')} | {_f(r.get('fused_ms'))} | "
                         f"{eager} | {_f(r.get('speedup'), '{:.1f}×')} | "
                         f"{_f(r.get('fused_peak_gib'))} | {_f(r.get('eager_peak_gib'))} | "
                         f"{_f(r.get('rel_err'), '{:.1e}')} |")
        lines.append("")
    rows = secs.get("sparse", {}).get("rows", []) + secs.get("linear", {}).get("rows", [])
    if rows:
        lines += [f"## Sparse and linear vs SDPA flash ({setup}; causal except Neighborhood2D)",
                  "",
                  "| N | variant | density | flash ms | variant ms | speedup | ideal | "
                  "fraction of ideal |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            note = r.get("status", "")
            if r.get("flex_fallback"):
                note += f" (blocked kernel: flex failed for {r['flex_fallback']})"
            lines.append(f"| {r['n']} | {r['variant']} | {_f(r.get('density'), '{:.4f}')} | "
                         f"{_f(r.get('flash_ms'))} | {_f(r.get('variant_ms'))} | "
                         f"{_f(r.get('speedup'), '{:.1f}×')} | {_f(r.get('ideal'), '{:.0f}×')} | "
                         f"{_f(r.get('fraction_of_ideal'), '{:.0%}')} {note} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="sections that would start after this many seconds are skipped")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on CPU: exercises every code path, measures nothing useful")
    ap.add_argument("--smoke-flex", action="store_true",
                    help="with --cpu-smoke: call the FlexAttention forms (compiles, ~1 min)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke to exercise the code paths on CPU")
        return 2
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    heads, dim = (2, 32) if smoke else (16, 128)
    run = Run(args.outdir, args.budget_s, smoke)
    run.data["setup"] = {"dtype": str(dtype).replace("torch.", ""), "heads": heads, "dim": dim,
                         "batch": 1}
    skip = set(filter(None, args.skip.split(",")))
    machine(run, dev)
    steps: list[tuple[str, Callable[[], None], float]] = [
        ("pytest_gpu", lambda: pytest_section(
            run, "pytest_gpu", ["-m", "gpu", *gpu_test_files()],
            "pytest_gpu.txt", min(180.0, max(30.0, run.left() - 200))), 60),
        ("fused", lambda: fused_section(run, dev, dtype, [256, 512, 1024] if smoke
                                        else [4096, 16384, 65536], heads, dim), 30),
        ("sparse", lambda: sparse_section(run, dev, dtype, [1024] if smoke else [16384, 65536],
                                          heads, dim, smoke and args.smoke_flex), 30),
        ("linear", lambda: linear_section(run, dev, dtype, 2048 if smoke else 65536, heads,
                                          dim), 20),
        ("cpu_tests", lambda: pytest_section(
            run, "cpu_tests", ["tests/test_api.py", "tests/test_fused_op.py", "-x"],
            "pytest_cpu.txt", max(20.0, run.left() - 5)), 40),
    ]
    for name, fn, min_left in steps:
        if name in skip:
            run.section(name)["status"] = "skipped (--skip)"
            continue
        guarded(run, name, fn, min_left)
    run.save()
    print((run.out / "gpu_results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
