"""Shared helpers for the attnopt benchmarks: allocator setup, interleaved timing, peak memory.

Reusable by any benchmark in this folder (``import _common`` works when the benchmark is run as
``python benchmarks/<name>.py``; tests put ``benchmarks/`` on ``sys.path``).

* :func:`time_rounds` is the one timing core: first call, warm-up, then interleaved rounds (every
  order of the callables in turn, so load from other processes on the shared cores hits all of
  them alike), CPU and wall time per call. :func:`time_interleaved` and
  :func:`compare_and_time` (output check and a time budget) are built on it.
* :func:`timing_subprocess` runs :func:`compare_and_time` in a fresh process per case with glibc
  malloc settings that keep freed memory mapped (fresh pages cost ~1 ms/MB to touch on these VMs,
  see ``shared/research/platform.md``). One process per case keeps the heap those settings never
  return from fragmenting across cases (one long process grew to 18.5 GB and was OOM-killed at
  the causal N=8192 case). The values are plain byte counts: glibc reads these variables with
  ``strtoul``, so ``MALLOC_MMAP_THRESHOLD_=4G`` means 4 *bytes* (every malloc becomes an mmap).
* :func:`peak_memory_subprocess` measures one call in a fresh Python process: resident-set peak
  above the resident set just before the call (``VmHWM`` reset through ``/proc/self/clear_refs``)
  and, from ``torch.profiler``, the peak of live tensor bytes and the largest single allocation.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

MiB = 2**20

# Timing process: keep freed memory mapped and reuse it (no page faults after warm-up).
TUNED_ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1073741824",
}
# Memory process: every block >= 128 KiB is its own mmap, unmapped on free (a fixed threshold
# also turns off glibc's dynamic threshold), so the resident set follows the live memory.
MEASURE_ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}
_ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                   "MALLOC_ARENA_MAX")


def allocator_env() -> dict[str, str]:
    """The glibc malloc variables of this process."""
    return {v: os.environ[v] for v in _ALLOCATOR_VARS if v in os.environ}


def machine_info() -> dict[str, Any]:
    """Versions, threads, CPU and allocator settings, for the results file."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "os_cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "allocator_env_parent": allocator_env(),
        "allocator_env_timing": dict(TUNED_ALLOCATOR_ENV),
        "allocator_env_memory": dict(MEASURE_ALLOCATOR_ENV),
        "load_average_1_5_15": list(os.getloadavg()),
        "mem_total_gib": round(_meminfo("MemTotal") / 2**30, 1),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    info["git_commit"] = _git_commit()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "attnopt"],
                               capture_output=True, text=True, cwd=Path(__file__).parent,
                               timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty(attnopt/)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


# -- timing ------------------------------------------------------------------------------------


def time_rounds(fns: Mapping[str, Callable[[], Any]], budget_s: float = 0.0, min_reps: int = 3,
                max_reps: int = 15, *, warmup: bool | None = None, long_round_s: float = 30.0,
                first_call: bool = True) -> dict[str, Any]:
    """The timing core of every benchmark: CPU and wall time over interleaved rounds.

    1. ``first_call``: one untimed call of each callable (pays for allocations, page faults,
       library initialisation; its duration is reported as ``first_round_s``).
    2. Warm-up: one more untimed round, unless ``warmup`` is False, or ``warmup`` is None and
       the first round took more than ``long_round_s`` wall seconds (then the first call was the
       warm-up: nothing is ever timed cold).
    3. Timed rounds: every round calls each callable once; the order cycles through all
       permutations, so each callable runs in every position equally often and load from other
       processes on shared cores hits all of them alike. Rounds continue while the next one is
       expected to end within ``budget_s`` (at least ``min_reps``, at most ``max_reps``). The
       garbage collector is off while timing.

    Per call: wall seconds (``time.perf_counter``) and CPU seconds of this process
    (``time.process_time``: with one intra-op thread, the work done; it does not grow when
    other processes take the core). CPU time is the primary number of the benchmarks.

    Returns:
        ``rounds``, ``warmup_rounds``, ``first_round_s``, ``cpu`` / ``wall`` (name →
        :func:`summarize`), ``cpu_s`` / ``wall_s`` (name → raw seconds in call order) and
        ``cpu_over_wall``.
    """
    names = list(fns)
    orders = list(itertools.permutations(names))
    first_round = 0.0
    if first_call:
        t0 = time.perf_counter()
        for n in names:
            fns[n]()
        first_round = time.perf_counter() - t0
    warm = 0
    if warmup or (warmup is None and first_round < long_round_s):
        for n in (names[::-1] if first_call else names):
            fns[n]()
        warm = 1
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        r = 0
        while r < max_reps:
            elapsed = time.perf_counter() - start
            if r >= min_reps and elapsed * (r + 1) / r > budget_s:
                break
            for n in orders[r % len(orders)]:
                w0, c0 = time.perf_counter(), time.process_time()
                fns[n]()
                cpu[n].append(time.process_time() - c0)
                wall[n].append(time.perf_counter() - w0)
            r += 1
    finally:
        gc.enable()
    return {"rounds": r, "warmup_rounds": warm, "first_round_s": round(first_round, 3),
            "cpu": {n: summarize(t) for n, t in cpu.items()},
            "wall": {n: summarize(t) for n, t in wall.items()},
            "cpu_s": cpu, "wall_s": wall,
            "cpu_over_wall": {n: round(sum(cpu[n]) / max(sum(wall[n]), 1e-12), 3)
                              for n in names}}


