"""FlexAttention paths of the sparse variants: sparse pattern → ``BlockMask`` → one fused kernel.

On CUDA the blocked torch kernels of ``_sparse`` (written for CPU caches) give way to
``torch.nn.attention.flex_attention``: the pattern becomes a ``BlockMask`` over tiles of
:data:`FLEX_BLOCK` × :data:`FLEX_BLOCK` scores (empty tiles skipped, full tiles computed without
a mask, partial tiles through the pattern's ``mask_mod``), and Inductor compiles one Triton kernel
per shape. Variants:
  * ``sliding_window`` / ``streaming`` / ``neighborhood2d``: static patterns; their block masks
    are built once per (pattern, lengths, device) and cached in :data:`_BLOCK_MASKS`;
  * ``block_topk``: the routed blocks (``block_topk.select_blocks``) are data-dependent, so the
    block mask is built per call straight from the selection table (O((N/block)²), no N×N).
The user's mask (padding, biases) goes into a ``score_mod``, so it applies to full tiles too.

Constraints: ``Dv == D`` and a block size of ``block_topk`` that divides or is a multiple of
:data:`FLEX_BLOCK`; otherwise the functions return None and the caller runs its blocked kernel.
Rows that see no key give 0, as in the blocked kernels.

FlexAttention also runs on CPU (Inductor's C++ backend), which is how the tests check these
paths against the references without a GPU; the variants' ops take it only on CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("attnopt")

#: tile side of the block masks (FlexAttention's default sparse block size).
FLEX_BLOCK = 128
#: query rows per step when a static pattern is evaluated into its tile tables.
_TABLE_ROWS = 1024
#: the compiled ``flex_attention`` (one per process; Dynamo keeps one graph per shape).
_COMPILED: Callable[..., torch.Tensor] | None = None
#: block masks of static patterns, by (pattern name, parameters, Lq, Lk, device).
_BLOCK_MASKS: dict[tuple, Any] = {}
#: compiled graphs kept per shape: the benchmark and tests see a few dozen (Dynamo's default
#: limit of 8 would send further shapes to eager FlexAttention, which builds the N×N scores).
_RECOMPILE_LIMIT = 128
_warned: set[str] = set()

Pattern = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _flex_module():
    from torch.nn.attention import flex_attention as fa

    return fa


def _compiled() -> Callable[..., torch.Tensor]:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_flex_module().flex_attention, dynamic=False)
    return _COMPILED


def _limit_patch():
    """A scoped raise of Dynamo's recompile limit (named ``cache_size_limit`` before 2.7)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(_RECOMPILE_LIMIT, getattr(cfg, name))})


# -- patterns (tensor ops only: evaluated on index grids and traced as mask_mods) ----------------


def band(lo: int, hi: int) -> Pattern:
    """Keys ``i - lo <= j <= i + hi`` (sliding windows)."""
    return lambda i, j: (i - j <= lo) & (j - i <= hi)


def sinks_band(sinks: int, window: int) -> Pattern:
    """Causal keys that are sinks (``j < sinks``) or in the recent window (streaming)."""
    return lambda i, j: (j <= i) & ((j < sinks) | (i - j < window))


