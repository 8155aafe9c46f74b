"""Block top-k attention: canonical site → ``torch.ops.attnopt.block_topk`` (MoBA-style routing).

Keys are cut into blocks of ``block`` tokens and so are queries. For every query block a gate
scores each key block by ``mean(q_blk) · mean(k_blk)`` (the mean query of the block against the
block's mean key, as in MoBA / BiFormer's region routing) and the block attends to
  * its own key block (self attention; causal sites: only keys ``j <= i`` inside it), and
  * the ``k`` best-scoring other key blocks — on causal sites only blocks entirely in the past.
Each query head routes on its own (GQA: the selected blocks are read from the head's kv head).
Cost O(N·(k + 1)·block) for the attention plus O((N / block)²·D) for the gate.

Constraints:
  * self attention (causal or not), or non-causal cross attention (no own block: the ``k``
    best key blocks only); causal cross attention is refused;
  * masks: a key-padding mask (query-independent, ``[B, 1|H, 1, Lk]``) also steers the gate —
    the mean key is taken over unmasked keys and fully masked blocks are never selected; any mask
    is applied inside the selected blocks;
  * fewer than ``k`` candidate blocks (early query blocks of a causal site, short sequences):
    all candidates are taken.

Fast path: one gathered key segment ``[own block, selected blocks]`` per query block (token-level
``index_select``), one ``bmm`` for the scores and one for ``P·V`` per chunk of blocks.

ONNX: ``TopK`` on the gate, ``Gather`` of the selected key / value blocks, and batched attention
over ``[B, H, N/block, block, (k+1)·block]`` — standard opset-23 ops for both targets (ORT's CPU
``SparseAttention`` needs past/present buffers shared through IO binding, so it cannot serve a
plain session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from attnopt._match.masks import HARD_FILL
from attnopt.errors import ConfigError
from attnopt.export import _onnx_ops as ox
from attnopt.export._onnx_ops import ints as _ints
from attnopt.export._onnx_ops import ir, op
from attnopt.export._onnx_ops import scalar_f as _f
from attnopt.export._onnx_ops import scalar_i as _i
from attnopt.export._registry import onnx_translation
from attnopt.variants import _flex, _sparse
from attnopt.variants._base import SiteOperands, Variant, register

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite


@dataclass(frozen=True, kw_only=True)
class BlockTopK(Variant):
    """Per query block, attend to its own key block and the ``k`` best-scoring key blocks.

    Attributes:
        block: tokens per query block and per key block (e.g. 64).
        k: number of routed key blocks per query block (besides its own).
    """

    name = "block_topk"
    exact = False

    block: int
    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ConfigError(f"block must be a positive int (e.g. 64), got {self.block!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ConfigError(f"k must be an int >= 0 (e.g. 8), got {self.k!r}")


# -- routing ---------------------------------------------------------------------------------------


def _block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sums over consecutive blocks of dim -2: ``[..., L, D]`` → ``[..., ceil(L/block), D]``."""
    n = x.shape[-2]
    full = n // block
    parts = []
    if full:
        parts.append(x[..., :full * block, :].unflatten(-2, (full, block)).sum(-2))
    if n > full * block:
        parts.append(x[..., full * block:, :].sum(-2, keepdim=True))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def _key_weights(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B', Hm, Lk]`` 1 / 0 weights of a query-independent mask (None: no such mask)."""
    if mask is None or mask.shape[2] != 1 or mask.shape[3] == 1:
        return None
    m = mask[:, :, 0]
    keep = m if m.dtype == torch.bool else m > HARD_FILL
    return keep.float()


def select_blocks(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, block: int,
                  topk: int, causal: bool, own_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed key blocks of every query block.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]``.
        mask: None or a 4-D mask (see ``_sparse.check_operands``).
        block: block size.
        topk: blocks to select per query block.
        causal: only blocks strictly before the query block are candidates.
        own_block: the query block's own key block is attended anyway (not a candidate).

    Returns:
        ``idx`` ``[B, H, nqb, kk]`` key block indices and ``valid`` (same shape, bool: False
        where fewer than ``kk`` candidates exist), ``kk = min(topk, candidates)``.
    """
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    nqb, nkb = -(-lq // block), -(-lk // block)
    qf, kf = q.float(), k.float()
    q_cnt = (torch.arange(nqb, device=q.device) * block).neg().add(lq).clamp(max=block)
    q_mean = _block_sums(qf, block) / q_cnt[:, None]
    w = _key_weights(mask)
    if w is None:
        k_cnt = (torch.arange(nkb, device=k.device) * block).neg().add(lk).clamp(max=block)
        k_mean = (_block_sums(kf, block) / k_cnt[:, None]).repeat_interleave(g, dim=1)
        empty = None
    else:
        if w.shape[1] > 1:
            kf = kf.repeat_interleave(g, dim=1)
        cnt = _block_sums(w.unsqueeze(-1), block)  # [B', Hm, nkb, 1]
        k_mean = _block_sums(kf * w.unsqueeze(-1), block) / cnt.clamp(min=1)
        if k_mean.shape[1] != h:
            k_mean = k_mean.repeat_interleave(h // k_mean.shape[1], dim=1)
        empty = (cnt[..., 0] == 0).unsqueeze(2)  # [B', Hm, 1, nkb]
    gate = q_mean @ k_mean.transpose(-2, -1)  # [B, H, nqb, nkb]
    i = torch.arange(nqb, device=q.device)[:, None]
    j = torch.arange(nkb, device=q.device)[None, :]
    if causal:
        candidate = j < i
    elif own_block:
        candidate = j != i
    else:
        candidate = torch.ones(nqb, nkb, dtype=torch.bool, device=q.device)
    gate = gate.masked_fill(~candidate, _sparse.NEG_INF)
    if empty is not None:
        gate = gate.masked_fill(empty, _sparse.NEG_INF)
    kk = max(0, min(topk, nkb - (1 if own_block else 0)))
    vals, idx = gate.topk(kk, dim=-1)
    return idx, vals != _sparse.NEG_INF


def topk_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, block: int,
                 topk: int, causal: bool, own_block: bool) -> torch.Tensor:
    """The ``[B, H, Lq, Lk]`` bool pattern the routing selects (True = computed)."""
    lq, lk = q.shape[2], k.shape[2]
    idx, valid = select_blocks(q, k, mask, block, topk, causal, own_block)
    nqb, nkb = -(-lq // block), -(-lk // block)
    chosen = torch.zeros(*idx.shape[:2], nqb, nkb + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(valid, idx, nkb), True)
    chosen = chosen[..., :nkb]
    if own_block:
        chosen |= torch.eye(nqb, nkb, dtype=torch.bool, device=q.device)
    pattern = chosen.repeat_interleave(block, 2)[:, :, :lq].repeat_interleave(block, 3)[..., :lk]
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        pattern = pattern & (j <= i)
    return pattern


# -- the op ----------------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::block_topk", mutates_args=())
def block_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    block: int,
    topk: int,
    causal: bool,
    own_block: bool,
    scale: float,
) -> torch.Tensor:
    """Block top-k attention on canonical operands.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, Lq, Lk]``; applied inside the selected blocks (and steering the gate when
            it does not depend on the query).
        block: tokens per block.
        topk: routed key blocks per query block.
        causal: past blocks only, causal inside the own block (needs ``own_block``).
        own_block: attend to the query block's own key block (self attention).
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]``, contiguous; rows whose selected keys are all masked are 0.
    """
    if q.is_cuda and (out := _flex.dispatch("block_topk", q, k, v, attn_mask, block, topk, causal,
                                             own_block, scale)) is not None:
        return out
    mask = _sparse.check_operands(q, k, v, attn_mask)
    if causal and not own_block:
        raise ValueError("causal block top-k attends to the query's own block (own_block=True)")
    runner = _sparse.BlockedRunner(q, k, v, mask, scale)
    idx, valid = select_blocks(runner.q, runner.k, mask, block, topk, causal, own_block)
    plan = _TopKPlan(runner, idx, valid, block, causal, own_block)
    return runner.run(plan).to(q.dtype)


@block_topk.register_fake
def _(q, k, v, attn_mask, block, topk, causal, own_block, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def reference_block_topk(q, k, v, attn_mask=None, block: int = 64, topk: int = 1,
                         causal: bool = False, own_block: bool = True,
                         scale: float | None = None) -> torch.Tensor:
    """Slow reference of :func:`block_topk`: dense attention under the routed block pattern."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = _sparse.check_operands(q, k, v, attn_mask)
    allowed = topk_pattern(q, k, mask, block, topk, causal, own_block)
    return _sparse.reference_sparse(q, k, v, attn_mask, allowed, scale)