def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     ) -> dict[str, list[float]]:
    """Wall-clock seconds of each callable, ``repeats`` interleaved rounds (:func:`time_rounds`).

    Args:
        fns: name → zero-argument callable (run under ``torch.no_grad`` by the caller if needed).
        repeats: timed calls per callable.
        warmup: 1 for one untimed round first, 0 for none.

    Returns:
        name → list of ``repeats`` durations in seconds, in call order.
    """
    res = time_rounds(fns, min_reps=repeats, max_reps=repeats, warmup=bool(warmup),
                      first_call=False)
    return res["wall_s"]


def compare_and_time(fns: Mapping[str, Callable[[], Any]], budget_s: float, min_reps: int = 3,
                     max_reps: int = 15) -> dict[str, Any]:
    """Check outputs, warm up, then time interleaved rounds within a time budget.

    The first call of each callable is untimed; its output is compared with the first
    callable's (:func:`rel_error`). One more untimed round follows when a round takes < 2 s (the
    first calls paid for page faults). Then as many rounds as fit in ``budget_s``, clamped to
    ``[min_reps, max_reps]``.

    Returns:
        ``rel_error`` (name → error against the first callable), ``first_call_ms``, ``times``
        (name → :func:`summarize`) and ``ratios`` (name → :func:`paired_ratios` of the first
        callable's times over this one's).
    """
    names = list(fns)
    outs, first = {}, {}
    for n in names:
        t0 = time.perf_counter()
        outs[n] = fns[n]()
        first[n] = time.perf_counter() - t0
    errors = {n: rel_error(outs[names[0]], outs[n]) for n in names}
    del outs
    gc.collect()
    round_s = sum(first.values())
    reps = repeats_for(round_s, budget_s, min_reps, max_reps)
    res = time_rounds(fns, min_reps=reps, max_reps=reps, warmup=round_s < 2.0, first_call=False)
    times = res["wall_s"]
    base = times[names[0]]
    return {"rel_error": errors, "first_call_ms": {n: t * 1e3 for n, t in first.items()},
            "times": {n: summarize(t) for n, t in times.items()},
            "cpu_times": res["cpu"],
            "ratios": {n: paired_ratios(base, t) for n, t in times.items() if n != names[0]}}


def repeats_for(seconds_per_round: float, budget_s: float, lo: int = 3, hi: int = 15) -> int:
    """How many interleaved rounds fit in ``budget_s`` (clamped to ``[lo, hi]``)."""
    if seconds_per_round <= 0:
        return hi
    return max(lo, min(hi, int(budget_s / seconds_per_round)))


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median / min / max / quartiles in milliseconds, with the raw values."""
    ms = [t * 1e3 for t in times]
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "q1_ms": q[0], "q3_ms": q[2], "n": len(ms), "raw_ms": [round(x, 3) for x in ms]}


def paired_ratios(base: Sequence[float], new: Sequence[float]) -> dict[str, float]:
    """Speedup base/new: ratio of medians, and median / min / max of the per-round ratios."""
    per_round = [b / n for b, n in zip(base, new)]
    return {"speedup_of_medians": statistics.median(base) / statistics.median(new),
            "speedup_per_round_median": statistics.median(per_round),
            "speedup_per_round_min": min(per_round),
            "speedup_per_round_max": max(per_round)}


def rel_error(ref: Any, out: Any) -> float:
    """max |out - ref| / max |ref| over all floating tensor leaves (inf on a structure mismatch)."""
    import torch
    import torch.utils._pytree as pytree

    ref_leaves = [x for x in pytree.tree_leaves(_plain(ref)) if isinstance(x, torch.Tensor)]
    out_leaves = [x for x in pytree.tree_leaves(_plain(out)) if isinstance(x, torch.Tensor)]
    if len(ref_leaves) != len(out_leaves) or not ref_leaves:
        return float("inf")
    worst = 0.0
    for a, b in zip(ref_leaves, out_leaves):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.detach().double(), b.detach().double()
        scale = a.abs().max().item()
        diff = (a - b).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def fmt_number(x: float | None, digits: int = 1) -> str:
    """``x`` with thousands separators and ``digits`` decimals; "–" for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _plain(x: Any) -> Any:
    """HF ``ModelOutput`` → tuple of its tensors (other objects unchanged)."""
    to_tuple = getattr(x, "to_tuple", None)
    return to_tuple() if callable(to_tuple) else x


