"""Decoder capture: a causal LM → one graph taking and returning a flat tensor KV cache.

    (input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
     past [k_0, v_0, k_1, v_1, ...] each [B, Hkv, P, D])
        ──▶ (logits [B, S, V], present k_0, v_0, ... each [B, Hkv, P+S, D])

Two kinds of models are accepted:
  * HF causal LMs (``model.config`` and a ``past_key_values`` argument): the flat past becomes a
    ``transformers.DynamicCache`` of full (never cropped) layers, so the graph holds the cache
    update ``cat(past, new)`` that the attention reads;
  * any other module following the same contract by hand (nanoGPT-style): called as
    ``model(input_ids, attention_mask, position_ids, past_key_values)`` with
    ``past_key_values`` a list of ``(k, v)`` pairs (or None for no past) and returning
    ``(logits, [(k, v), ...])``, the presents being ``cat(past, new)`` along dim 2.

Captured with ``torch.export`` (non-strict), every dimension ``Dim.AUTO``: batch, sequence,
past and total lengths stay symbolic.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from attnopt.errors import CaptureError, ConfigError

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class CacheLayout:
    """What the flat cache looks like: ``layers`` pairs of ``[B, kv_heads, P, head_dim]``."""

    layers: int
    kv_heads: int
    head_dim: int
    value_dim: int
    vocab: int
    dtype: torch.dtype

    def empty(self, batch: int, length: int = 0) -> list[torch.Tensor]:
        """A flat zero past of ``length`` positions."""
        out = []
        for _ in range(self.layers):
            out.append(torch.zeros(batch, self.kv_heads, length, self.head_dim, dtype=self.dtype))
            out.append(torch.zeros(batch, self.kv_heads, length, self.value_dim,
                                   dtype=self.dtype))
        return out


class DecoderWrapper(torch.nn.Module):
    """Calls a causal LM with a flat tensor past; returns ``(logits, *flat presents)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hf = is_hf_causal_lm(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: list[torch.Tensor]):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        if self.hf:
            logits, presents = self._hf(input_ids, attention_mask, position_ids, pairs)
        else:
            logits, presents = self.model(input_ids, attention_mask, position_ids, pairs or None)
        flat = [t for kv in presents for t in kv]
        return (logits, *flat)

    def _hf(self, input_ids, attention_mask, position_ids, pairs):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        for k, v in pairs:
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True,
                         return_dict=True)
        presents = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits, presents


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    """True for transformers models whose forward takes a ``past_key_values`` cache."""
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "past_key_values" in params and "use_cache" in params


def cache_layout(wrapper: DecoderWrapper, input_ids: torch.Tensor) -> CacheLayout:
    """Run the model once on a short prompt (no past) and read the cache shapes it returns."""
    ids = input_ids[:1, :2]
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    try:
        with torch.no_grad():
            out = wrapper(ids, mask, pos, [])
    except Exception as e:  # noqa: BLE001 - the user's model failed: say what we called
        raise ConfigError(
            f"{type(wrapper.model).__name__} cannot be called as a decoder: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}. HF causal LMs work as they are; "
            "other models must take (input_ids, attention_mask, position_ids, past_key_values="
            "[(k, v), ...] or None) and return (logits, [(k, v), ...])") from e
    logits, flat = out[0], out[1:]
    if not flat or len(flat) % 2 or logits.dim() != 3:
        raise ConfigError(f"{type(wrapper.model).__name__} returned logits of shape "
                          f"{tuple(logits.shape)} and {len(flat)} cache tensors; expected "
                          "[B, S, vocab] logits and a (k, v) pair per layer")
    k, v = flat[0], flat[1]
    if k.dim() != 4 or k.shape[2] != ids.shape[1]:
        raise ConfigError(f"cache tensors must be [batch, kv_heads, length, head_dim]; got "
                          f"{tuple(k.shape)} for a prompt of {ids.shape[1]} tokens")
    return CacheLayout(layers=len(flat) // 2, kv_heads=k.shape[1], head_dim=k.shape[3],
                       value_dim=v.shape[3], vocab=logits.shape[-1], dtype=k.dtype)


def position_ids_for(attention_mask: torch.Tensor, s: int) -> torch.Tensor:
    """HF's positions: ``cumsum(mask) - 1`` (1 at padding), for the last ``s`` columns."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -s:].clone()  # not a view: export guards on views fail


def decoder_inputs(layout: CacheLayout, ids_pool: torch.Tensor, batch: int, seq: int,
                   past: int, *, pad: int = 0, seed: int = 0) -> tuple:
    """Inputs ``(input_ids, attention_mask, position_ids, flat past)`` of the given sizes.

    ``pad`` left-pads the last row by that many positions; token ids come from ``ids_pool``
    (valid ids of the model); the past is random (scaled like normalised activations).
    """
    g = torch.Generator().manual_seed(seed)
    pool = ids_pool.flatten()
    idx = torch.randint(0, pool.numel(), (batch, seq), generator=g)
    ids = pool[idx]
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad:
        mask[-1, :pad] = 0
    flat = [torch.randn(t.shape, generator=g, dtype=t.dtype)
            for t in layout.empty(batch, past)]
    return ids, mask, position_ids_for(mask, seq), flat


class FlatDecoder(torch.nn.Module):
    """The wrapper with one named positional argument per cache tensor.

    torch.export of a list argument produces shape guards that its own re-export and the ONNX
    exporter's decompositions fail to evaluate (torch 2.13); flat named inputs avoid that.
    """

    def __init__(self, inner: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.inner = inner
        names = ", ".join(past_arg_names(layers))
        scope: dict[str, Any] = {}
        exec(  # noqa: S102 - a fixed template: only the number of cache arguments varies
            f"def forward(self, input_ids, attention_mask, position_ids, {names}):\n"
            f"    return self.inner(input_ids, attention_mask, position_ids, [{names}])\n",
            scope)
        self.forward = scope["forward"].__get__(self)


def past_arg_names(layers: int) -> list[str]:
    """Python argument names of the flat cache inputs."""
    return [f"past_{i}_{kind}" for i in range(layers) for kind in ("key", "value")]


def dynamic_spec(flat: list) -> tuple:
    """``Dim.AUTO`` on batch / lengths of every input (head counts and sizes stay static)."""
    two = {0: Dim.AUTO, 1: Dim.AUTO}
    return (two, two, two, *[{0: Dim.AUTO, 2: Dim.AUTO} for _ in flat])


def capture_decoder(wrapper: DecoderWrapper, inputs: tuple) -> ExportedProgram:
    """``torch.export`` the wrapper with every dimension dynamic (``Dim.AUTO``)."""
    ids, mask, pos, flat = inputs
    flat_module = FlatDecoder(wrapper, len(flat) // 2)
    try:
        with torch.no_grad():
            return torch.export.export(flat_module, (ids, mask, pos, *flat),
                                       dynamic_shapes=dynamic_spec(flat), strict=False)
    except Exception as e:  # noqa: BLE001 - any failure: one typed error naming the model
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(wrapper.model).__name__} with a KV cache: "
            f"{type(e).__name__}: {first}", construct="decoder with a KV cache",
            hint="the forward must stay traceable with past_key_values given") from e


def as_flat_list(*xs: Any) -> list:
    """Flatten ``(ids, mask, pos, [past...])`` into the graph's placeholder order."""
    ids, mask, pos, flat = xs
    return [ids, mask, pos, *flat]