class _TopKPlan:
    """One gathered segment per query block: ``[own block?, selected blocks]`` (per query head).

    When ``Lk`` is a multiple of ``block`` and the blocks fill whole :data:`_sparse.ALIGN`
    groups of columns, the keys are gathered block by block (one index per key block, rows of
    ``block·D`` contiguous values) and the structural bias is applied only where needed: the
    causal triangle of the own block, and -inf on the unfilled slots of the few query blocks
    with fewer than ``k`` candidates. Otherwise keys are gathered token by token with a full
    bias (key positions past the end, alignment columns).
    """

    fold = False
    query_index = None
    #: score bytes of one chunk, below the runner's budget: the chunk's gathered keys and values
    #: then stay in cache between the gather and the matmuls (measured at 16k, block 64, k 8:
    #: about 9% faster than with 8 MiB chunks on the causal case).
    CHUNK_BYTES = 3 << 19

    def __init__(self, runner: _sparse.BlockedRunner, idx: torch.Tensor, valid: torch.Tensor,
                 block: int, causal: bool, own_block: bool) -> None:
        self.block = block
        self.nblk = -(-runner.lq // block)
        self.lk = runner.lk
        self.own = 1 if own_block else 0
        self.used = (self.own + idx.shape[-1]) * block
        self.key_cols = _sparse.round_up(self.used)
        self.idx, self.valid = idx, valid
        self.causal = causal
        self._dtype = runner.dtype
        self._elsize = runner.q.element_size()
        self._offsets = torch.arange(block, device=idx.device)
        upper = torch.ones(block, block, dtype=torch.bool, device=idx.device).triu(1)
        self._triangle = _sparse.key_bias(~upper, runner.dtype)
        self._needs_mask = runner.mask is not None
        #: whole key blocks, no alignment columns: gather by block, bias only where needed.
        #: (an own block past the last key block would need its keys masked: not here)
        self.by_block = (runner.lk % block == 0 and self.key_cols == self.used
                         and (not self.own or self.nblk * block <= runner.lk))
        if self.by_block:
            blocks = idx
            if self.own:
                own = torch.arange(self.nblk, device=idx.device)
                blocks = torch.cat([own.expand(*idx.shape[:2], -1)[..., None], idx], dim=-1)
            self._blocks = blocks.contiguous()
            #: per (batch, head): query blocks with an unfilled slot (their bias is needed).
            self._partial = (~valid).any(-1).tolist() if valid.numel() else None

    def chunks(self, max_blocks: int):
        """Uniform chunks of whole blocks, at most :attr:`CHUNK_BYTES` of scores each."""
        cap = max(1, self.CHUNK_BYTES // (self.block * self.key_cols * self._elsize))
        return _sparse.uniform_chunks(self.nblk, min(max_blocks, cap))

    def _positions(self, c: _sparse.Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.idx[c.b, c.g, c.s0:c.s1]
        valid = self.valid[c.b, c.g, c.s0:c.s1]
        if self.own:
            own = torch.arange(c.s0, c.s1, device=blocks.device)[:, None]
            blocks = torch.cat([own, blocks], dim=1)
            valid = torch.cat([torch.ones_like(own, dtype=torch.bool), valid], dim=1)
        pos = blocks[:, :, None] * self.block + self._offsets
        ok = (valid[:, :, None] & (pos < self.lk)).flatten(1)
        pos = pos.flatten(1)
        if self.key_cols > self.used:  # alignment columns: never seen
            pad = self.key_cols - self.used
            pos = torch.cat([pos, pos.new_zeros(pos.shape[0], pad)], dim=1)
            ok = torch.cat([ok, ok.new_zeros(ok.shape[0], pad)], dim=1)
        return pos.clamp(max=self.lk - 1), ok

    def segments(self, c: _sparse.Chunk) -> list[_sparse.Segment]:
        """The own and selected key blocks, gathered."""
        if not self.by_block:
            pos, _ = self._positions(c)
            k, v = _sparse.gather_keys(c, pos, "topk")
            return [_sparse.Segment(k, v, pos)]
        r, blk = c.runner, self.block
        blocks = self._blocks[c.b, c.g, c.s0:c.s1]  # [m, n]
        m, n = blocks.shape
        idx = blocks.reshape(-1)
        kb = r.scratch("topk.k", (m * n, blk * r.dim))
        vb = r.scratch("topk.v", (m * n, blk * r.vdim))
        torch.index_select(c.k.view(-1, blk * r.dim), 0, idx, out=kb)
        torch.index_select(c.v.view(-1, blk * r.vdim), 0, idx, out=vb)
        pos = None
        if self._needs_mask:
            pos = (blocks[:, :, None] * blk + self._offsets).flatten(1)
        return [_sparse.Segment(kb.view(m, n * blk, r.dim), vb.view(m, n * blk, r.vdim), pos)]

    def _partial_chunk(self, c: _sparse.Chunk) -> bool:
        return self._partial is not None and any(self._partial[c.b][c.g][c.s0:c.s1])

    def bias(self, c: _sparse.Chunk, s: torch.Tensor) -> None:
        """-inf for unselected slots and keys past the end; causal triangle in the own block."""
        if not self.by_block or self._partial_chunk(c):
            _, ok = self._positions(c)
            if not bool(ok.all()):
                s.add_(_sparse.key_bias(ok, self._dtype)[:, None, None, :])
        if self.causal:
            s[..., :self.block].add_(self._triangle)


# -- the implementation ----------------------------------------------------------------------------


def topk_pairs(lq: int, lk: int, block: int, topk: int, causal: bool, own_block: bool) -> int:
    """Pairs the routing computes at these sizes (selected blocks counted as full blocks)."""
    nqb, nkb = -(-lq // block), -(-lk // block)
    total = 0
    for i in range(nqb):
        rows = min(block, lq - i * block)
        if causal:
            own = rows * (rows + 1) // 2 + rows * max(0, min(i * block, lk) - i * block)
            cands = min(i, nkb)
        else:
            own = rows * max(0, min(block, lk - i * block)) if own_block else 0
            cands = nkb - (1 if own_block and i < nkb else 0)
        total += own + rows * min(topk, cands) * block
    return min(total, _sparse.exact_pairs(lq, lk, causal))


@register(BlockTopK)
class BlockTopKImpl:
    """Emits ``torch.ops.attnopt.block_topk``."""

    def can_apply(self, config: BlockTopK, site: AttentionSite) -> str | None:
        reason = _sparse.common_refusal(site)
        if reason:
            return reason
        if site.kind != "self" and _sparse.site_is_causal(site):
            return ("causal cross attention: a query block has no own key block to keep the "
                    "causal order; block top-k supports causal self attention and non-causal "
                    "cross attention")
        if site.kind != "self" and config.k == 0:
            return ("cross attention has no own block: k = 0 would attend to nothing; use "
                    "k >= 1")
        return None

    def emit(self, config: BlockTopK, graph: Graph, ops: SiteOperands,
             site: AttentionSite) -> Node:
        causal = _sparse.site_is_causal(site)
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        return graph.call_function(
            torch.ops.attnopt.block_topk.default,
            (ops.q, ops.k, ops.v, ops.mask, config.block, config.k, causal,
             site.kind == "self", scale),
        )

    def density(self, config: BlockTopK, site: AttentionSite) -> float:
        """Routed pairs over the pairs exact attention computes (causal: the triangle)."""
        lq, lk = site.q_len, site.kv_len
        if not (isinstance(lq, int) and isinstance(lk, int) and lq and lk):
            return 1.0
        causal = _sparse.site_is_causal(site)
        pairs = topk_pairs(lq, lk, config.block, config.k, causal, site.kind == "self")
        return min(1.0, pairs / _sparse.exact_pairs(lq, lk, causal))


# -- ONNX ------------------------------------------------------------------------------------------


@onnx_translation(torch.ops.attnopt.block_topk.default, "onnx", "onnxruntime")
def block_topk_onnx(q, k, v, attn_mask=None, block: int = 64, topk: int = 1,
                    causal: bool = False, own_block: bool = True, scale: float = 1.0):
    """Standard ops: gate, ``TopK``, ``GatherND`` of the key blocks, block-wise attention.

    Largest tensors: the gathered keys / values ``[B, H, nqb, (k+1)·block, D]`` and the scores
    ``[B, H, nqb, block, (k+1)·block]``; the gate is ``[B, H, nqb, nkb]``. Heads folded into
    the batch (``[1, B·H, L, D]``) run as ``B·H`` one-head sequences.
    """
    if ox.folded_heads(q, k, v, attn_mask):
        return ox.as_one_head_sequences(block_topk_onnx, q, k, v, attn_mask, block=block,
                                        topk=topk, causal=causal, own_block=own_block,
                                        scale=scale)
    ops = _sparse.onnx_operands(q, k, v, attn_mask, scale)
    d, own = ops.dim, 1 if own_block else 0
    lq, lk = _sparse._length(ops.q), _sparse._length(ops.k)
    qb, nqb = _sparse._onnx_blocks(ops.q, block, d)                    # [B, H, nqb, b, D]
    kb, nkb = _sparse._onnx_blocks(ops.k, block, d)                    # [B, H, nkb, b, D]
    fl = ir.DataType.FLOAT
    qi = _range(nqb)
    kj = _range(nkb)
    q_cnt = op.Min(op.Sub(lq, op.Mul(qi, _i(block))), _i(block))
    q_mean = op.Div(op.ReduceSum(qb, _ints(3), keepdims=0),
                    op.Unsqueeze(op.Cast(q_cnt, to=fl), _ints(1)))     # [B, H, nqb, D]
    empty = None
    lkm = _sparse._static_or_none(ops.mask, 3) if ops.mask is not None else None
    if ops.mask is not None and ops.key_only and lkm != 1:
        keep = op.Cast(op.Greater(ops.mask, _f(HARD_FILL)), to=fl)  # [Bm, Hm, 1, Lk]
        w, _ = _sparse._onnx_blocks(op.Transpose(keep, perm=[0, 1, 3, 2]), block, 1)
        cnt = op.ReduceSum(w, _ints(3), keepdims=0)                    # [Bm, Hm, nkb, 1]
        k_mean = op.Div(op.ReduceSum(op.Mul(kb, w), _ints(3), keepdims=0),
                        op.Max(cnt, _f(1.0)))
        empty = op.Transpose(op.Equal(cnt, _f(0.0)), perm=[0, 1, 3, 2])  # [Bm, Hm, 1, nkb]
    else:
        k_cnt = op.Min(op.Sub(lk, op.Mul(kj, _i(block))), _i(block))
        k_mean = op.Div(op.ReduceSum(kb, _ints(3), keepdims=0),
                        op.Unsqueeze(op.Cast(k_cnt, to=fl), _ints(1)))
    gate = op.MatMul(q_mean, op.Transpose(k_mean, perm=[0, 1, 3, 2]))  # [B, H, nqb, nkb]
    i2, j2 = op.Unsqueeze(qi, _ints(1)), op.Unsqueeze(kj, _ints(0))
    if causal:
        gate = op.Where(op.Less(j2, i2), gate, _f(_sparse.NEG_INF))
    elif own_block:
        gate = op.Where(op.Equal(j2, i2), _f(_sparse.NEG_INF), gate)
    if empty is not None:
        gate = op.Where(empty, _f(_sparse.NEG_INF), gate)
    kk = op.Max(op.Min(_ints(topk), op.Sub(nkb, _ints(own))), _ints(0))
    vals, idx = op.TopK(gate, kk, axis=-1)                             # [B, H, nqb, kk]
    valid = op.Not(op.IsInf(vals, detect_positive=0))
    if own_block:
        shape = op.Concat(op.Shape(idx, end=3), _ints(1), axis=0)
        idx = op.Concat(op.Expand(op.Unsqueeze(qi, _ints(1)), shape), idx, axis=3)
        valid = op.Concat(op.Expand(op.Constant(value=ir.tensor(np.array([True]))), shape),
                          valid, axis=3)
    pos = op.Add(op.Unsqueeze(op.Mul(idx, _i(block)), _ints(4)),
                 op.Constant(value=ir.tensor(np.arange(block, dtype=np.int64))))
    ok = op.And(op.Unsqueeze(valid, _ints(4)), op.Less(pos, lk))       # [B, H, nqb, n, b]
    pos = op.Reshape(pos, _ints(0, 0, 0, -1))                          # [B, H, nqb, n·b]
    ok = op.Reshape(ok, _ints(0, 0, 0, -1))
    clamped = op.Min(pos, op.Sub(lk, _ints(1)))
    flat = op.Unsqueeze(op.Reshape(clamped, _ints(0, 0, -1)), _ints(3))  # [B, H, nqb·n·b, 1]
    cols = op.Shape(clamped, start=3, end=4)
    kshape = op.Concat(_ints(0, 0), nqb, cols, _ints(d), axis=0)
    kg = op.Reshape(op.GatherND(ops.k, flat, batch_dims=2), kshape)    # [B, H, nqb, n·b, D]
    vg = op.Reshape(op.GatherND(ops.v, flat, batch_dims=2),
                    op.Concat(_ints(0, 0), nqb, cols, _ints(ops.vdim), axis=0))
    s = op.MatMul(qb, op.Transpose(kg, perm=[0, 1, 2, 4, 3]))         # [B, H, nqb, b, n·b]
    s = op.Add(s, op.Unsqueeze(_sparse._where_bias(ok), _ints(3)))
    if causal:
        qpos = op.Add(op.Unsqueeze(op.Mul(qi, _i(block)), _ints(1, 2)),
                      op.Constant(value=ir.tensor(np.arange(block, dtype=np.int64)[:, None])))
        s = op.Add(s, _sparse._where_bias(op.LessOrEqual(op.Unsqueeze(pos, _ints(3)), qpos)))
    if ops.mask is not None:
        s = op.Add(s, _onnx_topk_mask(ops, block, clamped))
    out = _sparse._onnx_softmax_out([(s, vg)], ops)
    return _sparse._onnx_finish(out, ops, lq)


def _onnx_topk_mask(ops: _sparse.OnnxOperands, block: int, clamped):
    """The user's mask at the routed positions: ``[B, H, nqb, 1|block, n·b]``."""
    m = ops.mask
    lkm = _sparse._static_or_none(m, 3)
    heads = op.Shape(ops.q, start=0, end=2)
    if ops.key_only:
        if lkm == 1:
            return op.Unsqueeze(m, _ints(2))
        mk = op.Expand(op.Squeeze(m, _ints(2)), op.Concat(heads, _sparse._length(ops.k),
                                                          axis=0))     # [B, H, Lk]
        g = op.GatherElements(mk, op.Reshape(clamped, _ints(0, 0, -1)), axis=2)
        return op.Unsqueeze(op.Reshape(g, op.Shape(clamped)), _ints(3))
    rows, _ = _sparse._onnx_blocks(m, block, -1)                       # [Bm, Hm, nqb, b, Lkm]
    if lkm == 1:
        return rows
    rows = op.Expand(rows, op.Concat(heads, op.Shape(rows, start=2), axis=0))
    idx = op.Expand(op.Unsqueeze(clamped, _ints(3)),
                    op.Concat(op.Shape(rows, end=4), op.Shape(clamped, start=3), axis=0))
    return op.GatherElements(rows, idx, axis=4)


def _range(n):
    """``[n]`` int64 0..n-1 from a ``[1]`` int64 size."""
    return op.Range(_i(0), op.Squeeze(n, _ints(0)), _i(1))
