"""2-D neighborhood attention: image-token site → ``torch.ops.attnopt.neighborhood2d`` (NATTEN).

For a sequence of ``P`` prefix tokens (class / register tokens) followed by an ``h × w`` grid of
patch tokens in row-major order, each grid token attends to the ``kernel × kernel`` window of
grid tokens around it and to the prefix tokens; prefix tokens attend to everything. Windows
follow NATTEN's semantics: a window that would cross the grid's border is shifted inwards, so
every grid query sees exactly ``kernel²`` grid keys; with ``dilation`` d the grid splits into d×d
interleaved sub-grids (positions ≡ a mod d) and the window is taken inside the query's sub-grid.
Cost O(N·(kernel² + P)) instead of O(N²).

Constraints:
  * non-causal self attention over a token grid; causal and cross attention are refused;
  * the grid is ``grid=(h, w)`` when given, otherwise inferred from the captured graph
    (:mod:`attnopt._match.grid`: the patch-embedding convolution, a position-embedding resize or
    a reshape to the grid, with ``L = P + h·w`` for a constant ``P``). When the capture kept the
    image size dynamic, the grid is proven for every size and passed to the op as runtime sizes
    (``sym_size`` of that node); a grid that fits only the example asks ``optimize`` for a static
    capture; no grid at all → refused with a reason;
  * ``kernel`` odd, ``kernel · dilation <= min(h, w)``;
  * masks: any mask is applied inside the pattern; GQA: the query heads of a kv group share
    their gathered neighborhood.

Fast path: queries are tiled in ``8 × 8`` squares of one sub-grid; a tile's neighborhoods all lie
in one ``(8 + kernel - 1)²`` region. The keys of a column of tiles are gathered once per kv head
as a vertical strip, in which every tile's region is one contiguous run, so a chunk of tiles reads
strided views of the strips (no per-tile copy); a separable (row ⊕ column) bias cuts each query's
columns down to its own window. Prefix queries use one dense SDPA call over all keys.

ONNX: no ORT CPU kernel implements neighborhood attention; both targets use a gather-based
decomposition: tile / region index tables, ``Gather`` of the regions, the separable bias, batched
attention per tile, and a ``Gather`` with the inverse permutation back to token order. A static
grid and length get constant tables; a runtime grid (dynamic image size) gets the tables computed
in the graph from ``Range`` and index arithmetic, so one file serves every image size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from attnopt._match.grid import GridSearch, TokenGrid, find_grid
from attnopt.errors import ConfigError
from attnopt.export._onnx_ops import const as _const
from attnopt.export._onnx_ops import ints as _ints
from attnopt.export._onnx_ops import ir, op
from attnopt.export._registry import onnx_translation
from attnopt.variants import _flex, _sparse
from attnopt.variants._base import NeedsStaticShapes, SiteOperands, Variant, register

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite

aten = torch.ops.aten

#: queries per tile side of the ONNX lowering (64 query rows per tile and head).
TILE = 8
#: (grid rows, grid columns) of the queries of one block of the fast path.
STRIP_TILE = (8, 8)


@dataclass(frozen=True, kw_only=True)
class Neighborhood2D(Variant):
    """Each grid token attends to a ``kernel × kernel`` window around it (NATTEN semantics).

    Attributes:
        kernel: window side (odd), e.g. 7.
        dilation: spacing of the window's taps (1 = a dense window).
        grid: ``(h, w)`` of the patch grid; None infers it from the model's patch embedding.
    """

    name = "neighborhood2d"
    exact = False

    kernel: int
    dilation: int = 1
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (not isinstance(self.kernel, int) or isinstance(self.kernel, bool) or self.kernel < 1
                or self.kernel % 2 == 0):
            raise ConfigError(f"kernel must be an odd positive int (e.g. 7), got {self.kernel!r}")
        if (not isinstance(self.dilation, int) or isinstance(self.dilation, bool)
                or self.dilation < 1):
            raise ConfigError(f"dilation must be a positive int, got {self.dilation!r}")
        if self.grid is not None:
            g = self.grid
            if (not isinstance(g, (tuple, list)) or len(g) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                               for x in g)):
                raise ConfigError(f"grid must be None or (height, width) in tokens, got {g!r}")
            object.__setattr__(self, "grid", (int(g[0]), int(g[1])))
            if min(self.grid) < self.kernel * self.dilation:
                raise ConfigError(f"grid {self.grid} is smaller than kernel·dilation = "
                                  f"{self.kernel * self.dilation}")


# -- windows ---------------------------------------------------------------------------------------


def window_1d(n: int, kernel: int, dilation: int) -> torch.Tensor:
    """``[n, n]`` bool: key j is in query i's window along one axis (slow, clear; reference)."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        a, ii = i % dilation, i // dilation
        size = len(range(a, n, dilation))
        start = min(max(ii - kernel // 2, 0), size - kernel)
        for c in range(start, start + kernel):
            allowed[i, a + dilation * c] = True
    return allowed


def neighborhood_pattern(length: int, grid: tuple[int, int], kernel: int,
                         dilation: int) -> torch.Tensor:
    """The ``[L, L]`` bool pattern (prefix tokens see and are seen by everything)."""
    gh, gw = grid
    prefix = length - gh * gw
    wy, wx = window_1d(gh, kernel, dilation), window_1d(gw, kernel, dilation)
    g = (wy[:, None, :, None] & wx[None, :, None, :]).reshape(gh * gw, gh * gw)
    allowed = torch.ones(length, length, dtype=torch.bool)
    allowed[prefix:, prefix:] = g
    return allowed


@dataclass(frozen=True)
class AxisTiles:
    """Tiles of one axis: query positions, their key region and which region keys they see.

    Attributes:
        query: ``[nt, t]`` axis positions of each tile's queries (-1: padding).
        key: ``[nt, R]`` axis positions of each tile's key region (-1: padding).
        allowed: ``[nt, t, R]`` key r is in query i's window.
    """

    query: torch.Tensor
    key: torch.Tensor
    allowed: torch.Tensor


@functools.lru_cache(maxsize=64)
def axis_tiles(n: int, kernel: int, dilation: int, tile: int) -> AxisTiles:
    """Tile one axis of ``n`` positions (per dilation class) for windows of ``kernel`` taps.

    A tile holds ``tile`` consecutive positions of one class; all their windows lie in the
    class's ``min(size, tile + kernel - 1)`` positions starting at the (clamped) first window.
    """
    queries, keys, allowed = [], [], []
    region = 0
    for a in range(dilation):
        size = len(range(a, n, dilation))
        r = min(size, tile + kernel - 1)
        region = max(region, r)
        for t0 in range(0, size, tile):
            ii = torch.arange(t0, t0 + tile)
            ok = ii < size
            rs = min(max(t0 - kernel // 2, 0), size - r)
            kk = torch.arange(rs, rs + r)
            ws = (ii - kernel // 2).clamp(min=0).clamp(max=size - kernel)
            seen = (kk[None, :] >= ws[:, None]) & (kk[None, :] < ws[:, None] + kernel) \
                & ok[:, None]
            queries.append(torch.where(ok, a + dilation * ii, -1))
            keys.append(a + dilation * kk)
            allowed.append(seen)
    nt = len(queries)
    key = torch.full((nt, region), -1, dtype=torch.int64)
    seen = torch.zeros(nt, tile, region, dtype=torch.bool)
    for i, (kk, s) in enumerate(zip(keys, allowed)):
        key[i, :kk.numel()] = kk
        seen[i, :, :kk.numel()] = s
    return AxisTiles(torch.stack(queries), key, seen)


@dataclass(frozen=True)
class GridTiles:
    """2-D tiles: products of row tiles and column tiles (row-tile major).

    Attributes:
        query_index: ``[nt, t²]`` token positions of each tile's queries (``L``: padding).
        key_index: ``[nt, Ry·Rx]`` token positions of each tile's key region (clamped).
        row_bias: ``[nty, t, Ry]`` 0 / -inf, row window of each row tile.
        col_bias: ``[ntx, t, Rx]`` 0 / -inf, column window of each column tile.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    row_bias: torch.Tensor
    col_bias: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(nty, ntx, Ry, Rx)``."""
        return (self.row_bias.shape[0], self.col_bias.shape[0], self.row_bias.shape[2],
                self.col_bias.shape[2])


@functools.lru_cache(maxsize=32)
def grid_tiles(length: int, grid: tuple[int, int], kernel: int, dilation: int,
               tile: int = TILE) -> GridTiles:
    """The tile tables of a ``length``-token sequence whose last ``h·w`` tokens are the grid."""
    gh, gw = grid
    prefix = length - gh * gw
    ty, tx = axis_tiles(gh, kernel, dilation, tile), axis_tiles(gw, kernel, dilation, tile)
    qy, qx = ty.query[:, None, :, None], tx.query[None, :, None, :]
    q = torch.where((qy >= 0) & (qx >= 0), prefix + qy * gw + qx, length)
    ky, kx = ty.key[:, None, :, None], tx.key[None, :, None, :]
    k = (prefix + ky.clamp(min=0) * gw + kx.clamp(min=0))
    nty, ntx = q.shape[:2]
    return GridTiles(
        q.reshape(nty * ntx, -1), k.reshape(nty * ntx, -1),
        _sparse.key_bias(ty.allowed, torch.float32), _sparse.key_bias(tx.allowed, torch.float32))


# -- the op ----------------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::neighborhood2d", mutates_args=())
def neighborhood2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kernel: int,
    dilation: int,
    grid_h: int,
    grid_w: int,
    scale: float,
) -> torch.Tensor:
    """2-D neighborhood attention on canonical operands (self attention over prefix + grid).

    Args:
        q: ``[B, H, L, D]`` with ``L = P + grid_h·grid_w`` (P prefix tokens first).
        k: ``[B, Hkv, L, D]`` with ``H % Hkv == 0``.
        v: ``[B, Hkv, L, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, L, L]``; applied inside the pattern.
        kernel: window side (odd).
        dilation: spacing of the window's taps.
        grid_h: grid height in tokens (a runtime size in graphs whose image size is dynamic).
        grid_w: grid width in tokens.
        scale: multiplier of the scores.

    Returns:
        ``[B, H, L, Dv]``, contiguous; rows whose pattern is fully masked are 0.
    """
    if q.is_cuda and (out := _flex.dispatch("neighborhood2d", q, k, v, attn_mask, kernel, dilation,
                                             grid_h, grid_w, scale)) is not None:
        return out
    mask = _sparse.check_operands(q, k, v, attn_mask)
    length = q.shape[2]
    prefix = length - grid_h * grid_w
    if k.shape[2] != length or prefix < 0:
        raise ValueError(f"neighborhood2d needs self attention over P + {grid_h}x{grid_w} "
                         f"tokens, got Lq={length}, Lk={k.shape[2]}")
    if min(grid_h, grid_w) < kernel * dilation:
        raise ValueError(f"grid {grid_h}x{grid_w} is smaller than kernel·dilation = "
                         f"{kernel * dilation}")
    runner = _sparse.BlockedRunner(q, k, v, mask, scale)
    out = torch.empty(*q.shape[:3], v.shape[3], dtype=runner.dtype, device=q.device)
    if prefix:
        pm = mask
        if pm is not None and pm.shape[2] > 1:
            pm = pm[:, :, :prefix]
        if pm is not None and pm.dtype != torch.bool:
            pm = pm.to(runner.dtype)
        out[:, :, :prefix] = F.scaled_dot_product_attention(
            runner.q[:, :, :prefix], runner.k, runner.v, attn_mask=pm, scale=float(scale),
            enable_gqa=k.shape[1] != q.shape[1])
    rows, cols = STRIP_TILE
    runner.run(_StripPlan(runner, length, (grid_h, grid_w), kernel, dilation, rows, cols),
               out=out)
    return out.to(q.dtype)


@neighborhood2d.register_fake
def _(q, k, v, attn_mask, kernel, dilation, grid_h, grid_w, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def reference_neighborhood2d(q, k, v, attn_mask=None, kernel: int = 3, dilation: int = 1,
                             grid: tuple[int, int] = (1, 1),
                             scale: float | None = None) -> torch.Tensor:
    """Slow reference of :func:`neighborhood2d`: dense attention under the neighborhood pattern."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = neighborhood_pattern(q.shape[2], grid, kernel, dilation).to(q.device)
    return _sparse.reference_sparse(q, k, v, attn_mask, allowed, scale)


class _StripPlan:
    """Blocks of ``g × t`` grid queries whose keys are contiguous runs of vertical key strips.

    The grid's columns are tiled by :func:`axis_tiles` (``t`` query columns, ``Rx`` key
    columns) and so are its rows (``g`` query rows, ``Ry`` key rows). For a column tile, the
    keys of its ``Rx`` columns over every grid row (rows in dilation-class order) form a strip,
    gathered once per kv head for a group of column tiles; a block (row tile r, column tile c)
    then reads the ``Ry·Rx`` keys of one contiguous run of c's strip. A chunk holds the blocks
    of one row tile over the group's column tiles, so its runs are a constant stride apart and
    the score matmul reads a strided view of the strips (no per-block gather). The separable
    (row ⊕ column) bias cuts each query's columns down to its own window; prefix keys are one
    shared segment after the region.
    """

    fold = True
    prebias = True

    def __init__(self, runner: _sparse.BlockedRunner, length: int, grid: tuple[int, int],
                 kernel: int, dilation: int, rows: int, cols: int) -> None:
        dev = runner.q.device
        gh, gw = grid
        self.prefix = prefix = length - gh * gw
        ty = axis_tiles(gh, kernel, dilation, rows)
        tx = axis_tiles(gw, kernel, dilation, cols)
        self.nty, self.ntx = nty, ntx = ty.query.shape[0], tx.query.shape[0]
        self.ry, self.rx = ty.key.shape[1], tx.key.shape[1]
        self.rows, self.cols = rows, cols
        self.region = self.ry * self.rx
        self.width = _sparse.round_up(self.region)  # region segment, alignment keys included
        self.key_cols = _sparse.round_up(self.width + prefix)
        self.block = rows * cols
        self.nblk = nty * ntx
        # strip rows: grid rows in dilation-class order, then padding rows (never seen)
        order = torch.cat([torch.arange(a, gh, dilation) for a in range(dilation)])
        rank = torch.empty(gh, dtype=torch.int64)
        rank[order] = torch.arange(gh)
        first = rank[ty.key[:, 0]]  # first strip row of each row tile
        self._starts = (first * self.rx).tolist()
        # the last run (alignment keys included) must stay inside the strip
        need = int(first.max()) + self.ry + -(-(self.width - self.region) // self.rx)
        rows_y = torch.cat([order, order.new_zeros(max(0, need - gh))])
        self.strip_keys = rows_y.numel() * self.rx
        keycols = tx.key.clamp(min=0)  # [ntx, Rx]
        self._strip_pos = (prefix + rows_y[None, :, None] * gw + keycols[:, None, :]).reshape(
            ntx, -1).to(dev)  # [ntx, strip keys]
        # column tiles in groups of G (their strips are gathered together); blocks ordered
        # (group, row tile, column tile), a chunk = one row tile of a group
        gf = runner.group
        per_block = gf * self.block * self.key_cols * runner.q.element_size()
        self.group = min(ntx, max(1, _sparse.CHUNK_BYTES // per_block))
        self._row, self._col, firsts = [], [], []
        for c0 in range(0, ntx, self.group):
            cs = list(range(c0, min(ntx, c0 + self.group)))
            for r in range(nty):
                firsts.append(len(self._row))
                self._row += [r] * len(cs)
                self._col += cs
        self._cuts = tuple(firsts[1:])
        qy = ty.query[torch.tensor(self._row)][:, :, None]  # [nblk, g, 1]
        qx = tx.query[torch.tensor(self._col)][:, None, :]  # [nblk, 1, t]
        q = torch.where((qy >= 0) & (qx >= 0), prefix + qy * gw + qx, length)
        self.query_index = q.reshape(self.nblk, -1).to(dev)
        self.row_bias = _sparse.key_bias(ty.allowed, runner.dtype).to(dev)  # [nty, g, Ry]
        self.col_bias = _sparse.key_bias(tx.allowed, runner.dtype).to(dev)  # [ntx, t, Rx]
        self._needs_mask = runner.mask is not None
        self._cached: tuple[int, int, int] | None = None

    def chunks(self, max_blocks: int):
        """Chunks of whole blocks of one row tile and one group of column tiles."""
        return _sparse.uniform_chunks(self.nblk, max_blocks, self._cuts)

    def _strips(self, c: _sparse.Chunk, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys / values of the strips of a group of column tiles (gathered once)."""
        r = c.runner
        c0 = group * self.group
        pos = self._strip_pos[c0:c0 + self.group].reshape(-1)
        kb = r.scratch("strip.k", (pos.numel(), r.dim))
        vb = r.scratch("strip.v", (pos.numel(), r.vdim))
        key = (c.b, c.kvh, group)
        if self._cached != key:
            torch.index_select(c.k, 0, pos, out=kb)
            torch.index_select(c.v, 0, pos, out=vb)
            self._cached = key
        return kb, vb

    def segments(self, c: _sparse.Chunk) -> list[_sparse.Segment]:
        """The blocks' runs (strided views of the strips), then the prefix keys."""
        col = self._col[c.s0]
        group = col // self.group
        kb, vb = self._strips(c, group)
        start = (col - group * self.group) * self.strip_keys + self._starts[self._row[c.s0]]
        step = self.strip_keys
        d, dv, w = kb.shape[1], vb.shape[1], self.width
        k = kb.as_strided((c.m, w, d), (step * d, d, 1), start * d)
        v = vb.as_strided((c.m, w, dv), (step * dv, dv, 1), start * dv)
        pos = None
        if self._needs_mask:
            cols = self._strip_pos[col:col + c.m]
            first = self._starts[self._row[c.s0]]
            pos = cols[:, first:first + w]
        segs = [_sparse.Segment(k, v, pos)]
        if self.prefix:
            head = torch.arange(self.prefix, device=kb.device)[None, :]
            segs.append(_sparse.Segment(c.k[:self.prefix], c.v[:self.prefix], head))
        return segs

    def bias(self, c: _sparse.Chunk, s: torch.Tensor) -> None:
        """Initialise the scores (``prebias``): row window ⊕ column window in the region, -inf
        in its alignment keys, 0 for the prefix keys, -inf in the last alignment columns.
        """
        m, gf = c.m, s.shape[1]
        row, col = self._row[c.s0], self._col[c.s0]
        by = self.row_bias[row][None, None, :, None, :, None]  # [1,1,g,1,Ry,1]
        bx = self.col_bias[col:col + m][:, None, None, :, None, :]  # [m,1,1,t,1,Rx]
        shape = (m, gf, self.rows, self.cols, self.ry, self.rx)
        region = s[..., :self.region].unflatten(3, (self.ry, self.rx))
        torch.add(by.expand(shape), bx.expand(shape),
                  out=region.unflatten(2, (self.rows, self.cols)))
        if self.width > self.region:
            s[..., self.region:self.width].fill_(_sparse.NEG_INF)
        if self.prefix:
            s[..., self.width:self.width + self.prefix].zero_()
        if self.key_cols > self.width + self.prefix:
            s[..., self.width + self.prefix:].fill_(_sparse.NEG_INF)


# -- the implementation ----------------------------------------------------------------------------


def infer_grid(site: AttentionSite) -> tuple[tuple[int, int] | None, str]:
    """The token grid of ``site`` at the example inputs, or (None, reason).

    See :func:`attnopt._match.grid.find_grid` (patch-embedding convolution, position-embedding
    resize, reshape to the grid).
    """
    found = _search(site)
    return (found.grid.size, "") if found.grid is not None else (None, found.reason)


def _search(site: AttentionSite) -> GridSearch:
    g = site.graph
    if g is None:
        return GridSearch(None, "the site carries no graph to infer the grid from; pass "
                          "grid=(h, w)")
    return find_grid(g.anchor)


def _grid_for(config: Neighborhood2D, site: AttentionSite) -> GridSearch:
    if config.grid is not None:
        gh, gw = config.grid
        length = site.q_len if isinstance(site.q_len, int) else gh * gw
        return GridSearch(TokenGrid(gh, gw, length - gh * gw, None, (0, 0), "given"))
    return _search(site)


@register(Neighborhood2D)
class Neighborhood2DImpl:
    """Emits ``torch.ops.attnopt.neighborhood2d`` on image-token self-attention sites."""

    def can_apply(self, config: Neighborhood2D, site: AttentionSite) -> str | None:
        reason = _sparse.common_refusal(site)
        if reason:
            return reason
        if site.kind != "self" or site.q_len != site.kv_len:
            return "neighborhood attention needs self attention over one token grid"
        if _sparse.site_is_causal(site):
            return "neighborhood attention is bidirectional; this site is causal"
        found = _grid_for(config, site)
        if found.grid is None:
            why = f"cannot find the token grid: {found.reason}"
            return NeedsStaticShapes(why) if found.specialise else why
        gh, gw = found.grid.size
        if found.grid.prefix < 0:
            return (f"the sequence ({site.q_len} tokens) is shorter than the grid {gh}x{gw}")
        if min(gh, gw) < config.kernel * config.dilation:
            return (f"the grid {gh}x{gw} is smaller than kernel·dilation = "
                    f"{config.kernel * config.dilation}")
        return None

    def emit(self, config: Neighborhood2D, graph: Graph, ops: SiteOperands,
             site: AttentionSite) -> Node:
        grid = _grid_for(config, site).grid
        sizes: list = list(grid.size)
        if grid.dynamic:
            # the grid follows the image size: read it from the graph at run time
            if ops.lookup is None:
                raise ValueError("a dynamic token grid needs SiteOperands.lookup")
            src = ops.lookup(grid.source)
            sizes = [graph.call_function(aten.sym_size.int, (src, d)) for d in grid.dims]
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        return graph.call_function(
            torch.ops.attnopt.neighborhood2d.default,
            (ops.q, ops.k, ops.v, ops.mask, config.kernel, config.dilation, *sizes, scale),
        )

    def density(self, config: Neighborhood2D, site: AttentionSite) -> float:
        """Pairs in the pattern over all pairs (at the example sizes)."""
        length = site.q_len
        grid = _grid_for(config, site).grid
        if not isinstance(length, int) or grid is None:
            return 1.0
        return neighborhood_pairs(length, grid.size, config.kernel) / (length * length)


def neighborhood_pairs(length: int, grid: tuple[int, int], kernel: int) -> int:
    """Pairs in the pattern: prefix rows and columns plus ``kernel²`` per grid query."""
    n = grid[0] * grid[1]
    prefix = length - n
    return prefix * length + n * (prefix + kernel * kernel)


# -- ONNX ------------------------------------------------------------------------------------------


def tile_tables(length: int, grid: tuple[int, int], kernel: int, dilation: int,
                tile: int = TILE) -> tuple[GridTiles, np.ndarray, np.ndarray, int]:
    """Tables of the ONNX lowering: tiles, padded key index ``[nt, Kc]`` (prefix first),
    the slot of every grid token in the tiles' query order ``[h·w]``, and ``Kc``.
    """
    tiles = grid_tiles(length, grid, kernel, dilation, tile)
    prefix = length - grid[0] * grid[1]
    region = tiles.key_index.numpy()
    nt = region.shape[0]
    used = prefix + region.shape[1]
    cols = _sparse.round_up(used)
    key = np.zeros((nt, cols), dtype=np.int64)
    key[:, :prefix] = np.arange(prefix)
    key[:, prefix:used] = region
    slots = tiles.query_index.numpy().reshape(-1)
    inverse = np.zeros(grid[0] * grid[1], dtype=np.int64)
    real = slots < length
    inverse[slots[real] - prefix] = np.nonzero(real)[0]
    return tiles, key, inverse, used


@onnx_translation(torch.ops.attnopt.neighborhood2d.default, "onnx", "onnxruntime")
def neighborhood2d_onnx(q, k, v, attn_mask=None, kernel: int = 3, dilation: int = 1,
                        grid_h=1, grid_w=1, scale: float = 1.0):
    """Standard ops: tile tables, ``Gather`` of regions, separable bias, attention.

    A static grid and sequence length get constant tables (:func:`tile_tables`); a grid that
    is a runtime size (dynamic image size) gets the same decomposition with tables computed in
    the graph (:func:`_onnx_dynamic`). Largest tensors: the gathered regions
    ``[B, H, tiles, Kc, D]`` and the scores ``[B, H, tiles, t², Kc]``, Kc ≈ (t + kernel - 1)².
    """
    ops = _sparse.onnx_operands(q, k, v, attn_mask, scale)
    length = _sparse._static_or_none(q, 2)
    if not (isinstance(grid_h, int) and isinstance(grid_w, int) and length is not None):
        return _onnx_dynamic(ops, kernel, dilation, grid_h, grid_w)
    grid = (grid_h, grid_w)
    prefix = length - grid_h * grid_w
    tiles, key, inverse, used = tile_tables(length, grid, kernel, dilation)
    nt, cols = key.shape
    nty, ntx, ry, rx = tiles.shape
    t = tiles.row_bias.shape[1]
    qslots = np.minimum(tiles.query_index.numpy().reshape(-1), length - 1)
    qg = op.Reshape(op.Gather(ops.q, _const(qslots), axis=2),
                    _ints(0, 0, nt, t * t, ops.dim))                   # [B, H, nt, T, D]
    kidx = _const(key)
    kg = op.Gather(ops.k, kidx, axis=2)                                # [B, H, nt, Kc, D]
    vg = op.Gather(ops.v, kidx, axis=2)
    tile_ids = np.arange(nt)
    by = op.Reshape(op.Gather(_const(tiles.row_bias.numpy()), _const(tile_ids // ntx), axis=0),
                    _ints(nt, t, 1, ry, 1))
    bx = op.Reshape(op.Gather(_const(tiles.col_bias.numpy()), _const(tile_ids % ntx), axis=0),
                    _ints(nt, 1, t, 1, rx))
    parts = [op.Reshape(op.Add(by, bx), _ints(nt, t * t, ry * rx))]
    if prefix:
        parts.insert(0, _const(np.zeros((1, 1, prefix), dtype=np.float32)))
    if cols > used:
        parts.append(_const(np.full((1, 1, cols - used), -np.inf, dtype=np.float32)))
    if len(parts) > 1:
        shape = _ints(nt, t * t, 1)
        parts = [op.Expand(p, op.Concat(op.Slice(shape, _ints(0), _ints(2)),
                                        op.Shape(p, start=2), axis=0)) for p in parts]
    bias = parts[0] if len(parts) == 1 else op.Concat(*parts, axis=2)  # [nt, T, Kc]
    s = op.Add(op.MatMul(qg, op.Transpose(kg, perm=[0, 1, 2, 4, 3])), bias)
    if ops.mask is not None:
        s = op.Add(s, _onnx_tile_mask(ops, _const(qslots), kidx, t * t))
    out = _sparse._onnx_softmax_out([(s, vg)], ops)                    # [B, H, nt, T, Dv]
    out = op.Reshape(out, _ints(0, 0, nt * t * t, ops.vdim))
    out = op.Gather(out, _const(inverse), axis=2)                      # [B, H, h·w, Dv]
    if prefix:
        out = op.Concat(_onnx_prefix(ops, _ints(prefix)), out, axis=2)
    return op.Cast(out, to=ops.dtype)


def _onnx_prefix(ops: _sparse.OnnxOperands, prefix):
    """Dense attention of the ``prefix`` (``[1]`` int64) first queries over all keys."""
    qp = op.Slice(ops.q, _ints(0), prefix, _ints(2))
    sp = op.MatMul(qp, op.Transpose(ops.k, perm=[0, 1, 3, 2]))         # [B, H, P, L]
    if ops.mask is not None:
        mp = ops.mask if ops.key_only or _sparse._static_or_none(ops.mask, 2) == 1 \
            else op.Slice(ops.mask, _ints(0), prefix, _ints(2))
        sp = op.Add(sp, mp)
    return _sparse._onnx_softmax_out([(sp, ops.v)], ops)


def _onnx_tile_mask(ops: _sparse.OnnxOperands, qslots, key, rows: int):
    """The user's mask at the tiles' (query, key) positions: ``[Bm, Hm, nt, 1|T, Kc]``.

    ``qslots``: ``[nt·T]`` query positions; ``key``: ``[nt, Kc]`` key positions (int64 values).
    """
    m = ops.mask
    lkm = _sparse._static_or_none(m, 3)
    if ops.key_only:
        if lkm == 1:
            return op.Unsqueeze(m, _ints(2))
        return op.Unsqueeze(op.Gather(op.Squeeze(m, _ints(2)), key, axis=2), _ints(3))
    rows_m = op.Reshape(op.Gather(m, qslots, axis=2),
                        op.Concat(_ints(0, 0, -1, rows), op.Shape(m, start=3), axis=0))
    if lkm == 1:
        return rows_m
    return _sparse._onnx_gather_cols(rows_m, key)


# -- ONNX, runtime grid ----------------------------------------------------------------------------


def _onnx_dynamic(ops: _sparse.OnnxOperands, kernel: int, dilation: int, grid_h, grid_w):
    """The tiled decomposition with the grid as runtime sizes (the tables built in the graph).

    Like :func:`tile_tables`, but every dilation class of an axis gets as many tiles as the
    largest class (padding queries are dropped by the final ``Gather``) and every tile's key
    region has ``t + kernel - 1`` rows / columns (keys outside the axis are clamped and cut by
    the bias), so the tables are plain index arithmetic on ``Range`` outputs.
    """
    t = TILE
    r = t + kernel - 1
    gh, gw = _size(grid_h), _size(grid_w)                              # [1] int64 each
    qy, ky, by, ntcy, _ = _onnx_axis(gh, kernel, dilation, t)
    qx, kx, bx, ntcx, ntx = _onnx_axis(gw, kernel, dilation, t)
    length = _sparse._length(ops.q)
    prefix = op.Sub(length, op.Mul(gh, gw))                            # [1]
    # query slots [nty, ntx, t, t] → flat; padding queries read token 0 and are dropped later
    qy4, qx4 = op.Unsqueeze(qy, _ints(1, 3)), op.Unsqueeze(qx, _ints(0, 2))
    real = op.And(op.GreaterOrEqual(qy4, _ints(0)), op.GreaterOrEqual(qx4, _ints(0)))
    qslots = op.Reshape(op.Where(real, op.Add(op.Add(prefix, op.Mul(qy4, gw)), qx4), _ints(0)),
                        _ints(-1))
    # key positions [nt, P + Ry·Rx]: the prefix tokens, then the tile's region
    region = op.Add(op.Add(prefix, op.Mul(op.Unsqueeze(ky, _ints(1, 3)), gw)),
                    op.Unsqueeze(kx, _ints(0, 2)))                     # [nty, ntx, Ry, Rx]
    region = op.Reshape(region, _ints(-1, r * r))
    nt = op.Shape(region, start=0, end=1)
    head = op.Expand(op.Unsqueeze(op.Range(_sparse._scalar_i(0), op.Squeeze(prefix, _ints(0)),
                                           _sparse._scalar_i(1)), _ints(0)),
                     op.Concat(nt, prefix, axis=0))
    key = op.Concat(head, region, axis=1)
    # bias [nt, t², P + Ry·Rx]: 0 on the prefix, row window ⊕ column window on the region
    rb = op.Add(op.Unsqueeze(by, _ints(1, 3, 5)), op.Unsqueeze(bx, _ints(0, 2, 4)))
    rb = op.Reshape(rb, _ints(-1, t * t, r * r))
    zeros = op.Expand(_sparse._scalar_f(0.0), op.Concat(nt, _ints(t * t), prefix, axis=0))
    bias = op.Concat(zeros, rb, axis=2)
    qg = op.Reshape(op.Gather(ops.q, qslots, axis=2), _ints(0, 0, -1, t * t, ops.dim))
    kg = op.Gather(ops.k, key, axis=2)                                 # [B, H, nt, Kc, D]
    vg = op.Gather(ops.v, key, axis=2)
    s = op.Add(op.MatMul(qg, op.Transpose(kg, perm=[0, 1, 2, 4, 3])), bias)
    if ops.mask is not None:
        s = op.Add(s, _onnx_tile_mask(ops, qslots, key, t * t))
    out = _sparse._onnx_softmax_out([(s, vg)], ops)                    # [B, H, nt, T, Dv]
    out = op.Reshape(out, _ints(0, 0, -1, ops.vdim))
    # every grid token's slot in the tiles' order: ((tile_y·ntx + tile_x)·t + row)·t + column
    ty, ry = _onnx_slots(gh, dilation, t, ntcy)
    tx, rx = _onnx_slots(gw, dilation, t, ntcx)
    slot = op.Add(op.Mul(op.Add(op.Mul(op.Add(op.Mul(op.Unsqueeze(ty, _ints(1)), ntx),
                                              op.Unsqueeze(tx, _ints(0))), _ints(t)),
                                op.Unsqueeze(ry, _ints(1))), _ints(t)),
                  op.Unsqueeze(rx, _ints(0)))                          # [h, w]
    out = op.Gather(out, op.Reshape(slot, _ints(-1)), axis=2)          # [B, H, h·w, Dv]
    out = op.Concat(_onnx_prefix(ops, prefix), out, axis=2)
    return op.Cast(out, to=ops.dtype)


def _size(x):
    """A grid size (int or int64 value) as a ``[1]`` int64 value."""
    if isinstance(x, int):
        return _ints(x)
    return op.Reshape(op.Cast(x, to=ir.DataType.INT64), _ints(1))


def _onnx_axis(n, kernel: int, dilation: int, t: int):
    """Tile tables of one grid axis of runtime size ``n`` (``[1]`` int64), like
    :func:`axis_tiles` with ``ntc`` tiles per dilation class and regions of ``R = t + kernel - 1``.

    Returns ``(query [nt, t], key [nt, R], bias [nt, t, R], ntc [1], nt [1])``: query positions
    (-1: padding), clamped key positions, 0 / -inf window bias.
    """
    d, half, r = dilation, kernel // 2, t + kernel - 1
    ntc = op.Div(op.Add(op.Div(op.Add(n, _ints(d - 1)), _ints(d)), _ints(t - 1)), _ints(t))
    nt = op.Mul(ntc, _ints(d))
    j = op.Range(_sparse._scalar_i(0), op.Squeeze(nt, _ints(0)), _sparse._scalar_i(1))
    a = op.Div(j, ntc)                                                 # dilation class [nt]
    t0 = op.Mul(op.Mod(j, ntc), _ints(t))                              # first index in class
    size = op.Unsqueeze(op.Div(op.Sub(op.Add(n, _ints(d - 1)), a), _ints(d)), _ints(1))
    a1 = op.Unsqueeze(a, _ints(1))
    ii = op.Add(op.Unsqueeze(t0, _ints(1)), _const(np.arange(t)[None, :]))  # [nt, t]
    ok = op.Less(ii, size)
    query = op.Where(ok, op.Add(a1, op.Mul(ii, _ints(d))), _ints(-1))
    rs = op.Min(op.Max(op.Sub(op.Unsqueeze(t0, _ints(1)), _ints(half)), _ints(0)),
                op.Sub(size, _ints(r)))                                # [nt, 1]
    kk = op.Add(rs, _const(np.arange(r)[None, :]))                     # [nt, R]
    key = op.Add(a1, op.Mul(op.Min(op.Max(kk, _ints(0)), op.Sub(size, _ints(1))), _ints(d)))
    ws = op.Unsqueeze(op.Min(op.Max(op.Sub(ii, _ints(half)), _ints(0)),
                             op.Sub(size, _ints(kernel))), _ints(2))   # [nt, t, 1]
    kk3 = op.Unsqueeze(kk, _ints(1))                                   # [nt, 1, R]
    seen = op.And(op.And(op.GreaterOrEqual(kk3, ws), op.Less(kk3, op.Add(ws, _ints(kernel)))),
                  op.Unsqueeze(ok, _ints(2)))
    return query, key, _sparse._where_bias(seen), ntc, nt


def _onnx_slots(n, dilation: int, t: int, ntc):
    """Per axis position ``[n]``: its tile (class-major, as :func:`_onnx_axis`) and row in it."""
    i = op.Range(_sparse._scalar_i(0), op.Squeeze(n, _ints(0)), _sparse._scalar_i(1))
    ii = op.Div(i, _ints(dilation))
    tile = op.Add(op.Mul(op.Mod(i, _ints(dilation)), ntc), op.Div(ii, _ints(t)))
    return tile, op.Mod(ii, _ints(t))

