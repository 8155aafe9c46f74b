"""Benchmark of exact fusion (issue 2): original vs ``attnopt.optimize`` on CPU, same run.

1. A hand-written multi-head self-attention (hidden 768, 12 heads, head dim 64, q/k/v/out
   linears, ``softmax(q @ kᵀ * scale) @ v``; optionally causal through a ``tril`` mask), batch 1,
   N = 512 … 8192. It is optimized once at a small N (the optimized graph has a dynamic sequence
   length) and reused at every N.
2. End to end: an HF BERT encoder with eager attention (random weights from a config), batch 1,
   ``input_ids`` + ``attention_mask`` (last N/8 tokens padded) at 512 and 2048 tokens.

Time: both models (original and optimized) in the same process, one fresh process per
(model, N), with a tuned glibc allocator (``_common.TUNED_ALLOCATOR_ENV``: freed memory is
reused, the best case for the original's big score tensors), interleaved rounds (order
alternating), medians and their ratio.
Threads: torch's default (= the 2 cores here) unless ``--threads``.

Peak memory: each (model, N) in a fresh subprocess (``_common.peak_memory_subprocess``): weights,
inputs and a warm-up call at N=64 come first; then one call is measured: resident-set peak minus
the resident set before it, and (a second call under ``torch.profiler``) the peak of live tensor
bytes and the largest single allocation. "No N×N tensor" means the optimized model's largest
allocation is smaller than one fp32 ``heads × N × N`` score tensor.

    .venv/bin/python benchmarks/bench_fused.py            # full run, ~20-25 min when loaded
    .venv/bin/python benchmarks/bench_fused.py --quick    # N ≤ 2048, BERT at 512 only, ~3 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import attnopt  # noqa: E402

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
WARMUP_LEN = 64  # warm-up length inside memory subprocesses (library init, thread pool)


class HandAttention(nn.Module):
    """Multi-head self-attention written out by hand (the spelling attnopt must find).

    ``x: [B, N, hidden] → [B, N, hidden]``.
    """

    def __init__(self, hidden: int = 768, heads: int = 12, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, hidden // heads, causal
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) * self.scale
        if self.causal:
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.out(out.transpose(1, 2).reshape(b, n, e))


# -- model builders (shared by the timing process and the memory subprocesses) -----------------


def _hand(causal: bool, hidden: int, heads: int, seed: int) -> HandAttention:
    torch.manual_seed(seed)
    return HandAttention(hidden, heads, causal).eval()


def _hand_input(n: int, hidden: int, seed: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + n)
    return (torch.randn(1, n, hidden, generator=g),)


def _bert(layers: int, max_len: int, seed: int) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(
        hidden_size=768, num_attention_heads=12, num_hidden_layers=layers,
        intermediate_size=3072, max_position_embeddings=max_len, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _bert_input(n: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + n)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    mask = torch.ones(1, n, dtype=torch.long)
    mask[:, n - n // 8:] = 0  # padded tail: the padding mask is live, not all-ones
    return {"input_ids": ids, "attention_mask": mask}


def _call(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _optimize(model: nn.Module, inputs: Any, expect_sites: int) -> tuple[nn.Module, dict]:
    t0 = time.perf_counter()
    fast = attnopt.optimize(model, inputs)
    summary = fast.report.to_dict()["summary"]
    info = {"optimize_s": round(time.perf_counter() - t0, 2), "report_summary": summary,
            "all_fused": summary["sites"] == expect_sites == summary["fused"]}
    return fast, info


# -- subprocess setups (run by _common.timing_subprocess / peak_memory_subprocess) ------------


def timing_setup_hand(n: int, causal: bool, hidden: int, heads: int, opt_len: int, seed: int,
                      ) -> tuple[dict, dict]:
    """Original and optimized hand-written attention, called on one input of length ``n``."""
    original = _hand(causal, hidden, heads, seed)
    fast, info = _optimize(original, _hand_input(opt_len, hidden, seed), expect_sites=1)
    x = _hand_input(n, hidden, seed)
    return {"original": lambda: _call(original, x), "optimized": lambda: _call(fast, x)}, info


def timing_setup_bert(n: int, layers: int, max_len: int, opt_len: int, seed: int,
                      ) -> tuple[dict, dict]:
    """Original and optimized BERT encoder, called on inputs of length ``n``."""
    original = _bert(layers, max_len, seed)
    vocab = original.config.vocab_size
    fast, info = _optimize(original, _bert_input(opt_len, vocab, seed), expect_sites=layers)
    x = _bert_input(n, vocab, seed)
    return {"original": lambda: _call(original, x), "optimized": lambda: _call(fast, x)}, info


def memory_setup_hand(which: str, n: int, causal: bool, hidden: int, heads: int, opt_len: int,
                      seed: int) -> tuple[Any, dict]:
    """Build one hand-written model (original or optimized), its input at ``n``, warm up."""
    model = _hand(causal, hidden, heads, seed)
    info: dict[str, Any] = {}
    if which == "optimized":
        model, info = _optimize(model, _hand_input(opt_len, hidden, seed), expect_sites=1)
    x = _hand_input(n, hidden, seed)
    _call(model, _hand_input(WARMUP_LEN, hidden, seed))
    return (lambda: _call(model, x)), info


def memory_setup_bert(which: str, n: int, layers: int, max_len: int, opt_len: int, seed: int,
                      ) -> tuple[Any, dict]:
    """Build the BERT encoder (original or optimized), its inputs at ``n``, warm up."""
    model = _bert(layers, max_len, seed)
    vocab = model.config.vocab_size
    info: dict[str, Any] = {}
    if which == "optimized":
        model, info = _optimize(model, _bert_input(opt_len, vocab, seed), expect_sites=layers)
    x = _bert_input(n, vocab, seed)
    _call(model, _bert_input(WARMUP_LEN, vocab, seed))
    return (lambda: _call(model, x)), info


# -- the benchmark -----------------------------------------------------------------------------


def _timing_row(res: dict[str, Any]) -> dict[str, Any]:
    """``compare_and_time`` output → the row's ``time`` entry."""
    if "error" in res:
        return res
    return {"rel_error": res["rel_error"]["optimized"], "first_call_ms": res["first_call_ms"],
            "original": res["times"]["original"], "optimized": res["times"]["optimized"],
            **res["ratios"]["optimized"],
            **{k: res[k] for k in ("info", "wall_s", "allocator_env") if k in res}}


