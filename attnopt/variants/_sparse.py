"""Shared blocked math of the sparse variants: dense scores → scores over the keys a block needs.

``softmax(s·q kᵀ + mask) v`` restricted to a sparse pattern becomes, for every block of query
rows, ``softmax(s·q_blk k_selᵀ + bias) v_sel`` over the ``Kc`` key columns that block needs
(a band for sliding windows, sinks + band for streaming, the selected key blocks for block top-k,
a 2-D region for neighborhood attention). The structural bias (0 / -inf) cuts the block's
columns down to the exact pattern; the user's mask is gathered at the same positions.

Constraints and guarantees:
  * canonical operands: q ``[B, H, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]``,
    ``H % Hkv == 0``; mask None, bool (True = attend) or additive float, broadcastable to
    ``[B, H, Lq, Lk]`` (a key-padding mask ``[B, 1, 1, Lk]`` costs nothing extra);
  * no N×N tensor: the work is done in chunks of whole blocks whose scores fit in
    :data:`CHUNK_BYTES`; per chunk one ``bmm`` per key segment writing straight into its
    columns of the chunk's score buffer (key blocks are strided views of k where possible,
    gathered copies otherwise; keys shared by every block, like sinks, take one ``mm``), the
    structural -inf applied only where the pattern needs it, an in-place softmax, one ``bmm``
    per segment for ``P·V``. Time O(N·Kc·D), memory O(N·D) for the output plus a constant
    working set;
  * GQA: with ``fold`` the query heads of a kv group are stacked as rows of the same block, so
    the group's keys are read once and k / v are never repeated;
  * rows that see no key at all (possible only through the user's mask) give 0, not NaN.

The module also holds the slow reference (dense attention under a boolean pattern), helpers the
variants share to judge sites (causality, cross attention), and the ONNX building blocks of the
block-wise decompositions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from attnopt.export import _onnx_ops as ox
from attnopt.export._onnx_ops import const as _const
from attnopt.export._onnx_ops import ints as _ints
from attnopt.export._onnx_ops import ir, op, static
from attnopt.export._onnx_ops import scalar_f as _scalar_f
from attnopt.export._onnx_ops import scalar_i as _scalar_i
from attnopt.export._onnx_ops import static_dim as _static_or_none

if TYPE_CHECKING:
    from attnopt.sites import AttentionSite

#: working-set budget of one chunk's scores (the key / value gathers add at most as much again).
CHUNK_BYTES = 8 << 20
NEG_INF = float("-inf")
#: score rows are padded to a multiple of this many columns: odd row strides halve the speed of
#: the score matmul (measured: 28 vs 56 GFLOP/s at 1445 vs 1456 columns).
ALIGN = 16


def round_up(x: int, to: int = ALIGN) -> int:
    """``x`` rounded up to a multiple of ``to``."""
    return -(-x // to) * to


# -- operands --------------------------------------------------------------------------------------


def check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validate canonical operands; return the mask as a 4-D tensor (or None).

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]``.
        v: ``[B, Hkv, Lk, Dv]``.
        mask: None, bool or float, broadcastable to ``[B, H, Lq, Lk]``.

    Raises:
        ValueError: shapes that are not canonical.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D q, k, v, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q "
                         f"{tuple(q.shape)}")
    if k.shape[3] != d or k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)}: head dim must be {d} and kv heads must divide {h}")
    if mask is None:
        return None
    if mask.dim() > 4:
        raise ValueError(f"mask of rank {mask.dim()} cannot broadcast to [B, H, Lq, Lk]")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    full = (b, h, lq, k.shape[2])
    for have, want in zip(m.shape, full):
        if have not in (1, want):
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to {full}")
    return m


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the blocked kernels compute in (fp32 for half types, else q's)."""
    return q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32


# -- the reference ---------------------------------------------------------------------------------


def reference_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor | None, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Slow reference: dense attention under a boolean pattern (tests compare against it).

    Computes the full ``[B, H, Lq, Lk]`` scores in float64, so use it on small sizes only.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to the scores.
        allowed: bool pattern broadcastable to ``[B, H, Lq, Lk]`` (True = the variant computes
            this pair).
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]`` in q's dtype; rows that see no key are 0.
    """
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).double()
    v = v.repeat_interleave(rep, dim=1).double()
    s = (q.double() @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, NEG_INF) if attn_mask.dtype == torch.bool \
            else s + attn_mask.double()
    s = s.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(s, dim=-1).nan_to_num(nan=0.0)
    return (p @ v).to(q.dtype)


# -- the blocked kernel ----------------------------------------------------------------------------


@dataclass
class Segment:
    """One group of key columns of every block of a chunk.

    Attributes:
        k: ``[m, Kc_i, D]`` keys (a strided view of k or a gathered copy), or ``[Kc_i, D]``
            keys every block of the chunk shares (sinks, prefix tokens: one matmul per chunk).
        v: ``[m, Kc_i, Dv]`` or ``[Kc_i, Dv]`` values, same layout.
        pos: ``[m or 1, Kc_i]`` key positions in ``[0, Lk)`` (clamped; where the user's mask is
            read), or None when there is no mask to read. Columns outside the sequence must
            get -inf from the plan's bias.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor | None


