"""Auto: choose a variant per site within a model-level accuracy budget.

    fast = attnopt.optimize(model, example_inputs,
                            attnopt.Auto(max_ppl_increase=0.05, calibration=[batch, ...]))
    print(fast.report.auto.table())          # the chosen plan, every evaluated point
    attnopt.optimize(model, example_inputs, fast.config)   # re-apply, no search

The budget is stated on the model's output, not per site: ``max_ppl_increase`` (causal LMs:
perplexity of the calibration batches may grow by at most this fraction) or ``min_cosine``
(any model: mean cosine similarity of the output vectors to the exact model's).

Search (each step is a real ``optimize`` + evaluation on the calibration batches):
  1. Candidates per site, cheapest first: for causal self-attention ``Streaming(sinks, window)``,
     for bidirectional attention ``SlidingWindow(window)``, with windows of 1/16, 1/8 and 1/4 of
     the calibration length; their cost is the measured time of their kernel at the site's
     shape (heads, head dim, calibration length) relative to the exact kernel (``costs``).
  2. Per level, cheapest first: every site still exact gets the level's variant in one trial
     run; its sites are ranked by the per-site error that run measured (the least sensitive
     first), and a binary search finds the largest prefix of them that keeps the model within
     the budget. Those sites keep the variant; the others go on to the next (more expensive)
     level, or stay exact.
  3. The final plan is confirmed end to end; every evaluated point (attention cost, metric) is
     kept for the Pareto table and plot.

The chosen plan is an ordinary :class:`attnopt.Config` whose overrides name each site's module
path (``fast.config``; saved with ``attnopt.save`` or ``Config.to_dict``), so re-applying it
needs no search and no calibration.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from attnopt.errors import ConfigError

log = logging.getLogger("attnopt.auto")

#: window sizes tried, as fractions of the calibration length (cheapest first).
WINDOW_FRACTIONS = (1 / 16, 1 / 8, 1 / 4)
SINKS = 4


@dataclass(frozen=True, kw_only=True)
class Auto:
    """An accuracy budget for :func:`attnopt.optimize`; see the module docstring.

    Attributes:
        max_ppl_increase: causal LMs: the largest accepted relative perplexity increase on the
            calibration batches (0.05 = +5 %).
        min_cosine: the smallest accepted mean cosine similarity of the outputs to the exact
            model's (encoders, any model).
        calibration: the batches the budget is measured on (example inputs with token ids for
            ``max_ppl_increase``); the example inputs when None (the report says so).
        window_fractions: candidate windows as fractions of the calibration length.
    """

    max_ppl_increase: float | None = None
    min_cosine: float | None = None
    # not compared, not saved with a report (attnopt.save): batches of tensors, not settings
    calibration: Any = field(default=None, compare=False)
    window_fractions: tuple[float, ...] = WINDOW_FRACTIONS

    def __post_init__(self) -> None:
        if (self.max_ppl_increase is None) == (self.min_cosine is None):
            raise ConfigError("Auto needs exactly one budget: max_ppl_increase=0.05 (causal LMs) "
                              "or min_cosine=0.99")
        if self.max_ppl_increase is not None and not self.max_ppl_increase >= 0:
            raise ConfigError(f"max_ppl_increase must be >= 0, got {self.max_ppl_increase!r}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ConfigError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if not self.window_fractions or not all(0 < f < 1 for f in self.window_fractions):
            raise ConfigError("window_fractions must be fractions in (0, 1), e.g. (1/8, 1/4)")

    def describe(self) -> str:
        """E.g. ``Auto(max_ppl_increase=0.05)``."""
        if self.max_ppl_increase is not None:
            return f"Auto(max_ppl_increase={self.max_ppl_increase})"
        return f"Auto(min_cosine={self.min_cosine})"


@dataclass
class AutoPoint:
    """One evaluated plan: its attention cost relative to exact, and its metric."""

    label: str
    cost: float
    metric: float
    within: bool
    chosen: bool = False


@dataclass
class AutoResult:
    """What the search chose and everything it measured (``fast.report.auto``).

    Attributes:
        budget: the :class:`Auto` it ran for.
        metric: ``"ppl_increase"`` or ``"cosine"``.
        exact_value: the exact model's perplexity (or 1.0 for cosine).
        plan: module path → variant label of the chosen plan ("exact" where left exact).
        cost: the chosen plan's attention cost relative to exact (measured kernel times).
        value: the chosen plan's metric (relative perplexity increase, or cosine).
        points: every evaluated plan.
        costs: measured kernel time per (variant, site shape) relative to exact.
        seconds: wall time of the search.
        notes: remarks (calibration defaulted, budget unmet, ...).
    """

    budget: Auto
    metric: str
    exact_value: float
    plan: dict[str, str] = field(default_factory=dict)
    cost: float = 1.0
    value: float = 0.0
    points: list[AutoPoint] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The chosen plan and the Pareto table of every evaluated point, as text."""
        unit = "ppl increase" if self.metric == "ppl_increase" else "cosine"
        lines = [f"{self.budget.describe()}: attention cost {self.cost:.3f} of exact "
                 f"({1 / self.cost:.2f}x lower), {unit} {self.value:.4f} "
                 f"(search {self.seconds:.0f}s, {len(self.points)} plans evaluated)"]
        counts: dict[str, int] = {}
        for v in self.plan.values():
            counts[v] = counts.get(v, 0) + 1
        lines.append("  plan: " + ", ".join(f"{v} x{n}" for v, n in sorted(counts.items())))
        lines.append(f"  {'cost':>6}  {unit:>12}  within  plan")
        for p in sorted(self.points, key=lambda p: p.cost):
            mark = " <- chosen" if p.chosen else ""
            lines.append(f"  {p.cost:6.3f}  {p.metric:12.4f}  {'yes' if p.within else 'no ':>6}"
                         f"  {p.label}{mark}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return {"budget": self.budget.describe(), "metric": self.metric,
                "exact_value": self.exact_value, "plan": self.plan, "cost": self.cost,
                "value": self.value, "seconds": self.seconds, "costs": self.costs,
                "notes": self.notes, "points": [p.__dict__ for p in self.points]}

    def to_json(self) -> str:
        """The result as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def plot(self, path: str) -> None:
        """Write a PNG of attention cost vs metric (every evaluated plan; the chosen one
        marked). Needs matplotlib.
        """
        try:
            import matplotlib
        except ImportError as e:
            raise ConfigError("AutoResult.plot needs matplotlib: pip install matplotlib") from e
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        pts = sorted(self.points, key=lambda p: p.cost)
        ax.scatter([p.cost for p in pts], [p.metric for p in pts],
                   c=["tab:green" if p.within else "tab:red" for p in pts], s=18)
        chosen = [p for p in pts if p.chosen]
        ax.scatter([p.cost for p in chosen], [p.metric for p in chosen], marker="*", s=160,
                   c="black", label="chosen")
        limit = (self.budget.max_ppl_increase if self.metric == "ppl_increase"
                 else self.budget.min_cosine)
        ax.axhline(limit, ls="--", c="gray", lw=1, label="budget")
        ax.set_xlabel("attention cost (measured kernel time, exact = 1)")
        ax.set_ylabel("perplexity increase" if self.metric == "ppl_increase" else "cosine")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# -- the search ----------------------------------------------------------------------------------


def optimize_auto(model: torch.nn.Module, example_inputs: Any, budget: Auto):
    """Search a plan within ``budget`` and return the model optimized with it (see module)."""
    from attnopt._inputs import normalize
    from attnopt.api import find_attention, optimize
    from attnopt.config import Config
    from attnopt.variants import Fused

    t_start = time.perf_counter()
    batches = budget.calibration
    notes = []
    if batches is None:
        batches = [example_inputs]
        notes.append("no calibration batches given: the budget was measured on the example "
                     "inputs")
    elif not isinstance(batches, (list, tuple)):
        batches = [batches]
    batches = [normalize(b) for b in batches]
    metric = "ppl_increase" if budget.max_ppl_increase is not None else "cosine"
    with torch.no_grad():
        ref_outputs = [_run(model, b) for b in batches]
    exact_value = _perplexity(ref_outputs, batches) if metric == "ppl_increase" else 1.0
    sites = [s for s in find_attention(model, example_inputs) if s.fusable]
    if not sites:
        raise ConfigError("Auto found no attention site it could rewrite in this model")
    length = _calibration_length(batches)
    result = AutoResult(budget=budget, metric=metric, exact_value=exact_value, notes=notes)
    cost_of = _CostModel(sites, length, result.costs)
    levels = _levels(sites, length, budget.window_fractions, cost_of)
    if not any(v is not None for level in levels for v in level.values()):
        notes.append(f"no candidate kernel is faster than exact attention at length {length} "
                     "(measured): every site left exact")

    def evaluate(assignment: dict[str, Any], label: str):
        """Optimize with ``assignment`` (location → variant), measure, record the point."""
        config = Config(overrides={loc: v for loc, v in assignment.items()}, verify=True)
        fast = optimize(model, example_inputs, config)
        with torch.no_grad():
            outs = [_run(fast, b) for b in batches]
        value = (_perplexity(outs, batches) / exact_value - 1 if metric == "ppl_increase"
                 else _cosine(ref_outputs, outs))
        within = _within(budget, value)
        result.points.append(AutoPoint(label, cost_of(assignment), value, within))
        log.info("auto: %s -> cost %.3f, %s %.4f (%s)", label, result.points[-1].cost, metric,
                 value, "within" if within else "over")
        return fast, value, within

    assignment: dict[str, Any] = {s.location: Fused() for s in sites}
    for level_index, level in enumerate(levels):
        open_sites = [s for s in sites if isinstance(assignment[s.location], Fused)
                      and level.get(s.location) is not None]
        if not open_sites:
            continue
        trial = dict(assignment)
        trial.update({s.location: level[s.location] for s in open_sites})
        fast, _, within = evaluate(trial, f"level {level_index}: all {len(open_sites)} open "
                                          f"sites")
        if within:
            assignment = trial
            continue
        errors = {r.site.location: (r.error.rel if r.error is not None else math.inf)
                  for r in fast.report.rows}
        ranked = sorted(open_sites, key=lambda s: errors.get(s.location, math.inf))
        lo, hi = 0, len(ranked) - 1  # the largest k with the first k sites within budget
        while lo < hi:
            k = (lo + hi + 1) // 2
            candidate = dict(assignment)
            candidate.update({s.location: level[s.location] for s in ranked[:k]})
            _, _, ok = evaluate(candidate, f"level {level_index}: {k} least sensitive sites")
            if ok:
                lo = k
            else:
                hi = k - 1
        assignment.update({s.location: level[s.location] for s in ranked[:lo]})

    config = Config(overrides=dict(assignment))
    fast, value, within = evaluate(assignment, "chosen plan (confirmed)")
    result.points[-1].chosen = True
    if not within:  # the confirmation differs from the search's own run: stay exact
        notes.append(f"the chosen plan measured {value:.4f} on confirmation, outside the "
                     "budget: every site left exact")
        result.points[-1].chosen = False
        assignment = {s.location: Fused() for s in sites}
        config = Config(overrides=dict(assignment))
        fast, value, within = evaluate(assignment, "exact (fallback)")
        result.points[-1].chosen = True
    elif all(isinstance(v, Fused) for v in assignment.values()) and any(
            v is not None for level in levels for v in level.values()):
        notes.append("no approximate variant fits the budget at any site: every site left "
                     "exact")
    result.plan = {loc: v.describe() if not isinstance(v, Fused) else "exact"
                   for loc, v in assignment.items()}
    result.cost = cost_of(assignment)
    result.value = value
    result.seconds = round(time.perf_counter() - t_start, 1)
    fast.report.auto = result
    fast.report.notes.append(f"{budget.describe()} chose this plan "
                             f"(attention cost {result.cost:.3f} of exact): "
                             "see report.auto.table()")
    fast.config = config  # the concrete plan: optimize(model, inputs, fast.config) re-applies it
    return fast


def _levels(sites, length: int, fractions, cost_of: _CostModel) -> list[dict[str, Any]]:
    """Per level (cheapest first), each site's candidate variant (None: none at this level, or
    its kernel is not faster than exact attention at this length: measured, not assumed).
    """
    from attnopt.variants import SlidingWindow, Streaming

    levels = []
    for frac in sorted(fractions):
        window = max(SINKS + 1, int(length * frac))
        level = {}
        for s in sites:
            if s.kind == "self" and (s.causal or any(k.startswith("causal")
                                                     for k in s.mask_kinds)):
                v = Streaming(sinks=SINKS, window=window)
            elif s.kind == "self":
                v = SlidingWindow(window=max(1, window // 2))  # ±window/2: the same key count
            else:
                v = None
            if v is not None and (v.can_apply(s) is not None or not cost_of.faster(s, v)):
                v = None
            level[s.location] = v
        levels.append(level)
    return levels


class _CostModel:
    """Attention cost of a plan: Σ measured kernel time of each site's variant / Σ exact time."""

    def __init__(self, sites, length: int, record: dict[str, float]) -> None:
        self.sites = sites
        self.length = length
        self.record = record
        self._cache: dict[tuple, float] = {}

    def __call__(self, assignment: dict[str, Any]) -> float:
        exact = sum(self._time(s, None) for s in self.sites)
        total = sum(self._time(s, assignment.get(s.location)) for s in self.sites)
        return total / exact if exact > 0 else 1.0

    def faster(self, site, variant) -> bool:
        """True when ``variant``'s kernel is faster than exact attention at ``site``'s shape."""
        return self._time(site, variant) < self._time(site, None)

    def _time(self, site, variant) -> float:
        from attnopt.variants import Fused

        if isinstance(variant, Fused):
            variant = None
        heads, kv, d = site.heads or 1, site.kv_heads or site.heads or 1, site.head_dim or 64
        key = (heads, kv, d, variant)
        if key not in self._cache:
            self._cache[key] = _kernel_seconds(heads, kv, d, self.length, variant)
            label = variant.describe() if variant is not None else "exact"
            exact = self._cache.get((heads, kv, d, None)) or self._time(site, None)
            self.record[f"{label} [H={heads}, Hkv={kv}, D={d}, L={self.length}]"] = round(
                self._cache[key] / exact, 4)
        return self._cache[key]