def _memory_pair(setup: str, score_bytes: int, kwargs: dict, profile: bool) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for which in ("original", "optimized"):
        res[which] = _common.peak_memory_subprocess(HERE, setup, {"which": which, **kwargs},
                                                    profile=profile)
    o, f = res["original"], res["optimized"]
    res["score_tensor_mb"] = score_bytes / _common.MiB
    if "error" not in o and "error" not in f:
        res["rss_ratio"] = o["rss_peak_extra_mb"] / max(f["rss_peak_extra_mb"], 1e-9)
        if profile:
            res["alloc_ratio"] = o["alloc_peak_extra_mb"] / max(f["alloc_peak_extra_mb"], 1e-9)
            res["original_materialises_nxn"] = o["largest_alloc_mb"] * _common.MiB >= score_bytes
            res["optimized_materialises_nxn"] = f["largest_alloc_mb"] * _common.MiB >= score_bytes
        res["optimized_rss_over_score"] = f["rss_peak_extra_mb"] * _common.MiB / score_bytes
    return res


def bench_hand(seq_lens: list[int], *, causal: bool = False, hidden: int = 768, heads: int = 12,
               opt_len: int = 128, budget_s: float = 20.0, min_reps: int = 3,
               max_reps: int = 15, isolate: bool = True, memory: bool = True,
               profile: bool = True, seed: int = 0, log=print) -> dict[str, Any]:
    """Original vs optimized hand-written attention at each sequence length.

    Args:
        isolate: time each N in a fresh subprocess (tuned allocator); False: in this process,
            optimizing once (for tests).

    Returns:
        ``{"model", "config", "optimize", "rows": [{"n", "time": {...}, "memory": {...}}]}``;
        ``optimize`` holds the report summary of the first optimization (done at ``opt_len``,
        reused at every N); with ``isolate`` every row's ``time.info`` has its own.
    """
    name = "hand-written MHA" + (" (causal, tril mask)" if causal else "")
    kw = {"causal": causal, "hidden": hidden, "heads": heads, "opt_len": opt_len, "seed": seed}
    rows = []
    for n in seq_lens:
        row: dict[str, Any] = {"n": n}
        if isolate:
            row["time"] = _timing_row(_common.timing_subprocess(
                HERE, "timing_setup_hand", {"n": n, **kw}, budget_s, min_reps, max_reps))
        else:
            fns, info = timing_setup_hand(n, **kw)
            row["time"] = _timing_row({**_common.compare_and_time(fns, budget_s, min_reps,
                                                                  max_reps), "info": info})
        if memory:
            row["memory"] = _memory_pair("memory_setup_hand", heads * n * n * 4, {"n": n, **kw},
                                         profile)
        log(_row_line(name, row))
        rows.append(row)
    return {"model": name, "kind": "hand",
            "config": {"hidden": hidden, "heads": heads, "head_dim": hidden // heads,
                       "batch": 1, "causal": causal, "dtype": "float32", "opt_len": opt_len},
            "optimize": _first_info(rows), "rows": rows}