@dataclass
class Chunk:
    """Where a chunk is: batch ``b``, head group ``g`` (kv head ``kvh``), blocks ``[s0, s1)``."""

    b: int
    g: int
    kvh: int
    s0: int
    s1: int
    k: torch.Tensor  # [Lk, D] keys of (b, kvh)
    v: torch.Tensor  # [Lk, Dv]
    runner: BlockedRunner

    @property
    def m(self) -> int:
        """Number of blocks in the chunk."""
        return self.s1 - self.s0


class Plan(Protocol):
    """What a sparse variant tells the blocked kernel (see the module docstring).

    Attributes:
        block: query rows of one block (per query head).
        nblk: number of query blocks.
        key_cols: ``Kc``, the number of score columns of every block (sum over segments).
        fold: stack the query heads of a kv group as rows (the plan's keys are per kv head).
        query_index: ``[nblk, block]`` query positions of each block (``>= Lq``: padding), or
            None for contiguous blocks (block s holds positions ``[s·block, (s+1)·block)``).
    """

    block: int
    nblk: int
    key_cols: int
    fold: bool
    query_index: torch.Tensor | None

    def chunks(self, max_blocks: int) -> Iterator[tuple[int, int]]:
        """Block ranges ``[s0, s1)`` of at most ``max_blocks`` blocks covering all blocks."""

    def segments(self, c: Chunk) -> list[Segment]:
        """The key segments of the chunk's blocks, in column order."""

    # Optional: ``prebias = True`` makes the kernel call ``bias`` before the score matmuls,
    # which then accumulate into it: ``bias`` must then initialise every element of ``s``.

    def bias(self, c: Chunk, s: torch.Tensor) -> None:
        """Apply the structural pattern to the chunk's scores ``s`` ``[m, Gf, block, Kc]`` in
        place (add -inf where a column is outside the block's pattern).
        """


def uniform_chunks(nblk: int, max_blocks: int, cuts: tuple[int, ...] = ()) -> Iterator[
        tuple[int, int]]:
    """Ranges of at most ``max_blocks`` blocks over ``[0, nblk)``, never crossing a cut."""
    edges = sorted({0, nblk, *(c for c in cuts if 0 < c < nblk)})
    for a, z in zip(edges, edges[1:]):
        for s0 in range(a, z, max_blocks):
            yield s0, min(z, s0 + max_blocks)