# -- memory ------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure_call_memory(run: Callable[[], Any], profile: bool = True) -> dict[str, Any]:
    """Peak memory of one ``run()`` call in this process (everything else allocated before).

    Returns:
        ``rss_baseline_mb``, ``rss_peak_extra_mb`` (resident-set peak during the call minus the
        resident set just before it), and with ``profile`` a second call under
        ``torch.profiler``: ``alloc_peak_extra_mb`` (peak of live tensor bytes allocated during
        the call) and ``largest_alloc_mb`` (largest single allocation).
    """
    gc.collect()
    result: dict[str, Any] = {}
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        out = run()
        peak = _status_kib("VmHWM")
        result["rss_method"] = "VmHWM after reset (clear_refs=5) minus VmRSS before"
    else:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["rss_method"] = "ru_maxrss after minus before (clear_refs unavailable)"
    del out
    result["rss_baseline_mb"] = before / 1024
    result["rss_peak_extra_mb"] = max(0, peak - before) / 1024
    if profile:
        gc.collect()
        result.update(_profiled_allocations(run))
    return result


def _profiled_allocations(run: Callable[[], Any]) -> dict[str, Any]:
    """Peak live bytes and largest allocation of one call, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    del out
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
    allocs.sort()
    live = peak = largest = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
        largest = max(largest, size)
    return {"alloc_peak_extra_mb": peak / MiB, "largest_alloc_mb": largest / MiB,
            "alloc_events": len(allocs)}


def timing_subprocess(file: str | os.PathLike, setup: str, kwargs: Mapping[str, Any],
                      budget_s: float, min_reps: int = 3, max_reps: int = 15,
                      timeout: float = 3600,
                      env: Mapping[str, str] = TUNED_ALLOCATOR_ENV) -> dict[str, Any]:
    """Run :func:`compare_and_time` in a fresh Python process.

    Args:
        file: the Python file defining ``setup``.
        setup: name of a function ``setup(**kwargs) -> (fns, info)``: ``fns`` maps names to
            zero-argument callables (the first is the baseline); ``info`` is JSON-able.
        kwargs: JSON-able keyword arguments for ``setup``.
        budget_s, min_reps, max_reps: see :func:`compare_and_time`.
        timeout: seconds.
        env: allocator variables for the child (the parent's are removed).

    Returns:
        :func:`compare_and_time`'s dict with ``info`` and ``wall_s``; ``{"error": ...}`` when
        the child failed (e.g. killed for memory).
    """
    return _run_worker({"mode": "time", "file": str(Path(file).resolve()), "setup": setup,
                        "kwargs": dict(kwargs), "budget_s": budget_s, "min_reps": min_reps,
                        "max_reps": max_reps}, env, timeout)


def peak_memory_subprocess(file: str | os.PathLike, setup: str, kwargs: Mapping[str, Any],
                           profile: bool = True, timeout: float = 1800,
                           env: Mapping[str, str] = MEASURE_ALLOCATOR_ENV) -> dict[str, Any]:
    """Measure one call in a fresh Python process (see :func:`measure_call_memory`).

    Args:
        file: the Python file defining ``setup``.
        setup: name of a function ``setup(**kwargs) -> (run, info)``: it builds weights and
            inputs (and warms up) *before* the measurement; ``run()`` makes the measured call;
            ``info`` is a JSON-able dict returned with the numbers.
        kwargs: JSON-able keyword arguments for ``setup``.
        profile: also run the call under ``torch.profiler`` (allocator peak, largest allocation).
        timeout: seconds.
        env: allocator variables for the child (the parent's are removed).

    Returns:
        The measurement dict, with ``info`` and ``wall_s``; ``{"error": ...}`` when it failed.
    """
    return _run_worker({"mode": "memory", "file": str(Path(file).resolve()), "setup": setup,
                        "kwargs": dict(kwargs), "profile": profile}, env, timeout)


def _run_worker(spec: dict[str, Any], env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    child_env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_VARS}
    child_env.update(env)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                               json.dumps(spec)], capture_output=True, text=True, env=child_env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"worker exited with {proc.returncode}{why}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len("@@RESULT "):])
    result["wall_s"] = round(wall, 2)
    return result


def _worker(payload: str) -> None:
    spec = json.loads(payload)
    path = Path(spec["file"])
    sys.path.insert(0, str(path.parent))
    mod_spec = importlib.util.spec_from_file_location(path.stem, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[path.stem] = module
    mod_spec.loader.exec_module(module)
    made, info = getattr(module, spec["setup"])(**spec["kwargs"])
    if spec["mode"] == "time":
        result = compare_and_time(made, spec["budget_s"], spec["min_reps"], spec["max_reps"])
    else:
        result = measure_call_memory(made, profile=spec["profile"])
    result["info"] = info
    result["allocator_env"] = allocator_env()
    print("@@RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: _common.py --worker JSON (used by peak_memory_subprocess)")
