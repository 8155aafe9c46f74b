"""Which SDPA kernel runs: the ATen backend op each ``scaled_dot_product_attention`` call reaches.

``F.scaled_dot_product_attention`` picks a backend at run time (flash, memory-efficient, cuDNN,
math on CUDA; flash or math on CPU) from the operands' dtype, shapes, mask and causal flag. The
choice is visible as the ATen op the call dispatches to, which the profiler records; this module
reads those records for any callable (a fused op call, an ``OptimizedModel`` forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: ATen backend ops of SDPA → short names (longest names first: prefixes overlap).
BACKENDS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backends(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """Run ``fn(*args, **kwargs)`` and name the SDPA backend of each call it made, in order.

    Returns:
        ``(fn's result, [backend name per SDPA call])``; names are the values of
        :data:`BACKENDS` (``math`` means the N×N scores were built).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = []
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        name = BACKENDS.get(event.name)
        if name is not None:
            names.append(name)
    return result, names


def fused_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                  scale: float | None = None) -> str:
    """The SDPA backend ``torch.ops.attnopt.attention`` reaches on these operands."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _, names = sdpa_backends(torch.ops.attnopt.attention, q, k, v, attn_mask, is_causal, scale)
    return names[0] if names else "none"


def available_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       ) -> dict[str, str | None]:
    """For each CUDA backend, None when it accepts these operands, else its refusal (first line).

    Tries each backend alone under ``torch.nn.attention.sdpa_kernel``; useful to see why a site
    did not get flash (e.g. a mask, fp32, an odd head dim).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = k.shape[1] != q.shape[1]
    out: dict[str, str | None] = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)
            out[name.lower()] = None
        except RuntimeError as e:
            out[name.lower()] = str(e).strip().splitlines()[0][:160]
    return out
