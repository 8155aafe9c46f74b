"""Token grids: a site's sequence → ``P`` prefix tokens + an ``h × w`` patch grid (row-major).

A vision transformer turns an image into tokens with a patch embedding (a strided 2-D
convolution in HF ViT / DeiT / BEiT / DINOv2 and timm) and often resizes its position
embeddings to the grid (DINOv2, timm's dynamic image size: an interpolation to ``(h, w)``), and
its tokens are reshaped to and from the grid on the way. Each of these nodes carries the grid's
two sizes as adjacent dimensions of its value. A site's grid is such a pair with
``L = P + h·w`` for a constant ``0 <= P < h·w``.

Constraints and guarantees:
  * static sizes: only convolution and interpolation outputs count (reshapes can split any
    axis, e.g. heads × head dim, so a static match there would be a coincidence);
  * dynamic sizes (the image size stayed symbolic in the capture): a pair counts only when
    ``L - h·w`` is *provably* a constant, so the grid is right at every image size; reshapes
    to / from the grid count too. The grid is then read at run time as ``sym_size`` of that
    node, which must come before the attention in the graph;
  * a pair that fits the example sizes but cannot be proven (or comes after the attention)
    asks for a static capture (:attr:`GridSearch.specialise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import Node

from attnopt._match.graph import fake, hint

aten = torch.ops.aten

_CONVS = {aten.conv2d.default, aten.convolution.default, aten._convolution.default}
_RESIZES = {
    aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default,
    aten.upsample_bicubic2d.vec, aten.upsample_bicubic2d.default,
    aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default,
    aten._upsample_bilinear2d_aa.vec, aten._upsample_bilinear2d_aa.default,
    aten._upsample_bicubic2d_aa.vec, aten._upsample_bicubic2d_aa.default,
    aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default,
}
# reshapes between tokens and the grid (the capture keeps flatten / unflatten undecomposed:
# ``x.flatten(2).transpose(1, 2)`` is how ViTs turn the grid into tokens)
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.flatten.using_ints, aten.unflatten.int}

# What found the grid, best first (ties on the prefix length go to the earlier kind).
CONV, RESIZE, VIEW = "patch-embedding convolution", "position-embedding resize", "grid reshape"
_RANK = {CONV: 0, RESIZE: 1, VIEW: 2}


@dataclass(frozen=True)
class TokenGrid:
    """A site's token grid.

    Attributes:
        height, width: the grid's sizes at the example inputs.
        prefix: tokens before the grid (class, register, distillation tokens); the same at
            every image size.
        source: the node whose value has the grid sizes at dims ``dims`` (read at run time
            when the grid is dynamic), or None for a static grid.
        dims: the two dimensions of ``source`` holding ``(height, width)``.
        found: what kind of node gave the grid (``CONV``, ``RESIZE``, ``VIEW``).
    """

    height: int
    width: int
    prefix: int
    source: Node | None
    dims: tuple[int, int]
    found: str

    @property
    def dynamic(self) -> bool:
        """True when the grid is a runtime size of the graph (``source`` is read)."""
        return self.source is not None

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` at the example inputs."""
        return self.height, self.width


@dataclass(frozen=True)
class GridSearch:
    """The result of :func:`find_grid`: a grid, or why there is none.

    Attributes:
        grid: the grid, or None.
        reason: why there is no grid ('' when there is one).
        specialise: True when a capture with static image sizes would give a grid (it fits the
            example sizes but is not provable, or comes after the attention).
    """

    grid: TokenGrid | None
    reason: str = ""
    specialise: bool = False


