"""Feature maps of linear attention: q, k ``[B, H, L, D]`` → φ(q), φ(k) ``[B, H, L, F]``; fit.

Linear attention replaces ``softmax(s·q kᵀ)`` by ``φ(q) φ(k)ᵀ`` (normalised over the keys), so
that ``φ(K)ᵀ V`` can be computed once, in O(N). This module holds the maps and nothing else:

  * ``elu``: ``elu(x) + 1`` (Katharopoulos et al.); ``x`` is q or k unscaled, F = D.
  * ``relu``: ``relu(x)``; homogeneous, so the softmax scale would cancel; F = D.
  * ``performer``: positive orthogonal random features of ``exp(s·q·k)`` (FAVOR+),
    ``exp(ω·x − |x|²/2)`` with ``x = √s·q``, a fixed seed and F = ``features`` (default 4·D).
    Queries subtract their own max feature logit and keys the max over the keys of a head (both
    cancel in the normalised output), so nothing overflows in fp32.
  * ``taylor``: the 2nd-order Taylor expansion of ``exp(s·q·k)`` (Based),
    ``[1, x, x⊗x/√2]`` with ``x = √s·q``, the symmetric outer product stored once:
    F = 1 + d + d(d+1)/2 (d = D, or the fitted projection size).
  * ``learned``: a per-head linear layer followed by a softmax over features
    (Hedgehog / LoLCATs): ``[softmax(z), softmax(−z)]`` with ``z = (√s·x) W + b``, F = 2m.

Every map can be preceded by a per-head linear projection ``x ← x W + b`` (``W: [H, D, m]``,
separate for queries and keys, keys per kv head). ``fit`` learns it on calibration data by
*attention transfer*: the linear attention's output is trained to match the exact softmax
attention's output of the same layer (relative MSE, Adam). For ``learned`` the projection *is* the
map; for the fixed maps it is an optional calibration (identity-initialised).

Constraints: every map is non-negative, so the normaliser ``Σ_j φ(q)·φ(k_j)`` is ≥ 0 and the output
is a convex combination of values; features are computed in fp32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

log = logging.getLogger("attnopt")

FeatureMap = Literal["elu", "relu", "performer", "taylor", "learned"]
FEATURE_MAPS: tuple[str, ...] = get_args(FeatureMap)

#: maps whose input is ``√scale·x`` (they approximate ``exp(scale·q·k)``); elu / relu take ``x``.
SCALED_MAPS = frozenset({"performer", "taylor", "learned"})

#: key logits below this are treated as masked out when a map needs a maximum over keys.
NEG_INF = float("-inf")


@dataclass(frozen=True)
class MapParams:
    """Everything that defines φ for one site.

    Attributes:
        name: the feature map.
        scale: the softmax scale ``s`` of the site.
        wq, bq: query projection ``[H, D, m]`` and bias ``[H, m]`` (None: no projection).
        wk, bk: key projection ``[Hkv, D, m]`` and bias ``[Hkv, m]`` (None: no projection).
        omega: performer random features ``[m, M]`` (``m`` = projected dim), else None.
    """

    name: str
    scale: float
    wq: torch.Tensor | None = None
    bq: torch.Tensor | None = None
    wk: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    omega: torch.Tensor | None = None

    def in_dim(self, head_dim: int) -> int:
        """Size of the vectors entering the map (the projection size, or ``head_dim``)."""
        return head_dim if self.wq is None else self.wq.shape[-1]

    def feature_dim(self, head_dim: int) -> int:
        """F, the number of features per head."""
        return feature_dim(self.name, self.in_dim(head_dim),
                           None if self.omega is None else self.omega.shape[-1])


def feature_dim(name: str, d: int, random_features: int | None = None) -> int:
    """F for map ``name`` on ``d``-dimensional inputs (``random_features``: performer's M)."""
    if name in ("elu", "relu"):
        return d
    if name == "performer":
        return random_features or 4 * d
    if name == "taylor":
        return 1 + d + d * (d + 1) // 2
    if name == "learned":
        return 2 * d
    raise ValueError(f"unknown feature map {name!r}")


def performer_omega(d: int, m: int, seed: int) -> torch.Tensor:
    """Orthogonal random features ``[d, m]`` (FAVOR+), deterministic in ``seed``.

    Blocks of ``d`` orthogonal directions (QR of a Gaussian matrix), each row rescaled by the norm
    of an independent Gaussian vector so that every column is marginally ``N(0, I)``.
    """
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(math.ceil(m / d), d, d, generator=gen, dtype=torch.float64)
    qmat, r = torch.linalg.qr(gauss)
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-uniform
    rows = qmat.transpose(-1, -2).reshape(-1, d)[:m]
    norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).T.contiguous().float()