def bench_bert(seq_lens: list[int], *, layers: int = 4, opt_len: int = 512,
               budget_s: float = 30.0, min_reps: int = 3, max_reps: int = 15,
               isolate: bool = True, memory: bool = True, profile: bool = True, seed: int = 0,
               log=print) -> dict[str, Any]:
    """Original vs optimized HF BERT encoder (eager attention) at each sequence length."""
    max_len = max(2048, *seq_lens, opt_len)
    name = f"BERT encoder ({layers} layers, eager)"
    kw = {"layers": layers, "max_len": max_len, "opt_len": opt_len, "seed": seed}
    rows = []
    for n in seq_lens:
        row: dict[str, Any] = {"n": n}
        if isolate:
            row["time"] = _timing_row(_common.timing_subprocess(
                HERE, "timing_setup_bert", {"n": n, **kw}, budget_s, min_reps, max_reps))
        else:
            fns, info = timing_setup_bert(n, **kw)
            row["time"] = _timing_row({**_common.compare_and_time(fns, budget_s, min_reps,
                                                                  max_reps), "info": info})
        if memory:
            row["memory"] = _memory_pair("memory_setup_bert", 12 * n * n * 4, {"n": n, **kw},
                                         profile)
        log(_row_line(name, row))
        rows.append(row)
    return {"model": name, "kind": "bert",
            "config": {"hidden": 768, "heads": 12, "head_dim": 64, "layers": layers,
                       "intermediate": 3072, "batch": 1, "padded_tail": "N/8 tokens",
                       "weights": f"random (BertConfig, seed {seed})", "opt_len": opt_len},
            "optimize": _first_info(rows), "rows": rows}


def _first_info(rows: list[dict]) -> dict[str, Any]:
    for row in rows:
        if "info" in row["time"]:
            return row["time"]["info"]
    return {"all_fused": False, "report_summary": None, "error": "no case ran"}


# -- output ------------------------------------------------------------------------------------


def _row_line(name: str, row: dict) -> str:
    t = row["time"]
    if "error" in t:
        return f"  {name} N={row['n']}: timing failed: {t['error']}"
    s = (f"  {name} N={row['n']}: original {t['original']['median_ms']:.1f} ms, optimized "
         f"{t['optimized']['median_ms']:.1f} ms, speedup {t['speedup_of_medians']:.2f}x "
         f"(rounds {t['original']['n']}), rel err {t['rel_error']:.1e}")
    m = row.get("memory")
    if m and "rss_ratio" in m:
        s += (f"; peak extra {m['original']['rss_peak_extra_mb']:.0f} → "
              f"{m['optimized']['rss_peak_extra_mb']:.0f} MB")
    elif m:
        s += f"; memory: {m['original'].get('error') or m['optimized'].get('error')}"
    return s