def _kernel_seconds(heads: int, kv_heads: int, dim: int, length: int, variant) -> float:
    """Best of 5 wall times of the variant's kernel (exact SDPA when None) on random operands
    (the minimum: on a shared machine, noise only ever adds time).
    """
    from attnopt.variants import SlidingWindow, Streaming

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g)
    k = torch.randn(1, kv_heads, length, dim, generator=g)
    v = torch.randn(1, kv_heads, length, dim, generator=g)
    ops, scale = torch.ops.attnopt, dim ** -0.5
    if variant is None:
        def run():
            return ops.attention(q, k, v, None, True, scale)
    elif isinstance(variant, Streaming):
        def run():
            return ops.streaming(q, k, v, None, variant.sinks, variant.window, scale)
    elif isinstance(variant, SlidingWindow):
        def run():
            return ops.sliding_window(q, k, v, None, variant.window, False, scale)
    else:
        raise ConfigError(f"Auto has no cost model for {variant.describe()}")
    with torch.no_grad():
        run()  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return min(times)


# -- metrics ---------------------------------------------------------------------------------------


def _run(model, inputs):
    return inputs.call(model)


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if logits is None and isinstance(out, torch.Tensor):
        logits = out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ConfigError("Auto(max_ppl_increase=...) needs a causal LM whose output has "
                          "logits [batch, length, vocab]; use Auto(min_cosine=...) otherwise")
    return logits