def find_grid(anchor: Node) -> GridSearch:
    """The token grid of the attention whose softmax (or SDPA call) is ``anchor``.

    The sequence length is the anchor's second-to-last dimension (``[..., Lq, Lk]`` scores or
    ``[..., Lq, Dv]`` SDPA output).
    """
    val = fake(anchor)
    if val is None or val.dim() < 2:
        return GridSearch(None, "the sequence length is unknown")
    length = val.shape[-2]
    n_len = hint(length)
    if n_len is None:
        return GridSearch(None, "the sequence length is unknown")
    dynamic = not _is_static(length)
    before = True
    proven: list[tuple[int, int, int, TokenGrid]] = []
    unproven: list[str] = []
    for order, node in enumerate(anchor.graph.nodes):
        if node is anchor:
            before = False
        for kind, src, i in _pairs(node, dynamic):
            a, b = fake(src).shape[i:i + 2]
            h, w = hint(a), hint(b)
            if h is None or w is None or h < 1 or w < 1:
                continue
            prefix = n_len - h * w
            if not 0 <= prefix < h * w:
                continue
            if not dynamic:
                if _is_static(a) and _is_static(b):
                    proven.append((prefix, _RANK[kind], order,
                                   TokenGrid(h, w, prefix, None, (0, 0), kind)))
                continue
            if _is_static(a) and _is_static(b):
                continue  # a fixed grid cannot hold a sequence of varying length
            if _constant(length, a, b) != prefix:
                unproven.append(f"{h}x{w} at {src.name} fits the example but not every size")
            elif not before:
                unproven.append(f"{h}x{w} is only known after the attention ({src.name})")
            else:
                proven.append((prefix, _RANK[kind], order,
                               TokenGrid(h, w, prefix, src, (i, i + 1), kind)))
    if proven:
        return GridSearch(min(proven, key=lambda t: t[:3])[3])
    if unproven:
        return GridSearch(None, "the image size is dynamic and the patch grid cannot be read at "
                          "run time (" + "; ".join(unproven[:2]) + ")", specialise=True)
    what = "2-D convolution, resize or grid reshape" if dynamic else "2-D convolution or resize"
    return GridSearch(None, f"no {what} produces a token grid matching the sequence length "
                      f"{n_len}; pass grid=(h, w) if the tokens form an image grid")


def _pairs(node: Node, dynamic: bool):
    """``(kind, source, i)``: dims ``i, i + 1`` of ``source``'s value may be a token grid."""
    if node.op != "call_function":
        return
    val = fake(node)
    if val is None:
        return
    if node.target in _CONVS and val.dim() == 4:
        yield CONV, node, 2
    elif node.target in _RESIZES and val.dim() == 4:
        yield RESIZE, node, 2
    elif dynamic and node.target in _VIEWS and fake(node.args[0]) is not None:
        # tokens → grid: an output pair whose product is an input size; grid → tokens: a pair
        # of the input whose product is an output size
        arg = node.args[0]
        for owner, other in ((node, fake(arg).shape), (arg, val.shape)):
            s = fake(owner).shape
            for i in range(1, len(s) - 1):
                if any(_equal(d, s[i], s[i + 1]) for d in other):
                    yield VIEW, owner, i


def _expr(x: Any) -> sympy.Expr:
    if isinstance(x, int):
        return sympy.Integer(x)
    node = x.node
    expr = node.expr
    env = getattr(node, "shape_env", None)
    if env is not None:
        try:
            expr = env.replace(expr)
        except Exception:  # noqa: BLE001 - replacement is a simplification only
            pass
    return expr


def _constant(length: Any, a: Any, b: Any) -> int | None:
    """``L - a·b`` when it is provably an integer constant, else None."""
    try:
        diff = sympy.expand(_expr(length) - _expr(a) * _expr(b))
    except Exception:  # noqa: BLE001 - symbolic reasoning may refuse
        return None
    return int(diff) if diff.is_Integer else None


def _equal(d: Any, a: Any, b: Any) -> bool:
    return _constant(d, a, b) == 0


def _is_static(x: Any) -> bool:
    if isinstance(x, int):
        return True
    try:
        return bool(_expr(x).is_Integer)
    except Exception:  # noqa: BLE001
        return False