def problems(results: list[dict], tol: float = 1e-4) -> list[str]:
    """Everything that contradicts the issue's expectations."""
    out = []
    for r in results:
        for row in r["rows"]:
            t, where = row["time"], f"{r['model']} N={row['n']}"
            if "error" in t:
                out.append(f"{where}: timing failed: {t['error']}")
                continue
            if not t.get("info", {}).get("all_fused"):
                out.append(f"{where}: not every site fused: {t.get('info')}")
            if not t["rel_error"] <= tol:
                out.append(f"{where}: outputs differ, rel error {t['rel_error']:.2e} > {tol:.0e}")
            if t["speedup_of_medians"] < 1.0:
                out.append(f"{where}: optimized slower (speedup of medians "
                           f"{t['speedup_of_medians']:.3f}, per-round "
                           f"{t['speedup_per_round_min']:.2f}–{t['speedup_per_round_max']:.2f})")
            m = row.get("memory")
            if not m:
                continue
            for which in ("original", "optimized"):
                if "error" in m[which]:
                    out.append(f"{where}: memory measurement of {which} failed: "
                               f"{m[which]['error']}")
            if m.get("optimized_materialises_nxn"):
                out.append(f"{where}: optimized model allocated a tensor >= heads×N×N fp32 "
                           f"({m['optimized']['largest_alloc_mb']:.0f} MB)")
    return out


_fmt = _common.fmt_number