def _perplexity(outputs, batches) -> float:
    total, count = 0.0, 0
    for out, inputs in zip(outputs, batches):
        ids = inputs.kwargs.get("input_ids")
        if ids is None and inputs.args:
            ids = inputs.args[0]
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError("Auto(max_ppl_increase=...) needs calibration batches with token "
                              "ids ({'input_ids': LongTensor[B, L]})")
        logits = _logits(out)[:, :-1].float()
        target = ids[:, 1:].long()
        mask = inputs.kwargs.get("attention_mask")
        weights = (mask[:, 1:].float() if isinstance(mask, torch.Tensor)
                   else torch.ones_like(target, dtype=torch.float32))
        nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        total += float((nll * weights.flatten()).sum())
        count += float(weights.sum())
    return math.exp(total / max(count, 1.0))


def _first_tensor(out) -> torch.Tensor:
    for name in ("last_hidden_state", "logits"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise ConfigError("Auto(min_cosine=...) found no tensor in the model's output")


def _cosine(refs, outs) -> float:
    sims = []
    for r, o in zip(refs, outs):
        r, o = _first_tensor(r).float(), _first_tensor(o).float()
        sims.append(F.cosine_similarity(r.flatten(0, -2), o.flatten(0, -2), dim=-1,
                                        eps=1e-12).mean())
    return float(torch.stack(sims).mean())


def _within(budget: Auto, value: float) -> bool:
    if budget.max_ppl_increase is not None:
        return value <= budget.max_ppl_increase
    return value >= budget.min_cosine


def _calibration_length(batches) -> int:
    for b in batches:
        for t in (*b.args, *b.kwargs.values()):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                return int(t.shape[1])
    raise ConfigError("Auto could not read a sequence length from the calibration batches")