def neighborhood(prefix: int, grid: tuple[int, int], kernel: int, dilation: int) -> Pattern:
    """NATTEN windows over a row-major ``h × w`` grid after ``prefix`` global tokens."""
    gh, gw = grid
    half = kernel // 2

    def axis(qa: torch.Tensor, ka: torch.Tensor, n: int) -> torch.Tensor:
        cls = qa % dilation
        size = (n - cls + dilation - 1) // dilation
        start = torch.minimum((qa // dilation - half).clamp(min=0), size - kernel)
        kk = ka // dilation
        return (ka % dilation == cls) & (kk >= start) & (kk < start + kernel)

    def pattern(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        qg, kg = (i - prefix).clamp(min=0), (j - prefix).clamp(min=0)
        inside = axis(qg // gw, kg // gw, gh) & axis(qg % gw, kg % gw, gw)
        return (i < prefix) | (j < prefix) | inside

    return pattern


# -- block masks -----------------------------------------------------------------------------------


def _ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts [..., nq], indices [..., nq, nk])`` int32 of a bool tile table, True first."""
    counts = table.sum(-1, dtype=torch.int32)
    idx = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, idx.to(torch.int32)


def _block_mask(any_: torch.Tensor, all_: torch.Tensor, mask_mod, lq: int, lk: int):
    """A ``BlockMask`` from tile tables ``[B|1, H|1, nq, nk]``: partial = any & ~all, full = all.

    Tiles crossing the end of the sequence are never full (their mask_mod sees the bounds).
    """
    fa = _flex_module()
    nq, nk = any_.shape[-2:]
    dev = any_.device
    inside = (((torch.arange(nq, device=dev) + 1) * FLEX_BLOCK <= lq)[:, None]
              & ((torch.arange(nk, device=dev) + 1) * FLEX_BLOCK <= lk)[None, :])
    full = all_ & inside
    kv_n, kv_i = _ordered(any_ & ~full)
    full_n, full_i = _ordered(full)
    # forward only: no transposed (query-block) tables; both keywords are recent additions
    for extra in ({"seq_lengths": (lq, lk), "compute_q_blocks": False},
                  {"seq_lengths": (lq, lk)}, {}):
        try:
            return fa.BlockMask.from_kv_blocks(kv_n, kv_i, full_n, full_i,
                                               BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, **extra)
        except TypeError:
            continue
    raise RuntimeError("BlockMask.from_kv_blocks rejected every signature tried")


def _static_tables(pattern: Pattern, lq: int, lk: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile tables ``[1, 1, nq, nk]`` (any, all) of a pattern, evaluated in row chunks."""
    nq, nk = -(-lq // FLEX_BLOCK), -(-lk // FLEX_BLOCK)
    rows = max(FLEX_BLOCK, _TABLE_ROWS // FLEX_BLOCK * FLEX_BLOCK)
    j = torch.arange(nk * FLEX_BLOCK, device=device)
    any_parts, all_parts = [], []
    for s in range(0, nq * FLEX_BLOCK, rows):
        i = torch.arange(s, min(s + rows, nq * FLEX_BLOCK), device=device)
        p = pattern(i[:, None], j[None, :])
        valid = (i[:, None] < lq) & (j[None, :] < lk)
        tiles = (p & valid).view(-1, FLEX_BLOCK, nk, FLEX_BLOCK)
        any_parts.append(tiles.any(3).any(1))
        all_parts.append((p | ~valid).view(-1, FLEX_BLOCK, nk, FLEX_BLOCK).all(3).all(1))
    return torch.cat(any_parts)[None, None], torch.cat(all_parts)[None, None]


def static_block_mask(key: tuple, pattern: Pattern, lq: int, lk: int, device: torch.device):
    """The cached ``BlockMask`` of a static pattern (built on first use per key and lengths)."""
    full_key = (*key, lq, lk, str(device))
    bm = _BLOCK_MASKS.get(full_key)
    if bm is None:
        any_, all_ = _static_tables(pattern, lq, lk, device)
        bm = _block_mask(any_, all_, lambda b, h, q, kv: pattern(q, kv), lq, lk)
        _BLOCK_MASKS[full_key] = bm
    return bm


def topk_block_mask(chosen: torch.Tensor, block: int, causal: bool, lq: int, lk: int):
    """The ``BlockMask`` of routed blocks: ``chosen`` ``[B, H, nqb, nkb]`` (True = attended).

    ``block`` must divide :data:`FLEX_BLOCK` or be a multiple of it.
    """
    nqb, nkb = chosen.shape[-2:]
    if block % FLEX_BLOCK == 0:
        r = block // FLEX_BLOCK
        any_ = all_ = chosen.repeat_interleave(r, -2).repeat_interleave(r, -1)
    else:
        r = FLEX_BLOCK // block
        padded = torch.nn.functional.pad(chosen, (0, -nkb % r, 0, -nqb % r))
        tiles = padded.unflatten(-1, (-1, r)).unflatten(-3, (-1, r))  # [B, H, nq, r, nk, r]
        any_ = tiles.any(-1).any(-2)
        all_ = tiles.all(-1).all(-2)
    nq, nk = -(-lq // FLEX_BLOCK), -(-lk // FLEX_BLOCK)
    any_, all_ = any_[..., :nq, :nk], all_[..., :nq, :nk]
    if causal:
        i = torch.arange(nq, device=chosen.device)[:, None]
        j = torch.arange(nk, device=chosen.device)[None, :]
        any_ = any_ & (j <= i)
        all_ = all_ & (j < i)

    def mask_mod(b, h, q, kv):
        hit = chosen[b, h, (q // block).clamp(max=nqb - 1), (kv // block).clamp(max=nkb - 1)]
        return hit & (kv <= q) if causal else hit

    return _block_mask(any_, all_, mask_mod, lq, lk)


# -- running ---------------------------------------------------------------------------------------


def _score_mod(mask: torch.Tensor | None, shape: tuple[int, int, int, int]):
    """The user's mask as a score_mod (bool: -inf where False; float: added)."""
    if mask is None:
        return None
    m = mask.expand(shape)
    lq, lk = shape[2] - 1, shape[3] - 1

    def at(b, h, q, kv):  # indices clamped: tiles past the end of the sequence read in bounds
        return m[b, h, q.clamp(max=lq), kv.clamp(max=lk)]

    if m.dtype == torch.bool:
        return lambda score, b, h, q, kv: torch.where(at(b, h, q, kv), score, float("-inf"))
    return lambda score, b, h, q, kv: score + at(b, h, q, kv)


def _capped(score_mod, softcap: float):
    """``softcap · tanh(score / softcap)`` first, then ``score_mod`` (the mask comes after the cap,
    as the models write it).
    """
    if score_mod is None:
        return lambda score, b, h, q, kv: softcap * torch.tanh(score / softcap)
    return lambda score, b, h, q, kv: score_mod(softcap * torch.tanh(score / softcap), b, h, q,
                                                kv)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
        block_mask, scale: float, softcap: float | None = None) -> torch.Tensor:
    """``flex_attention`` under ``block_mask`` and the user's 4-D ``mask``; ``[B, H, Lq, Dv]``.

    ``softcap``: cap the scaled scores as ``softcap · tanh(s / softcap)`` before the mask.
    """
    b, h, lq, _ = q.shape
    score_mod = _score_mod(mask, (b, h, lq, k.shape[2]))
    if softcap is not None:
        score_mod = _capped(score_mod, softcap)
    with _limit_patch():
        out = _compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=k.shape[1] != h)
    if mask is not None:
        out = out.nan_to_num(nan=0.0)  # rows whose every key the user's mask removed
    return out.contiguous()


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FlexAttention takes these operands (same head dim for k and v)."""
    return v.shape[-1] == q.shape[-1] and q.shape[-1] >= 16


def _guarded(name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """Run a flex path; on a compile / launch failure log once and return None (blocked kernel)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any Dynamo / Inductor / Triton failure
        if name not in _warned:
            _warned.add(name)
            log.warning("attnopt: FlexAttention path of %s failed (%s: %s); using the blocked "
                        "kernel", name, type(e).__name__, str(e).splitlines()[0][:200])
        return None


# -- the variants ----------------------------------------------------------------------------------


def _mask4(q, k, v, attn_mask):
    from attnopt.variants import _sparse

    return _sparse.check_operands(q, k, v, attn_mask)


def sliding_window(q, k, v, attn_mask, window: int, causal: bool, scale: float):
    """FlexAttention form of ``attnopt::sliding_window`` (None: not supported here)."""
    from attnopt.variants.sliding_window import band_reach

    mask = _mask4(q, k, v, attn_mask)
    lo, hi = band_reach(window, causal)
    lq, lk = q.shape[2], k.shape[2]
    return run(q, k, v, mask, static_block_mask(("band", lo, hi), band(lo, hi), lq, lk,
                                                q.device), scale)


def streaming(q, k, v, attn_mask, sinks: int, window: int, scale: float):
    """FlexAttention form of ``attnopt::streaming``."""
    mask = _mask4(q, k, v, attn_mask)
    lq, lk = q.shape[2], k.shape[2]
    bm = static_block_mask(("sinks", sinks, window), sinks_band(sinks, window), lq, lk, q.device)
    return run(q, k, v, mask, bm, scale)


def neighborhood2d(q, k, v, attn_mask, kernel: int, dilation: int, grid_h: int, grid_w: int,
                   scale: float):
    """FlexAttention form of ``attnopt::neighborhood2d`` (prefix tokens are global)."""
    mask = _mask4(q, k, v, attn_mask)
    length = q.shape[2]
    prefix = length - grid_h * grid_w
    if prefix < 0 or k.shape[2] != length:
        return None
    pattern = neighborhood(prefix, (grid_h, grid_w), kernel, dilation)
    bm = static_block_mask(("n2d", prefix, grid_h, grid_w, kernel, dilation), pattern, length,
                           length, q.device)
    return run(q, k, v, mask, bm, scale)


def block_topk(q, k, v, attn_mask, block: int, topk: int, causal: bool, own_block: bool,
               scale: float):
    """FlexAttention form of ``attnopt::block_topk`` (routing as in the blocked kernel)."""
    from attnopt.variants.block_topk import select_blocks

    if block % FLEX_BLOCK and FLEX_BLOCK % block:
        return None
    mask = _mask4(q, k, v, attn_mask)
    lq, lk = q.shape[2], k.shape[2]
    idx, valid = select_blocks(q, k, mask, block, topk, causal, own_block)
    nqb, nkb = -(-lq // block), -(-lk // block)
    chosen = torch.zeros(*idx.shape[:2], nqb, nkb + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(valid, idx, nkb), True)
    chosen = chosen[..., :nkb]
    if own_block:
        chosen |= torch.eye(nqb, nkb, dtype=torch.bool, device=q.device)
    return run(q, k, v, mask, topk_block_mask(chosen.contiguous(), block, causal, lq, lk), scale)


def softcap_attention(q, k, v, attn_mask, is_causal: bool, scale: float, softcap: float):
    """FlexAttention form of exact attention with soft-capped logits (Gemma-2): the cap is a
    ``score_mod``; causal sites skip the future tiles.
    """
    mask = _mask4(q, k, v, attn_mask)
    lq, lk = q.shape[2], k.shape[2]
    bm = static_block_mask(("causal",), band(lq + lk, 0), lq, lk, q.device) if is_causal \
        else None
    return run(q, k, v, mask, bm, scale, softcap=softcap)


def dispatch(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any
             ) -> torch.Tensor | None:
    """The variant op's CUDA path: its FlexAttention form, or None (run the blocked kernel).

    Args:
        name: ``sliding_window``, ``streaming``, ``block_topk``, ``neighborhood2d`` or
            ``softcap_attention``.
        q, k, v: canonical operands (see the op).
        *args: the op's remaining arguments, in its order.
    """
    if not supported(q, k, v):
        return None
    fn = globals()[name]
    return _guarded(name, lambda: fn(q, k, v, *args))