def taylor_pairs(d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index pairs ``i <= j`` of the symmetric outer product and their coefficients.

    ``Σ_{i<=j} c_ij² q_i q_j k_i k_j = (q·k)² / 2`` with ``c_ii = 1/√2`` and ``c_ij = 1`` (i < j).
    """
    i, j = torch.triu_indices(d, d)
    coef = torch.where(i == j, torch.tensor(0.5 ** 0.5), torch.tensor(1.0))
    return i, j, coef


def project(x: torch.Tensor, name: str, scale: float, w: torch.Tensor | None,
            b: torch.Tensor | None) -> torch.Tensor:
    """The map's input: ``[B, H, L, D]`` → ``[B, H, L, m]`` (scaled, then projected)."""
    x = x if x.dtype == torch.float64 else x.float()
    if name in SCALED_MAPS:
        x = x * math.sqrt(scale)
    if w is not None:
        x = torch.matmul(x, w.to(x.dtype))
        if b is not None:
            x = x + b.to(x.dtype).unsqueeze(-2)
    return x


def query_features(q: torch.Tensor, p: MapParams) -> torch.Tensor:
    """φ(q): ``[B, H, L, D]`` → ``[B, H, L, F]`` (fp32)."""
    x = project(q, p.name, p.scale, p.wq, p.bq)
    if p.name == "performer":
        logits = _performer_logits(x, p.omega)
        return torch.exp(logits - logits.amax(-1, keepdim=True))
    return _elementwise_map(p.name, x)


def key_logit_max(k: torch.Tensor, p: MapParams, key_weight: torch.Tensor | None
                  ) -> torch.Tensor | None:
    """Performer's key shift: max logit over keys and features per ``[B, Hkv]`` (None otherwise).

    Masked keys (weight 0) are left out so that they cannot push real keys into underflow.
    """
    if p.name != "performer":
        return None
    logits = _performer_logits(project(k, p.name, p.scale, p.wk, p.bk), p.omega)
    if key_weight is not None:
        logits = logits.masked_fill(key_weight == 0, NEG_INF)
    return logits.amax((-2, -1), keepdim=True)


def key_features(k: torch.Tensor, p: MapParams, key_weight: torch.Tensor | None,
                 shift: torch.Tensor | None) -> torch.Tensor:
    """φ(k) times the key weights: ``[B, Hkv, L, D]`` → ``[B, Hkv, L, F]`` (fp32).

    Args:
        k: keys ``[B, Hkv, L, D]``.
        p: the map.
        key_weight: ``[B | 1, Hkv | 1, L, 1]`` non-negative weights (0 = masked key) or None.
        shift: performer's key shift from :func:`key_logit_max` (``[B, Hkv, 1, 1]``).
    """
    x = project(k, p.name, p.scale, p.wk, p.bk)
    if p.name == "performer":
        logits = _performer_logits(x, p.omega)
        shift = shift if shift is not None else logits.amax((-2, -1), keepdim=True)
        phi = torch.exp(logits - shift.clamp_min(-1e30))
    else:
        phi = _elementwise_map(p.name, x)
    return phi if key_weight is None else phi * key_weight


def _performer_logits(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, omega.to(x.dtype)) - 0.5 * x.square().sum(-1, keepdim=True)


def _elementwise_map(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "elu":
        # elu(x) + 1 = exp(min(x, 0)) + max(x, 0): faster than F.elu (no expm1) on CPU.
        if x.requires_grad and torch.is_grad_enabled():
            return x.clamp_max(0).exp() + x.clamp_min(0)
        return x.clamp_max(0).exp_().add_(x.clamp_min(0))
    if name == "relu":
        return F.relu(x)
    if name == "taylor":
        # Row r of the upper triangle is x_r·x[r:], in taylor_pairs' order (slices, not a
        # gather: much cheaper to differentiate when fitting).
        d = x.shape[-1]
        _, _, coef = taylor_pairs(d)
        quad = torch.cat([x[..., r:r + 1] * x[..., r:] for r in range(d)], dim=-1)
        return torch.cat([torch.ones_like(x[..., :1]), x, quad * coef.to(x)], dim=-1)
    if name == "learned":
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1)
    raise ValueError(f"unknown feature map {name!r}")


# -- fitting (attention transfer) -------------------------------------------------------------


@dataclass(frozen=True)
class FittedMaps:
    """What ``Linear``'s ``fit`` returns for one site: the projections and the fit's losses.

    Attributes:
        wq, bq: ``[H, D, m]``, ``[H, m]``; wk, bk: ``[Hkv, D, m]``, ``[Hkv, m]``.
        loss_before: relative MSE of the output before fitting (identity / initial projection).
        loss_after: relative MSE after fitting (on the calibration samples).
        steps: optimisation steps taken.
    """

    wq: torch.Tensor
    bq: torch.Tensor
    wk: torch.Tensor
    bk: torch.Tensor
    loss_before: float
    loss_after: float
    steps: int


def initial_projection(heads: int, d: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity when ``m == d`` (the map starts as the unprojected one), else random orthonormal."""
    if m == d:
        w = torch.eye(d).expand(heads, d, d).clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        w = torch.linalg.qr(torch.randn(heads, max(d, m), max(d, m), generator=gen))[0]
        w = w[:, :d, :m].contiguous() * math.sqrt(max(d, m) / m)
    return w, torch.zeros(heads, m)


def pca_projections(samples: Sequence[dict[str, Any]], m: int, heads: int, kv_heads: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial projections ``wq [H, D, m]``, ``wk [Hkv, D, m]`` for a fit.

    ``m == D``: identity (the fit starts from the unprojected map). ``m < D``: per kv head, the
    top-``m`` eigenvectors of the second moment of its queries and keys, shared by q and k, so
    that ``(qW)·(kW)`` keeps the dominant part of ``q·k``. ``m > D``: identity plus small random
    columns.
    """
    d = samples[0]["q"].shape[-1]
    g = heads // kv_heads
    if m == d:
        eye = torch.eye(d)
        return eye.expand(heads, d, d).clone(), eye.expand(kv_heads, d, d).clone()
    if m > d:
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(kv_heads, d, m - d, generator=gen) / math.sqrt(d)
        w = torch.cat([torch.eye(d).expand(kv_heads, d, d), extra], -1)
    else:
        moment = torch.zeros(kv_heads, d, d, dtype=torch.float64)
        for s in samples:
            q = s["q"].detach().double()                      # [B, H, L, D]
            k = s["k"].detach().double()                      # [B, Hkv, L, D]
            qg = q.reshape(q.shape[0], kv_heads, g, q.shape[2], d).transpose(1, 0)
            kg = k.transpose(1, 0)
            moment += torch.einsum("jbgld,jbgle->jde", qg, qg) / qg[0].numel() * d
            moment += torch.einsum("jbld,jble->jde", kg, kg) / kg[0].numel() * d
        _, vecs = torch.linalg.eigh(moment)                   # ascending eigenvalues
        w = vecs[..., -m:].flip(-1).float()
    return w.repeat_interleave(g, 0).contiguous(), w.contiguous()


def _minibatch(sample: dict[str, Any], max_tokens: int, gen: torch.Generator) -> dict[str, Any]:
    """A random subset of the sample's batch rows with at most ``max_tokens`` query tokens."""
    b, lq = sample["q"].shape[0], sample["q"].shape[2]
    rows = max(1, max_tokens // max(lq, 1))
    if rows >= b:
        return sample
    idx = torch.randperm(b, generator=gen)[:rows]
    return {key: (t.index_select(0, idx) if isinstance(t, torch.Tensor) and t.dim() > 0
                  and t.shape[0] == b else t) for key, t in sample.items()}


def relative_mse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``mean((out − ref)²) / mean(ref²)`` (0 = exact)."""
    ref = ref.float()
    return (out - ref).square().mean() / ref.square().mean().clamp_min(1e-30)


def fit_projections(
    params: MapParams,
    samples: Sequence[dict[str, Any]],
    forward: Callable[[MapParams, dict[str, Any]], torch.Tensor],
    *,
    steps: int,
    lr: float,
    desc: str = "fit",
    max_tokens: int = 1024,
) -> FittedMaps:
    """Train ``params``' projections so that ``forward`` matches each sample's exact ``out``.

    Args:
        params: the map with initial projections (``wq, bq, wk, bk`` all set).
        samples: dicts with canonical ``q, k, v, mask, causal, scale`` and ``out [B, H, Lq, Dv]``.
        forward: linear attention of a sample with given params (differentiable in them).
        steps: Adam steps; each uses one sample, round robin (a random subset of its batch rows
            when it has more than ``max_tokens`` query tokens).
        lr: Adam learning rate.
        desc: label of the progress bar.
        max_tokens: query tokens per step (bounds the cost of a step).

    Returns:
        The best projections seen (the initial ones when fitting did not improve the loss).
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("fit needs at least one calibration sample")
    tensors = [t.detach().float().clone().requires_grad_(True)
               for t in (params.wq, params.bq, params.wk, params.bk)]
    opt = torch.optim.Adam(tensors, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr / 20)

    def current() -> MapParams:
        return replace(params, wq=tensors[0], bq=tensors[1], wk=tensors[2], bk=tensors[3])

    def total_loss() -> float:
        with torch.no_grad():
            losses = [relative_mse(forward(current(), s), s["out"]).item() for s in samples]
        return float(sum(losses) / len(losses))

    before = total_loss()
    best = (before, [t.detach().clone() for t in tensors])
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        # disable=None: a bar on a terminal, silent when output goes to a file or a pipe
        bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=None)
        for step in bar:
            sample = _minibatch(samples[step % len(samples)], max_tokens, gen)
            loss = relative_mse(forward(current(), sample), sample["out"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
    after = total_loss()
    if after < best[0]:
        best = (after, [t.detach().clone() for t in tensors])
    log.debug("%s: relative MSE %.4g -> %.4g in %d steps", desc, before, best[0], steps)
    wq, bq, wk, bk = best[1]
    return FittedMaps(wq, bq, wk, bk, loss_before=before, loss_after=best[0], steps=steps)