class BlockedRunner:
    """Runs a :class:`Plan` over every (batch, head group, chunk of blocks).

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]``.
        v: ``[B, Hkv, Lk, Dv]``.
        mask: None or a 4-D mask from :func:`check_operands`.
        scale: multiplier of the scores.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, scale: float) -> None:
        self.dtype = compute_dtype(q)
        self.q = q.to(self.dtype)
        self.k = k.to(self.dtype).contiguous()
        self.v = v.to(self.dtype).contiguous()
        self.mask = mask
        self.scale = float(scale)
        self.batch, self.heads, self.lq, self.dim = q.shape
        self.kv_heads, self.lk, self.vdim = k.shape[1], k.shape[2], v.shape[3]
        self.group = self.heads // self.kv_heads
        self._buffers: dict[str, torch.Tensor] = {}

    def scratch(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reusable buffer of ``shape`` (contents undefined), grown on demand."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=self.dtype, device=self.q.device)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def run(self, plan: Plan, out: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the plan's attention; return ``[B, H, Lq, Dv]`` in the compute dtype.

        Args:
            plan: the variant's plan.
            out: an output tensor ``[B, H, Lq, Dv]`` (compute dtype) whose rows the plan does not
                cover are kept (neighborhood attention fills its prefix rows itself).
        """
        gf = self.group if plan.fold else 1
        groups = self.kv_heads if plan.fold else self.heads
        rows = gf * plan.block
        if out is None:
            out = torch.empty(self.batch, self.heads, self.lq, self.vdim, dtype=self.dtype,
                              device=self.q.device)
        per_block = rows * plan.key_cols * self.q.element_size()
        max_blocks = max(1, CHUNK_BYTES // max(1, per_block))
        ranges = list(plan.chunks(max_blocks))
        for b in range(self.batch):
            for g in range(groups):
                kvh = g if plan.fold else g // self.group
                kb, vb = self.k[b, kvh], self.v[b, kvh]
                for s0, s1 in ranges:
                    self._chunk(plan, Chunk(b, g, kvh, s0, s1, kb, vb, self), gf, out)
        if self.mask is not None:
            out.nan_to_num_(nan=0.0)
        return out

    # -- one chunk -------------------------------------------------------------------------

    def _chunk(self, plan: Plan, c: Chunk, gf: int, out: torch.Tensor) -> None:
        m, blk, kc = c.m, plan.block, plan.key_cols
        rows = gf * blk
        heads = slice(c.g * gf, (c.g + 1) * gf)
        qpos = None if plan.query_index is None else plan.query_index[c.s0:c.s1]
        q = self._load_queries(c, heads, gf, blk, qpos)
        segs = plan.segments(c)
        s = self.scratch("scores", (m, rows, kc))
        s4 = s.view(m, gf, blk, kc)
        prebias = getattr(plan, "prebias", False)
        if prebias:
            plan.bias(c, s4)
        col = 0
        for seg in segs:
            width = seg.k.shape[-2]
            part = s[:, :, col:col + width]
            if seg.k.dim() == 2:  # keys shared by every block: one matmul for the chunk
                q2, part = q.reshape(-1, self.dim), part.view(-1, width)
                if prebias:
                    part.addmm_(q2, seg.k.t())
                else:
                    torch.mm(q2, seg.k.t(), out=part)
            elif prebias:
                part.baddbmm_(q, seg.k.transpose(1, 2))
            else:
                torch.bmm(q, seg.k.transpose(1, 2), out=part)
            col += width
        if not prebias:
            plan.bias(c, s4)
        if self.mask is not None:
            self._apply_mask(c, s4, heads, gf, blk, qpos, segs)
        torch.ops.aten._softmax.out(s, -1, False, out=s)
        direct = self._direct_output(c, out, heads, gf, blk, qpos)
        o = direct if direct is not None else self.scratch("out", (m, rows, self.vdim))
        col = 0
        for i, seg in enumerate(segs):
            width = seg.k.shape[-2]
            p = s[:, :, col:col + width]
            if seg.v.dim() == 2:
                p, o2 = p.view(-1, width), o.view(-1, self.vdim)
                if i == 0:
                    torch.mm(p, seg.v, out=o2)
                else:
                    o2.addmm_(p, seg.v)
            elif i == 0:
                torch.bmm(p, seg.v, out=o)
            else:
                o.baddbmm_(p, seg.v)
            col += width
        if direct is None:
            self._store(c, o, out, heads, gf, blk, qpos)

    def _load_queries(self, c: Chunk, heads: slice, gf: int, blk: int,
                      qpos: torch.Tensor | None) -> torch.Tensor:
        """The chunk's query rows ``[m, gf·blk, D]``, multiplied by the scale."""
        m = c.m
        qb = self.q[c.b, heads]  # [gf, Lq, D]
        buf = self.scratch("q", (m, gf, blk, self.dim))
        if qpos is not None:
            idx = qpos.reshape(-1).clamp(max=self.lq - 1)
            rows = qb.index_select(1, idx).view(gf, m, blk, self.dim)
            torch.mul(rows.transpose(0, 1), self.scale, out=buf)
            return buf.view(m, gf * blk, self.dim)
        start = c.s0 * blk
        n = min(c.s1 * blk, self.lq) - start
        src = qb[:, start:start + n]
        full = n // blk
        if full < m:
            buf[full:].zero_()
        if full:
            torch.mul(src[:, :full * blk].view(gf, full, blk, self.dim).transpose(0, 1),
                      self.scale, out=buf[:full])
        if n > full * blk:
            torch.mul(src[:, full * blk:], self.scale, out=buf[full, :, :n - full * blk])
        return buf.view(m, gf * blk, self.dim)

    def _direct_output(self, c: Chunk, out: torch.Tensor, heads: slice, gf: int, blk: int,
                       qpos: torch.Tensor | None) -> torch.Tensor | None:
        """The output rows of the chunk as a ``[m, blk, Dv]`` view when they can be written
        in place (one head per row block, whole blocks), else None.
        """
        if gf != 1 or qpos is not None or c.s1 * blk > self.lq:
            return None
        dst = out[c.b, heads.start, c.s0 * blk:c.s1 * blk]
        return dst.view(c.m, blk, self.vdim) if dst.is_contiguous() else None

    def _store(self, c: Chunk, o: torch.Tensor, out: torch.Tensor, heads: slice, gf: int,
               blk: int, qpos: torch.Tensor | None) -> None:
        m = c.m
        ob = out[c.b, heads]  # [gf, Lq, Dv]
        o4 = o.view(m, gf, blk, self.vdim)
        if qpos is not None:
            idx = qpos.reshape(-1)
            vals = o4.transpose(0, 1).reshape(gf, m * blk, self.vdim)
            keep = idx < self.lq
            if not bool(keep.all()):
                idx, vals = idx[keep], vals[:, keep]
            ob.index_copy_(1, idx, vals)
            return
        start = c.s0 * blk
        n = min(c.s1 * blk, self.lq) - start
        dst = ob[:, start:start + n]
        full = n // blk
        if full:
            dst[:, :full * blk].view(gf, full, blk, self.vdim).copy_(o4[:full].transpose(0, 1))
        if n > full * blk:
            dst[:, full * blk:].copy_(o4[full, :, :n - full * blk])

    def _apply_mask(self, c: Chunk, s4: torch.Tensor, heads: slice, gf: int, blk: int,
                    qpos: torch.Tensor | None, segs: list[Segment]) -> None:
        """Gather the user's mask at the chunk's (query, key) positions and apply it to ``s4``."""
        mask = self.mask
        mb = mask[c.b if mask.shape[0] > 1 else 0]
        mh = mb[heads] if mb.shape[0] > 1 else mb  # [gm, Lqm, Lkm]
        if mh.shape[1] > 1:
            if qpos is None:
                qpos = (torch.arange(c.s0 * blk, c.s1 * blk, device=mh.device)
                        .view(c.m, blk))
            qi = qpos.clamp(max=self.lq - 1)
        col = 0
        for seg in segs:
            width = seg.k.shape[-2]
            kp = seg.pos if mh.shape[2] > 1 else torch.zeros_like(seg.pos)
            if mh.shape[1] == 1:
                vals = mh[:, 0][:, kp].transpose(0, 1).unsqueeze(2)  # [m|1, gm, 1, w]
            else:
                vals = mh[:, qi[:, :, None], kp[:, None, :]].transpose(0, 1)  # [m, gm, blk, w]
            part = s4[..., col:col + width]
            if vals.dtype == torch.bool:
                part.masked_fill_(~vals, NEG_INF)
            else:
                part.add_(vals.to(part.dtype))
            col += width


def gather_keys(c: Chunk, pos: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the keys and values at ``pos`` ``[m, W]`` (clamped to ``[0, Lk)``) of the chunk.

    Returns:
        k ``[m, W, D]`` and v ``[m, W, Dv]`` in reusable buffers named after ``name``.
    """
    r = c.runner
    m, w = pos.shape
    idx = pos.reshape(-1)
    kb = r.scratch(f"{name}.k", (m * w, r.dim))
    vb = r.scratch(f"{name}.v", (m * w, r.vdim))
    torch.index_select(c.k, 0, idx, out=kb)
    torch.index_select(c.v, 0, idx, out=vb)
    return kb.view(m, w, r.dim), vb.view(m, w, r.vdim)


def strided_keys(c: Chunk, start: int, step: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the chunk's keys / values: block i reads ``[start + i·step, +width)``, no copy."""
    d, dv = c.k.shape[1], c.v.shape[1]
    k = c.k.as_strided((c.m, width, d), (step * d, d, 1), c.k.storage_offset() + start * d)
    v = c.v.as_strided((c.m, width, dv), (step * dv, dv, 1), c.v.storage_offset() + start * dv)
    return k, v


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``valid``, -inf elsewhere."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid,
                                                                                  NEG_INF)


# -- bands: sliding windows and streaming ----------------------------------------------------------


def band_block(reach: int) -> int:
    """Query block size for a band of ``reach + 1`` keys per query.

    A block of ``b`` rows reads ``b + reach`` key columns, so the wasted fraction is about
    ``b / reach``; below 32 rows the matmuls get inefficient. 128 rows is the measured sweet spot
    on CPU for windows of several hundred keys.
    """
    b = 1 << max(0, (max(1, reach) // 4).bit_length() - 1)
    return int(min(128, max(16, b)))


class BandPlan:
    """Keys ``j`` with ``-hi <= i - j <= lo`` (a band), plus optionally the first ``sinks`` keys.

    The band of query block s is the contiguous key range ``[s·b - lo, s·b + b + hi)``: for
    blocks whose range lies inside ``[sinks, Lk)`` it is a strided view of k (no copy), for the
    few blocks at the edges it is gathered and the positions outside the sequence get -inf.
    With ``sinks > 0`` (streaming, causal) the sink keys ``j < sinks`` form a second segment
    (visible when ``j <= i``), and the band only covers ``j >= sinks``, so no key counts twice.
    Both segments are padded to a multiple of :data:`ALIGN` columns (the padding is -inf) so the
    score rows and the band's columns stay aligned.

    Args:
        runner: the kernel (sizes, dtype, scratch buffers).
        lo: keys before the query (``i - j <= lo``).
        hi: keys after the query (``j - i <= hi``; 0 for causal bands).
        sinks: number of leading keys every query sees (causal).
        block: query rows per block (default :func:`band_block`).
    """

    fold = True
    query_index = None

    def __init__(self, runner: BlockedRunner, *, lo: int, hi: int, sinks: int = 0,
                 block: int | None = None) -> None:
        lq, lk = runner.lq, runner.lk
        # Reaches longer than the sequences change nothing (every such key is outside anyway).
        self.lo = max(0, min(lo, lq - 1))
        self.hi = max(0, min(hi, lk - 1))
        self.sinks = max(0, min(sinks, lk))
        self.block = block or band_block(lo + hi)
        self.block = min(self.block, 1 << max(0, (lq - 1).bit_length()))
        self.nblk = -(-lq // self.block)
        self.band = round_up(self.block + self.lo + self.hi)
        self.sink_cols = min(round_up(self.sinks), lk) if self.sinks else 0
        self.key_cols = self.band + self.sink_cols
        self.lk = lk
        self._dtype = runner.dtype
        dev = runner.q.device
        r = torch.arange(self.block, device=dev)[:, None]
        c = torch.arange(self.band, device=dev)[None, :]
        d = c - r
        self._pattern = key_bias((d >= 0) & (d <= self.lo + self.hi), runner.dtype)
        b = self.block
        # Blocks whose band lies inside [sinks, Lk): s·b - lo >= sinks, s·b - lo + band <= Lk.
        self._first = -(-(self.sinks + self.lo) // b)
        self._stop = (lk - self.band + self.lo) // b + 1
        self._offsets = torch.arange(self.band, device=dev)
        self._sink_pos = torch.arange(self.sink_cols, device=dev)

    def chunks(self, max_blocks: int) -> Iterator[tuple[int, int]]:
        """Uniform chunks that never mix interior and edge blocks."""
        return uniform_chunks(self.nblk, max_blocks, (self._first, self._stop))

    def _interior(self, c: Chunk) -> bool:
        return self._first <= c.s0 and c.s1 <= self._stop

    def _band_positions(self, c: Chunk) -> torch.Tensor:
        starts = torch.arange(c.s0, c.s1, device=self._offsets.device) * self.block - self.lo
        return starts[:, None] + self._offsets[None, :]

    def segments(self, c: Chunk) -> list[Segment]:
        """The band (strided view or gathered), then the sink keys (shared by all blocks)."""
        pos = self._band_positions(c)
        clamped = pos.clamp(0, self.lk - 1)
        if self._interior(c):
            k, v = strided_keys(c, c.s0 * self.block - self.lo, self.block, self.band)
        else:
            k, v = gather_keys(c, clamped, "band")
        segs = [Segment(k, v, clamped)]
        if self.sink_cols:
            w = self.sink_cols
            segs.append(Segment(c.k[:w], c.v[:w], self._sink_pos[None, :]))
        return segs

    def bias(self, c: Chunk, s: torch.Tensor) -> None:
        """Band: the band pattern, -inf outside ``[sinks, Lk)``; sinks: ``j < sinks, j <= i``."""
        band = s[..., :self.band]
        if self._interior(c):
            # Inside the band only two triangles fall outside the pattern: columns c < r on the
            # left, c > r + lo + hi on the right (plus the alignment columns).
            edge = self.block - 1
            right = self.lo + self.hi + 1
            if edge:
                band[..., :edge].add_(self._pattern[:, :edge])
            if right < self.band:
                band[..., right:].add_(self._pattern[:, right:])
        else:
            pos = self._band_positions(c)
            valid = (pos >= self.sinks) & (pos < self.lk)
            band.add_(self._pattern)
            band.add_(key_bias(valid, self._dtype)[:, None, None, :])
        if self.sink_cols:
            sink = s[..., self.band:]
            if self.sink_cols > self.sinks:
                sink[..., self.sinks:].fill_(NEG_INF)
            if c.s0 * self.block < self.sinks - 1:
                i = (torch.arange(c.s0 * self.block, c.s1 * self.block, device=s.device)
                     .view(c.m, 1, self.block, 1))
                j = torch.arange(self.sinks, device=s.device).view(1, 1, 1, -1)
                sink[..., :self.sinks].add_(key_bias(j <= i, self._dtype))


# -- sites -----------------------------------------------------------------------------------------


def site_is_causal(site: AttentionSite) -> bool:
    """True when the site is causal: ``is_causal``-like, or a causal window in its mask."""
    return site.causal or any(p.startswith("causal") for p in site.mask_kinds)


def common_refusal(site: AttentionSite) -> str | None:
    """Reasons every sparse variant shares for leaving a site exact (None: no objection)."""
    if not site.fusable:
        return site.reason
    return None


def valid_keys(mask: torch.Tensor | None, b: int, lk: int) -> torch.Tensor:
    """``[B, Lk]`` bool: keys some query may attend to (all True without a mask)."""
    if mask is None:
        return torch.ones(b, lk, dtype=torch.bool)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed.any(1).any(1).expand(b, lk).cpu()


def valid_query_rows(mask: torch.Tensor | None, b: int, lq: int, lk: int) -> torch.Tensor:
    """``[B, 1, Lq, 1]`` float64 row weights for calibration statistics: 0 for the padding
    query rows of self attention (positions no query attends to as a key), 1 elsewhere.
    """
    if mask is None or lq != lk:
        return torch.ones(b, 1, lq, 1, dtype=torch.float64)
    return valid_keys(mask, b, lk)[:, None, :, None].double()


def exact_pairs(lq: int, lk: int, causal: bool) -> int:
    """Query-key pairs exact attention computes (the denominator of a density)."""
    if not causal:
        return lq * lk
    n = min(lq, lk)
    return n * (n + 1) // 2 + max(0, lq - lk) * lk


def band_pairs(lq: int, lk: int, lo: int, hi: int) -> int:
    """Pairs ``(i, j)`` with ``-hi <= i - j <= lo``, ``0 <= j < lk`` for ``i < lq``."""
    i = torch.arange(lq, dtype=torch.int64)
    first = (i - lo).clamp(min=0)
    last = (i + hi).clamp(max=lk - 1)
    return int((last - first + 1).clamp(min=0).sum())


# -- ONNX building blocks --------------------------------------------------------------------------
#
# The decompositions below use standard opset-23 ops only. Sequence lengths may be dynamic; head
# counts and head sizes must be static. Every score tensor is ``[B, H, nblk, rows, Kc]`` with Kc
# the columns one block needs, never ``[.., L, L]``; K / V are repeated to the query heads (the
# ONNX graphs do not fold GQA groups into rows).


def _static(x: Any, axis: int, what: str) -> int:
    return static(x, axis, what, who="sparse attention")


def _length(x: Any, axis: int = 2) -> Any:
    """``[1]`` int64: the (possibly dynamic) size of ``x`` along ``axis``."""
    return op.Shape(x, start=axis, end=axis + 1)


def _where_bias(cond: Any) -> Any:
    """0 where ``cond``, -inf elsewhere (float32)."""
    return op.Where(cond, _scalar_f(0.0), _scalar_f(NEG_INF))


@dataclass
class OnnxOperands:
    """Canonical operands in an ONNX graph, cast to float32, k / v repeated to the query heads.

    Attributes:
        q: ``[B, H, Lq, D]`` multiplied by the scale.
        k: ``[B, H, Lk, D]``.
        v: ``[B, H, Lk, Dv]``.
        mask: None or an additive float ``[Bm, Hm, Lqm, Lkm]`` (rank 4).
        key_only: the mask does not depend on the query (``Lqm == 1`` statically).
        heads, dim, vdim: static sizes.
        dtype: the output dtype.
    """

    q: Any
    k: Any
    v: Any
    mask: Any
    key_only: bool
    heads: int
    dim: int
    vdim: int
    dtype: Any


def onnx_operands(q: Any, k: Any, v: Any, attn_mask: Any, scale: float) -> OnnxOperands:
    """Prepare canonical operands of an ONNX translation (see :class:`OnnxOperands`)."""
    h, d = _static(q, 1, "head count"), _static(q, 3, "head dim")
    hkv, dv = _static(k, 1, "kv head count"), _static(v, 3, "value dim")
    dtype = q.dtype
    qf, kf, vf = (op.Cast(x, to=ir.DataType.FLOAT) for x in (q, k, v))
    qf = op.Mul(qf, _scalar_f(float(scale)))
    if hkv != h:
        g = h // hkv
        kf = op.Reshape(op.Expand(op.Unsqueeze(kf, _ints(2)), _ints(1, 1, g, 1, 1)),
                        _ints(0, h, -1, d))
        vf = op.Reshape(op.Expand(op.Unsqueeze(vf, _ints(2)), _ints(1, 1, g, 1, 1)),
                        _ints(0, h, -1, dv))
    mask, key_only = None, False
    if attn_mask is not None:
        rank = len(attn_mask.shape)
        m = attn_mask if rank == 4 else op.Unsqueeze(attn_mask, _ints(*range(4 - rank)))
        if attn_mask.dtype == ir.DataType.BOOL:
            mask = _where_bias(m)
        else:
            mask = op.Cast(m, to=ir.DataType.FLOAT)
        key_only = _static_or_none(m, 2) == 1
    return OnnxOperands(qf, kf, vf, mask, key_only, h, d, dv, dtype)


def _onnx_blocks(x: Any, block: int, width: int) -> tuple[Any, Any]:
    """``[B, H, L, W]`` → padded ``[B, H, nb, block, W]`` and ``nb`` (``[1]`` int64)."""
    n = _length(x)
    blk = _ints(block)
    nb = op.Div(op.Add(n, _ints(block - 1)), blk)
    pad = op.Sub(op.Mul(nb, blk), n)
    pads = op.Concat(_ints(0, 0, 0, 0, 0, 0), pad, _ints(0), axis=0)
    return op.Reshape(op.Pad(x, pads), op.Concat(_ints(0, 0), nb, _ints(block, width),
                                                  axis=0)), nb


def _onnx_row_mask(ops: OnnxOperands, block: int, cols: Any) -> Any:
    """The user's mask at (block row, key column) positions: ``[Bm, Hm, nb|1, block|1, C]``.

    Args:
        ops: operands (``ops.mask`` not None).
        block: rows per query block (rows are the query positions ``[0, Lq)`` in order).
        cols: ``[nb, C]`` (or ``[1, C]``) int64 key positions, clamped into ``[0, Lk)``.
    """
    m = ops.mask
    lkm = _static_or_none(m, 3)
    if ops.key_only:
        if lkm == 1:
            return op.Unsqueeze(m, _ints(2))                          # [Bm, Hm, 1, 1, 1]
        mk = op.Gather(op.Squeeze(m, _ints(2)), cols, axis=2)        # [Bm, Hm, nb|1, C]
        return op.Unsqueeze(mk, _ints(3))
    rows, _ = _onnx_blocks(m, block, -1)                              # [Bm, Hm, nb, b, Lkm]
    if lkm == 1:
        return rows
    return _onnx_gather_cols(rows, cols)


def _onnx_gather_cols(rows: Any, cols: Any) -> Any:
    """``rows [Bm, Hm, nb, R, Lk]`` at columns ``cols [nb|1, C]`` → ``[Bm, Hm, nb, R, C]``."""
    idx = op.Unsqueeze(cols, _ints(1))                                # [nb|1, 1, C]
    shape = op.Concat(op.Shape(rows, end=4), op.Shape(cols, start=1, end=2), axis=0)
    return op.GatherElements(rows, op.Expand(idx, shape), axis=4)


def _onnx_softmax_out(parts: list[tuple[Any, Any]], ops: OnnxOperands) -> Any:
    """``softmax(concat(scores)) · concat(values)`` over the parts; NaN rows → 0 under masks.

    Args:
        parts: ``(scores [.., rows, C_i], values [.., C_i, Dv])`` per key segment.
        ops: operands.
    """
    scores = parts[0][0] if len(parts) == 1 else op.Concat(*(s for s, _ in parts), axis=-1)
    p = op.Softmax(scores, axis=-1)
    out = None
    start = 0
    for s, vals in parts:
        width = op.Shape(s, start=-1)
        if len(parts) == 1:
            pi = p
        else:
            st = _ints(start) if isinstance(start, int) else start
            pi = op.Slice(p, st, op.Add(st, width), _ints(-1))
            start = op.Add(st, width)
        o = op.MatMul(pi, vals)
        out = o if out is None else op.Add(out, o)
    if ops.mask is not None:
        out = op.Where(op.IsNaN(out), _scalar_f(0.0), out)
    return out


def _onnx_finish(out: Any, ops: OnnxOperands, lq: Any) -> Any:
    """``[B, H, nb, rows, Dv]`` → ``[B, H, Lq, Dv]`` in the output dtype."""
    out = op.Reshape(out, _ints(0, ops.heads, -1, ops.vdim))
    out = op.Slice(out, _ints(0), lq, _ints(2))
    return op.Cast(out, to=ops.dtype)


def onnx_band_attention(q: Any, k: Any, v: Any, attn_mask: Any, *, lo: int, hi: int,
                        sinks: int, scale: float) -> Any:
    """Band (+ sinks) attention as a block-wise decomposition in standard ops.

    Query blocks of ``b`` rows (``band_block``) read the ``b + lo + hi`` keys of their band,
    gathered as ``[B, H, nb, Kc, D]``; the sinks are one extra ``[B, H, 1, s, D]`` segment.
    Largest tensors: the band scores ``[B, H, nb, b, Kc]`` and the gathered keys / values.
    Heads folded into the batch (``[1, B·H, L, D]``) run as ``B·H`` one-head sequences.
    """
    if ox.folded_heads(q, k, v, attn_mask):
        return ox.as_one_head_sequences(onnx_band_attention, q, k, v, attn_mask, lo=lo, hi=hi,
                                        sinks=sinks, scale=scale)
    ops = onnx_operands(q, k, v, attn_mask, scale)
    block = band_block(lo + hi)
    width = round_up(block + lo + hi)
    lq, lk = _length(ops.q), _length(ops.k)
    qb, nb = _onnx_blocks(ops.q, block, ops.dim)                      # [B, H, nb, b, D]
    starts = op.Sub(op.Mul(op.Range(_scalar_i(0), op.Squeeze(nb, _ints(0)), _scalar_i(1)),
                           _scalar_i(block)), _scalar_i(lo))
    pos = op.Add(op.Unsqueeze(starts, _ints(1)), _const(np.arange(width)[None, :]))  # [nb, Kc]
    valid = op.And(op.GreaterOrEqual(pos, _scalar_i(sinks)), op.Less(pos, lk))
    clamped = op.Max(op.Min(pos, op.Sub(lk, _ints(1))), _scalar_i(0))
    kg = op.Gather(ops.k, clamped, axis=2)                            # [B, H, nb, Kc, D]
    vg = op.Gather(ops.v, clamped, axis=2)
    r = np.arange(block)[:, None]
    c = np.arange(width)[None, :]
    pattern = np.where((c - r >= 0) & (c - r <= lo + hi), 0.0, -np.inf).astype(np.float32)
    s = op.MatMul(qb, op.Transpose(kg, perm=[0, 1, 2, 4, 3]))        # [B, H, nb, b, Kc]
    s = op.Add(op.Add(s, _const(pattern)), op.Unsqueeze(_where_bias(valid), _ints(1)))
    if ops.mask is not None:
        s = op.Add(s, _onnx_row_mask(ops, block, clamped))
    parts = []
    if sinks:
        ks = op.Slice(ops.k, _ints(0), _ints(sinks), _ints(2))       # [B, H, s, D]
        vs = op.Slice(ops.v, _ints(0), _ints(sinks), _ints(2))
        ss = op.MatMul(qb, op.Unsqueeze(op.Transpose(ks, perm=[0, 1, 3, 2]), _ints(2)))
        i = op.Add(op.Unsqueeze(op.Mul(op.Range(_scalar_i(0), op.Squeeze(nb, _ints(0)),
                                                _scalar_i(1)), _scalar_i(block)), _ints(1, 2)),
                   _const(np.arange(block)[:, None]))                  # [nb, b, 1]
        j = op.Range(_scalar_i(0), op.Squeeze(_length(ks), _ints(0)), _scalar_i(1))
        ss = op.Add(ss, _where_bias(op.LessOrEqual(j, i)))
        if ops.mask is not None:
            scols = op.Unsqueeze(j, _ints(0))                         # [1, s]
            ss = op.Add(ss, _onnx_row_mask(ops, block, scols))
        parts.append((ss, op.Unsqueeze(vs, _ints(2))))
    parts.append((s, vg))
    return _onnx_finish(_onnx_softmax_out(parts, ops), ops, lq)


#: longest static sequence for which ``com.microsoft.GroupQueryAttention`` is used: its CPU
#: kernel computes and stores the full ``S × S`` probabilities even with a local window
#: (measured, ORT 1.31: 3.3 GB and 6 s at S = 8192, 12 heads), so longer or dynamic sequences
#: take the block-wise decomposition.
GQA_MAX_LEN = 2048


def gqa_fits(q: Any, k: Any, v: Any) -> bool:
    """True when ``GroupQueryAttention`` can serve these operands well (see ``GQA_MAX_LEN``)."""
    dims = [_static_or_none(q, a) for a in (1, 2, 3)] + [_static_or_none(k, 1),
                                                         _static_or_none(k, 2),
                                                         _static_or_none(v, 3)]
    if any(d is None for d in dims):
        return False
    h, lq, d, hkv, lk, dv = dims
    return lq == lk and lq <= GQA_MAX_LEN and d == dv and h % hkv == 0


def onnx_gqa_local(q: Any, k: Any, v: Any, *, window: int, scale: float) -> Any:
    """Causal local attention as ``com.microsoft.GroupQueryAttention(local_window_size)``.

    ORT's semantics (measured): key j is visible to query i iff ``i - window < j <= i`` — the
    last ``window`` keys including the query, exactly :class:`SlidingWindow`'s causal window.
    Inputs are ``[B, S, H·D]``; without a past cache ``seqlens_k = S - 1`` for every batch row and
    ``total_sequence_length = S``.
    """
    from attnopt.export._registry import msft

    h, s, d = (_static(q, a, "size") for a in (1, 2, 3))
    hkv = _static(k, 1, "kv head count")
    dtype = q.dtype
    q3, k3, v3 = (op.Reshape(op.Transpose(op.Cast(x, to=ir.DataType.FLOAT), perm=[0, 2, 1, 3]),
                             _ints(0, 0, -1)) for x in (q, k, v))
    batch = op.Shape(q3, start=0, end=1)
    seqlens = op.Expand(op.Constant(value=ir.tensor(np.array([s - 1], dtype=np.int32))), batch)
    total = op.Constant(value=ir.tensor(np.array(s, dtype=np.int32)))
    out = msft().GroupQueryAttention(q3, k3, v3, None, None, seqlens, total, num_heads=h,
                                     kv_num_heads=hkv, local_window_size=window,
                                     scale=float(scale))[0]
    out = op.Transpose(op.Reshape(out, _ints(0, 0, h, d)), perm=[0, 2, 1, 3])
    return op.Cast(out, to=dtype)
