"""Every registered variant: its op (the fast kernel) against its slow reference.

The variant-specific test files sweep shapes and options; this file makes the rule hold for the
registry: a new variant fails here until it brings a kernel-vs-reference check.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from attnopt.variants import registered
from attnopt.variants.block_topk import reference_block_topk
from attnopt.variants.fused import reference_attention
from attnopt.variants.group_kv import reference_group_kv
from attnopt.variants.linear import MapParams, reference_quadratic
from attnopt.variants.neighborhood2d import reference_neighborhood2d
from attnopt.variants.prune_heads import reference_prune_heads
from attnopt.variants.sliding_window import reference_sliding_window
from attnopt.variants.streaming import reference_streaming
from attnopt.variants.streaming_heads import reference_streaming_heads

B, H, HKV, L, D, SCALE = 2, 4, 2, 37, 16, 0.3  # L = 2 prefix tokens + a 5 x 7 grid
ops = torch.ops.attnopt
_g = torch.Generator().manual_seed(3)
GROUP_MAPS = (torch.eye(D) + 0.1 * torch.randn(H, D, D, generator=_g),
              torch.eye(D) + 0.1 * torch.randn(H, D, D, generator=_g),
              0.1 * torch.randn(H, 1, D, generator=_g))
PRUNE_FILL = torch.randn(H, D, generator=_g)

# name -> (kernel(q, k, v, mask), reference(q, k, v, mask), tolerance)
CHECKS = {
    "fused": (lambda q, k, v, m: ops.attention(q, k, v, m, False, SCALE),
              lambda q, k, v, m: reference_attention(q, k, v, m, False, SCALE), 1e-5),
    "sliding_window": (
        lambda q, k, v, m: ops.sliding_window(q, k, v, m, 5, True, SCALE),
        lambda q, k, v, m: reference_sliding_window(q, k, v, m, 5, True, SCALE), 1e-5),
    "streaming": (
        lambda q, k, v, m: ops.streaming(q, k, v, m, 3, 6, SCALE),
        lambda q, k, v, m: reference_streaming(q, k, v, m, 3, 6, SCALE), 1e-5),
    # kv head 0 full, kv head 1 streaming
    "streaming_heads": (
        lambda q, k, v, m: ops.streaming_heads(q, k, v, m, torch.tensor([True, False]), 1, 3, 6,
                                               SCALE),
        lambda q, k, v, m: reference_streaming_heads(q, k, v, m, torch.tensor([True, False]), 3,
                                                     6, SCALE), 1e-5),
    "block_topk": (
        lambda q, k, v, m: ops.block_topk(q, k, v, m, 8, 2, True, True, SCALE),
        lambda q, k, v, m: reference_block_topk(q, k, v, m, 8, 2, True, True, SCALE), 1e-5),
    "neighborhood2d": (
        lambda q, k, v, m: ops.neighborhood2d(q, k, v, m, 3, 1, 5, 7, SCALE),
        lambda q, k, v, m: reference_neighborhood2d(q, k, v, m, 3, 1, (5, 7), SCALE), 1e-5),
    # two kv heads pooled into one (MQA), with key and output maps
    "group_kv": (
        lambda q, k, v, m: ops.group_kv(q, k, v, m, *GROUP_MAPS, 1, False, SCALE),
        lambda q, k, v, m: reference_group_kv(q, k, v, m, *GROUP_MAPS, 1, False, SCALE), 1e-5),
    # head 1 dropped (its constant output), heads 0, 2, 3 kept: q gathered, GQA kv per kept head
    "prune_heads": (
        lambda q, k, v, m: ops.prune_heads(q[:, [0, 2, 3]], k[:, [0, 1, 1]], v[:, [0, 1, 1]], m,
                                           torch.tensor([0, 2, 3]), PRUNE_FILL, False, SCALE),
        lambda q, k, v, m: reference_prune_heads(q, k, v, m, torch.tensor([1, 0, 1, 1]),
                                                 PRUNE_FILL, False, SCALE), 1e-5),
    "linear": (
        lambda q, k, v, m: ops.linear_attention(q, k, v, m, None, None, None, None, None,
                                                True, SCALE, "elu", 8),
        lambda q, k, v, m: reference_quadratic(q, k, v, m, MapParams("elu", SCALE), True), 1e-5),
}


@pytest.mark.parametrize("name", sorted(registered()))
def test_every_variant_kernel_matches_its_reference(name):
    assert name in CHECKS, (f"variant {name!r} has no kernel-vs-reference check: add its op and "
                            "its slow reference to CHECKS in this file")
    kernel, reference, tol = CHECKS[name]
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
    keep[1, ..., -5:] = False  # key padding in the second sequence
    out = kernel(q, k, v, keep)
    ref = reference(q, k, v, keep)
    assert out.shape == (B, H, L, D)
    assert rel_err(ref, out) < tol, name