def markdown(results: list[dict], machine: dict) -> str:
    """The README tables."""
    load_end = machine.get("load_average_at_end", [math.nan])[0]
    lines = [
        "Original vs `attnopt.optimize` (exact fusion), CPU, fp32, batch 1, "
        f"torch {machine['torch']}, {machine['torch_threads']} threads ({machine['cpu']}, "
        f"{machine['os_cpu_count']} cores shared with other jobs: load average "
        f"{machine['load_average_1_5_15'][0]:.1f}–{load_end:.1f} at "
        "start–end, so absolute times are inflated; compare within a row only). "
        "Time: median of interleaved rounds, both models in one process (one per case); "
        "speedup = ratio of medians. "
        "Peak: resident-set peak during one call minus the resident set before it "
        "(fresh process per case, weights and inputs allocated first). Memory ratio = "
        "original / optimized peak.",
        "",
    ]
    for r in results:
        lines += [f"**{r['model']}**" + (" — heads 12, head dim 64, hidden 768"
                                         if r["kind"] == "hand" else
                                         " — hidden 768, 12 heads, last N/8 tokens padded"), ""]
        lines += ["| N | original ms | optimized ms | speedup | original peak MB | "
                  "optimized peak MB | memory ratio | max rel. error |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            t, m = row["time"], row.get("memory") or {}
            o, f = m.get("original", {}), m.get("optimized", {})
            ratio = m.get("rss_ratio")
            if "error" in t:
                lines.append(f"| {row['n']} | timing failed: {t['error'][:80]} ||||||| ")
                continue
            lines.append(
                f"| {row['n']} | {_fmt(t['original']['median_ms'])} | "
                f"{_fmt(t['optimized']['median_ms'])} | {t['speedup_of_medians']:.2f}× | "
                f"{_fmt(o.get('rss_peak_extra_mb'), 0)} | {_fmt(f.get('rss_peak_extra_mb'), 0)} | "
                f"{(_fmt(ratio) + '×') if ratio else '–'} | {t['rel_error']:.1e} |")
        lines.append("")
    mem_rows = [(r, row) for r in results for row in r["rows"]
                if row.get("memory", {}).get("optimized", {}).get("largest_alloc_mb")
                is not None]
    if mem_rows:
        lines += [
            "No N×N tensor at run time: largest single allocation during one call (from "
            "`torch.profiler`), against one fp32 `12 × N × N` score tensor.",
            "",
            "| model | N | 12·N·N fp32 MB | original largest alloc MB | "
            "optimized largest alloc MB | optimized peak / score tensor |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r, row in mem_rows:
            m = row["memory"]
            lines.append(
                f"| {r['model']} | {row['n']} | {_fmt(m['score_tensor_mb'], 0)} | "
                f"{_fmt(m['original']['largest_alloc_mb'])} | "
                f"{_fmt(m['optimized']['largest_alloc_mb'])} | "
                f"{m['optimized_rss_over_score']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N ≤ 2048, BERT at 512, short budgets")
    p.add_argument("--seq-lens", type=int, nargs="+", help="hand-written attention lengths")
    p.add_argument("--bert-seq-lens", type=int, nargs="+", help="BERT lengths")
    p.add_argument("--no-causal", action="store_true", help="skip the causal variant")
    p.add_argument("--no-bert", action="store_true", help="skip the BERT end-to-end benchmark")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory subprocesses")
    p.add_argument("--no-profile", action="store_true",
                   help="peak RSS only (no profiler call for the largest allocation)")
    p.add_argument("--budget", type=float, help="seconds of timing rounds per case")
    p.add_argument("--max-reps", type=int, help="most timing rounds per case (default 40)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's default, = cores)")
    p.add_argument("--out", type=Path, help="output prefix (default results/fused[_quick])")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory subprocesses too

    quick = args.quick
    seq_lens = args.seq_lens or ([512, 1024, 2048] if quick else [512, 1024, 2048, 4096, 8192])
    bert_lens = args.bert_seq_lens or ([512] if quick else [512, 2048])
    budget = args.budget or (4.0 if quick else 20.0)
    max_reps = args.max_reps or (5 if quick else 40)
    out = args.out or RESULTS / ("fused_quick" if quick else "fused")
    memory, profile = not args.no_memory, not args.no_profile

    machine = _common.machine_info()
    print(f"torch {machine['torch']}, {machine['torch_threads']} threads, timing allocator "
          f"{machine['allocator_env_timing']}, load {machine['load_average_1_5_15']}", flush=True)
    t0 = time.perf_counter()
    results = [bench_hand(seq_lens, causal=False, budget_s=budget, max_reps=max_reps,
                          memory=memory, profile=profile)]
    if not args.no_causal:
        results.append(bench_hand(seq_lens, causal=True, budget_s=budget, max_reps=max_reps,
                                  memory=memory, profile=profile))
    if not args.no_bert:
        results.append(bench_bert(bert_lens, budget_s=budget * 1.5, max_reps=max_reps,
                                  memory=memory, profile=profile))
    machine["load_average_at_end"] = list(os.getloadavg())
    found = problems(results)
    doc = {"benchmark": "bench_fused", "issue": 2, "quick": quick,
           "total_s": round(time.perf_counter() - t0, 1), "machine": machine,
           "method": {
               "timing": "fresh subprocess per (model, N) holding both models, allocator env "
                         f"{_common.TUNED_ALLOCATOR_ENV}; the optimized model is made in it by "
                         "attnopt.optimize at opt_len and reused at N (dynamic sequence); first "
                         "call of each model checks outputs and is not timed, one more untimed "
                         "round when a round takes < 2 s; then interleaved rounds (order "
                         "alternates) filling the time budget; medians; speedup = "
                         "original/optimized median; per-round ratios also given",
               "memory": "fresh subprocess per (model, N), allocator env "
                         f"{_common.MEASURE_ALLOCATOR_ENV}; weights, inputs and a warm-up call "
                         f"at N={WARMUP_LEN} first; rss_peak_extra_mb = VmHWM (reset via "
                         "/proc/self/clear_refs) - VmRSS before the call; alloc_peak_extra_mb and "
                         "largest_alloc_mb from torch.profiler(profile_memory=True) allocation "
                         "events of a second call",
               "rel_error": "max |optimized - original| / max |original| over output tensors",
           },
           "results": results, "problems": found}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(results, machine)
    if found:
        md += "\nProblems:\n\n" + "\n".join(f"- {x}" for x in found) + "\n"
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} "
          f"in {doc['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
