"""Decoder export: causal LM → one KV-cache graph for prefill and decode, plus its runners.

    model ──capture with a flat tensor cache──▶ graph ──attnopt's matcher──▶ sites
          ──cache update cat(past, new) + mask checked per site──▶ kv_attention per site
          ──torch.onnx (GroupQueryAttention | Attention-23)──▶ model.onnx ──validated──▶ dir

The graph contract (the names onnxruntime-genai and optimum read):
  inputs  ``input_ids`` int64 ``[batch_size, sequence_length]``,
          ``attention_mask`` int64 ``[batch_size, total_sequence_length]``,
          ``position_ids`` int64 ``[batch_size, sequence_length]``,
          ``past_key_values.{i}.key`` / ``.value`` ``[batch_size, kv_heads, past_sequence_length,
          head_dim]``;
  outputs ``logits`` ``[batch_size, sequence_length, vocab]``,
          ``present.{i}.key`` / ``.value`` ``[batch_size, kv_heads, total_sequence_length,
          head_dim]``.
Prefill is the same graph with a past of length 0. The directory holds ``model.onnx`` (weights in
``model.onnx.data``), ``config.json`` / ``generation_config.json`` (HF models),
the tokenizer files when one is given, and ``genai_config.json``.

Validation: the file runs a short left-padded batch (prefill + decode steps) in onnxruntime and
its last-position logits are compared with the eager model at every step, for every cache mode
the target supports (strictly for exact files; measured only for approximate ones).

``Streaming(sinks, window)`` sites keep the first ``sinks`` cache slots and a causal window over
the cache (``_kv_attention``): the file computes the whole-sequence ``Streaming`` variant, and
when every site has the same values the runner bounds the cache by eviction (``_generate``).
Causal ``Linear(feature_map)`` sites (fixed maps ``elu`` / ``relu`` / ``taylor``) keep a
recurrent state instead of a KV cache (``_linear_state``): the same input/output names, with
``past_key_values.{i}.key`` / ``present.{i}.key`` holding ``S = Σ φ(k_j) v_jᵀ``
``[batch_size, kv_heads, F, head_dim]`` and ``.value`` holding ``z = Σ φ(k_j)``
``[batch_size, kv_heads, F, 1]`` (zeros before the prompt; ``attention_mask`` still grows, only
its last ``sequence_length`` columns are read). Their size is constant in the length. Only
attnopt's runner drives such a file (present fed back as past): onnxruntime-genai and optimum
grow their caches along axis 2, so no ``genai_config.json`` is written for it.
Files are written to a temporary directory and moved into ``out_dir`` only after validation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnopt._inputs import normalize
from attnopt.errors import ConfigError, ExportError, ValidationError, VariantNotApplicableError
from attnopt.export._decoder_capture import (
    INPUT_NAMES,
    CacheLayout,
    DecoderWrapper,
    as_flat_list,
    cache_layout,
    capture_decoder,
    decoder_inputs,
    position_ids_for,
)
from attnopt.export._generate import Generation, OrtRunner
from attnopt.export._registry import OPSET, translation_table

#: The targets a KV-cache decoder can be exported for.
DECODER_TARGETS = ("onnxruntime", "onnx")

log = logging.getLogger("attnopt.export")

# HF model_type → onnxruntime-genai model type (the runtime refuses types it does not know).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2", "granite": "granite",
               "olmo": "olmo", "nemotron": "nemotron", "phi": "phi", "smollm3": "smollm3"}
VALIDATION_STEPS = 3


@dataclass
class DecodeSiteReport:
    """How one attention site was exported."""

    index: int
    location: str
    layer: int
    window: int
    applied_window: int
    op: str
    applied_sinks: int | None = None  # None: not a Streaming site
    #: a Linear site's recurrent state: feature map, ``S`` / ``z`` shapes per sequence, its bytes
    #: (constant in the length) and the bytes per token the KV cache it replaces would take
    state: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return dict(self.__dict__)


@dataclass
class DecoderExport:
    """An exported decoder directory; ``generate`` runs it in onnxruntime.

    Attributes:
        out_dir: the directory.
        path: its ``model.onnx``.
        target: ``"onnxruntime"`` or ``"onnx"``.
        layout: the cache layout (layers, kv heads, head dim).
        sites: one row per attention site.
        parity: worst relative logits error vs the eager model per validated cache mode.
        notes: remarks (approximate variants, skipped checks).
        files: the files written.
        timings: seconds per stage.
        state_features: F, the rows of every site's recurrent state (``Linear`` files), else 0.
        lowering_error: state files: worst relative logits error of onnxruntime vs the rewritten
            graph run in torch (enforced at ``tolerance``; ``parity`` is the approximation's).
    """

    out_dir: Path
    path: Path
    target: str
    layout: CacheLayout
    sites: list[DecodeSiteReport] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)
    tolerance: float = 1e-4
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    state_features: int = 0
    lowering_error: float | None = None
    _runners: dict = field(default_factory=dict, repr=False)

    @property
    def cache_modes(self) -> tuple[str, ...]:
        """The cache modes the file supports."""
        if self.target != "onnxruntime" or self.state_features:
            return ("growing",)  # the standard Attention op returns a new present
        return ("shared", "growing")

    @property
    def streaming(self) -> tuple[int, int] | None:
        """``(sinks, window)`` when every site is ``Streaming`` with these values (bounded)."""
        pairs = {(s.applied_sinks, s.applied_window) for s in self.sites}
        if len(pairs) != 1 or any(s.applied_sinks is None for s in self.sites):
            return None
        return pairs.pop()

    def runner(self, threads: int | None = None, spin: bool = True) -> OrtRunner:
        """An onnxruntime runner on the file (one per setting, kept); see :class:`OrtRunner`."""
        key = (threads, spin)
        if key not in self._runners:
            L = self.layout
            self._runners[key] = OrtRunner(
                self.path, layers=L.layers, kv_heads=L.kv_heads, head_dim=L.head_dim,
                value_dim=L.value_dim, shared_ok=self.target == "onnxruntime", threads=threads,
                spin=spin, streaming=self.streaming, state_features=self.state_features)
        return self._runners[key]

    def generate(self, input_ids: Any, max_new_tokens: int = 32, *, attention_mask: Any = None,
                 do_sample: bool = False, cache: str | None = None, threads: int | None = None,
                 spin: bool = True, **kwargs: Any) -> Generation:
        """Generate with the exported file (greedy unless ``do_sample``).

        Args:
            input_ids: ``[B, S]`` token ids (left-padded when batched).
            max_new_tokens: tokens to generate per row.
            attention_mask: ``[B, S]`` with 0 at padding (all ones when None).
            do_sample: sample instead of greedy (``temperature``, ``top_k``, ``seed`` kwargs).
            cache: ``"shared"`` (one buffer bound as past and present, the default for
                onnxruntime) or ``"growing"`` (the default for the onnx target). The cache of
                Streaming files is bounded by eviction in both (``evict=False`` runs them
                unbounded, ``evict_every`` sets how often it is compacted).
            threads: onnxruntime intra-op threads.
            spin: let idle onnxruntime threads busy-wait (False: better on busy shared cores).
            **kwargs: ``eos_token_id`` / ``pad_token_id`` (default: the model's), ``max_length``,
                ``temperature``, ``top_k``, ``seed``, ``keep_logits``, ``evict``,
                ``evict_every``.

        Returns:
            A :class:`attnopt.export._generate.Generation` (``.sequences``, timings).
        """
        kwargs.setdefault("eos_token_id", self.eos_token_id)
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        return self.runner(threads, spin).generate(
            input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
            cache=cache or self.cache_modes[0], **kwargs)

    def table(self) -> str:
        """A text rendering."""
        L = self.layout
        lines = [f"decoder export ({self.target}, opset {OPSET}) -> {self.out_dir}: {L.layers} "
                 f"layers, {L.kv_heads} kv heads x {L.head_dim}, cache modes "
                 f"{'/'.join(self.cache_modes)}"]
        for s in self.sites:
            win = f", window {s.applied_window}" if s.applied_window else ""
            if s.applied_sinks is not None:
                win = f", sinks {s.applied_sinks}{win}"
            if s.state:
                st = s.state
                win = (f" ({st['feature_map']}), recurrent state S {st['S']} + z {st['z']} = "
                       f"{st['bytes_per_sequence']} bytes per sequence, constant (a KV cache: "
                       f"+{st['kv_cache_bytes_per_token']} bytes per token)")
            lines.append(f"  site {s.index} {s.location} (layer {s.layer}) -> {s.op}{win}")
        for mode, err in self.parity.items():
            lines.append(f"  logits vs eager model, {mode} cache: {err:.2e} "
                         f"(tolerance {self.tolerance:.0e})")
        if self.streaming is not None:
            sinks, window = self.streaming
            lines.append(f"  bounded cache: {sinks + window - 1} slots kept (sinks {sinks} + "
                         f"last {window - 1}), compacted every evict_every (default {window}) "
                         "steps")
        if self.lowering_error is not None:
            lines.append(f"  logits vs the rewritten graph in torch: {self.lowering_error:.2e}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def export_decoder(
    model: torch.nn.Module,
    example_inputs: Any,
    out_dir: str | os.PathLike,
    *,
    target: str = "onnxruntime",
    config: Any = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    fuse: bool = True,
    validate: bool = True,
    tolerance: float | None = None,
) -> DecoderExport:
    """Export a causal LM as one KV-cache graph for prefill and decode (see the module doc).

    Args:
        model: an HF causal LM, a module following the same cache contract by hand (see
            ``attnopt.export._decoder_capture``), or an :class:`attnopt.OptimizedModel` made
            from one (its config is used).
        example_inputs: inputs with valid token ids (``{"input_ids": ...}`` or a tensor).
        out_dir: the directory to write (created; existing files of the same name replaced).
        target: ``"onnxruntime"`` (``GroupQueryAttention``, shared or growing cache) or
            ``"onnx"`` (standard ``Attention``, opset 23, growing cache).
        config: an :class:`attnopt.Config`: ``Fused()`` (exact, the default),
            ``SlidingWindow(window=W)`` (causal window over the cache, approximate unless the
            model has that window), ``Streaming(sinks=S, window=W)`` (attention sinks plus a
            causal window, approximate; the runner bounds the cache to ``S + W`` slots) or
            ``Linear(feature_map="elu" | "relu" | "taylor")`` on every site (a recurrent state
            instead of a KV cache; see the module doc).
        tokenizer: saved into the directory when given.
        max_length: ``search.max_length`` in genai_config (default: the model's context).
        fuse: apply the standard non-attention fusions (RMS/layer norm, GELU).
        validate: run the onnxruntime-vs-eager generation check.
        tolerance: max relative logits error (default 1e-4 for fp32).

    Returns:
        A :class:`DecoderExport`; ``.generate(input_ids, max_new_tokens=...)`` runs it.

    Raises:
        ConfigError: bad arguments or a variant that decode export cannot apply.
        VariantNotApplicableError: a ``Linear`` feature map or fit a decoder state cannot carry.
        CaptureError: the model cannot be captured with a cache.
        ExportError: an attention site has no recognisable cache update, or the exporter failed.
        ValidationError: onnxruntime's logits differ from the eager model's.
    """
    from attnopt.api import OptimizedModel
    from attnopt.config import Config

    if target not in DECODER_TARGETS:
        hint = ""
        if target == "tensorrt":
            hint = (" (a TensorRT KV-cache decoder is not supported; export a whole-sequence graph"
                    " with attnopt.export_onnx(..., target='tensorrt') instead)")
        raise ConfigError(f"unknown decoder export target {target!r}; choose one of "
                          f"{DECODER_TARGETS}{hint}")
    if isinstance(model, OptimizedModel):
        config = config or model.config
        source = model.__dict__.get("source_model")
        if source is None:
            raise ConfigError("this OptimizedModel does not keep its source model; pass the "
                              "original model and config=optimized.config")
        model = source
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = Config() if config is None else config
    if not isinstance(config, Config):
        raise ConfigError(f"config must be an attnopt.Config, got {type(config).__name__}")
    _check_variants(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot create {out_dir}: {parent} is not a writable directory")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        wrapper = DecoderWrapper(model)
        ids_pool = _ids_pool(example_inputs)
        layout = cache_layout(wrapper, ids_pool)
        example = decoder_inputs(layout, ids_pool, 2, 3, 5)
        program = capture_decoder(wrapper, example)
        timings["capture"] = _since(t0)
        t0 = time.perf_counter()
        gm, decode_sites = _lower_sites(program, wrapper, layout, ids_pool, config, target)
        timings["find+rewrite"] = _since(t0)
        tol = tolerance or (1e-4 if layout.dtype == torch.float32 else 1e-2)
        result = DecoderExport(out_dir=out_dir, path=out_dir / "model.onnx", target=target,
                               layout=layout, tolerance=tol, timings=timings)
        fdim = _state_features(decode_sites, layout)
        result.state_features = fdim
        kv_op = "GroupQueryAttention" if target == "onnxruntime" else "Attention"
        result.sites = [DecodeSiteReport(
            d.site.index, user_location(d.site.location), d.layer, d.window, d.applied_window,
            "linear_state_attention" if d.feature_map else kv_op,
            d.applied_sinks if streaming else None,
            _state_report(d, layout, fdim) if d.feature_map else None)
            for d, streaming in zip(decode_sites, _streaming_sites(config, decode_sites))]
        approx = [d for d in decode_sites if d.applied_window != d.window or d.applied_sinks
                  or d.feature_map]
        if fdim:
            result.notes.append(
                f"approximate: {len(decode_sites)} sites use causal linear attention "
                f"({decode_sites[0].feature_map} map) with a recurrent state of {fdim} feature "
                "rows instead of a KV cache; the logits error below is that approximation's. "
                "Only attnopt's runner drives this file (onnxruntime-genai and optimum grow "
                "caches along axis 2): no genai_config.json")
        elif approx:
            what = (f"sinks {approx[0].applied_sinks} + " if approx[0].applied_sinks else "")
            result.notes.append(
                f"approximate: {len(approx)} sites use a pattern the model does not have "
                f"({what}window {approx[0].applied_window}, model's window "
                f"{approx[0].window or 'none'}); the logits error below is that approximation's")
        if any(_streaming_sites(config, decode_sites)):
            result.notes.append(
                "Streaming: the graph computes sinks + window over cache slots; attnopt's runner "
                "bounds the cache (shared or growing mode) when every site has the same sinks "
                "and window; "
                "onnxruntime-genai (shared buffer) and optimum run the same file with the same "
                "attention but an unbounded cache")
        hf_config = getattr(model, "config", None)
        result.eos_token_id, result.pad_token_id = _special_tokens(model)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
        try:
            t0 = time.perf_counter()
            if fdim:
                example = (*example[:3], _state_example(layout, fdim, example[0].shape[0]))
            _to_onnx(gm, example, layout, target, tmp / "model.onnx", fuse, result.notes, fdim)
            timings["onnx"] = _since(t0)
            if validate:
                t0 = time.perf_counter()
                staged = DecoderExport(out_dir=tmp, path=tmp / "model.onnx", target=target,
                                       layout=layout, sites=result.sites, state_features=fdim)
                _validate(staged, wrapper, layout, ids_pool, result, strict=not approx,
                          graph=gm if fdim else None)
                timings["validate"] = _since(t0)
            files = _write_side_files(tmp, model, hf_config, tokenizer, layout, decode_sites,
                                      result, max_length)
            out_dir.mkdir(exist_ok=True)
            for name in files:
                dest = out_dir / name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(tmp / name, dest)
            result.files = sorted(files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if was_training:
            model.train()
    log.info("exported decoder %s (%s, %d layers)", out_dir, target, layout.layers)
    return result


# -- stages ------------------------------------------------------------------------------------


def _ids_pool(example_inputs: Any) -> torch.Tensor:
    inputs = normalize(example_inputs)
    ids = inputs.kwargs.get("input_ids")
    if ids is None and inputs.args:
        ids = inputs.args[0]
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) \
            or ids.dim() != 2 or ids.numel() < 2:
        raise ConfigError("example_inputs must hold token ids: {'input_ids': LongTensor[B, S]} "
                          "or a LongTensor[B, S] with at least 2 tokens")
    return ids.long()


def _lower_sites(program, wrapper, layout: CacheLayout, ids_pool, config, target):
    """Find the sites, recognise their cache updates and windows, apply the config, rewrite."""
    from attnopt._match.evaluate import Evaluator
    from attnopt._match.matcher import Matcher
    from attnopt.export import _decoder_sites as ds

    # Without the capture's shape guards (e.g. past length >= 2, as torch.export assumes of
    # dynamic sizes): they would refuse the prefill's empty past, which the graph handles.
    gm = program.module(check_guards=False)
    gm.graph.eliminate_dead_code()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    past = placeholders[len(INPUT_NAMES):]
    example = decoder_inputs(layout, ids_pool, 2, 3, 5)
    sites, _ = Matcher(gm, Evaluator(gm, [as_flat_list(*example)])).find()
    found, refused = [], {}
    for site in sites:
        d = ds.cache_update(site, past)
        if isinstance(d, str):
            refused[site.index] = d
        else:
            found.append(d)
    hint = getattr(getattr(wrapper.model, "config", None), "sliding_window", None)
    hint = hint if isinstance(hint, int) and 0 < hint < 1 << 16 else 0
    queries = 4
    total = max(64, 2 * hint + 8)
    probe = decoder_inputs(layout, ids_pool, 2, queries, total - queries, pad=3, seed=1)
    refused.update(ds.read_windows(gm, found, as_flat_list(*probe), probe[1], queries))
    found = [d for d in found if d.site.index not in refused]
    covered = {d.layer for d in found}
    if refused or covered != set(range(layout.layers)) or len(found) != layout.layers:
        why = "; ".join(f"site {i} ({sites[i].location}): {r}" for i, r in refused.items())
        raise ExportError(
            f"{len(sites)} attention sites found, {len(found)} with a recognised cache update "
            f"for {layout.layers} layers (layers without one: "
            f"{sorted(set(range(layout.layers)) - covered)}). {why or ''} Decode export needs "
            "every layer's attention to read cat(past, new) and a causal/padding mask")
    for d in found:
        d.applied_window, d.applied_sinks = _pattern_for(config, d)
        d.feature_map = _state_map(config, d)
    if len({d.feature_map for d in found}) > 1:
        raise ConfigError(
            "decode export with Linear needs the same Linear feature map on every attention site "
            f"(found {sorted({str(d.feature_map) for d in found})}; None = a KV cache): a file "
            "holds either a recurrent state or a KV cache per layer pair, not a mix")
    ds.rewrite(gm, found, placeholders[1])
    if found and found[0].feature_map:
        # The past pairs now hold states [B, Hkv, F, Dv] / [B, Hkv, F, 1], not the captured
        # [B, Hkv, P, D] caches: the capture's input-shape check would refuse them.
        gm.validate_inputs = False
    return gm, found


def _check_variants(config) -> None:
    from attnopt.variants import Fused, Linear, SlidingWindow, Streaming

    for where, v in [("variant", config.variant), *config.overrides.items()]:
        if isinstance(v, Linear):
            _check_linear(v, config)
            continue
        if not isinstance(v, (Fused, SlidingWindow, Streaming)):
            name = "None (leave exact)" if v is None else v.describe()
            raise ConfigError(f"decode export supports Fused(), SlidingWindow(window=W), "
                              f"Streaming(sinks=S, window=W) and Linear(feature_map='elu' | "
                              f"'relu' | 'taylor'); {where} asks for {name}")
        if isinstance(v, SlidingWindow) and v.causal is False:
            raise ConfigError("SlidingWindow(causal=False) would let a decoder see future "
                              "tokens; use causal=None or True for decode export")


def _check_linear(variant, config) -> None:
    """Refuse the ``Linear`` settings a decoder state cannot carry (see ``_linear_state``)."""
    from attnopt.export._linear_state import STATE_MAPS

    why = None
    if variant.feature_map == "performer":
        why = ("performer normalises the keys by a maximum over all keys of the sequence, which "
               "a causal state cannot know before the keys arrive")
    elif variant.feature_map == "learned":
        why = ("learned maps are per-site projections fitted on calibration data, which decode "
               "export does not carry into the decoder graph")
    elif config.calibration is not None:
        why = ("Config(calibration=...) fits per-site projections in front of the map, which "
               "decode export does not carry into the decoder graph; drop calibration to export "
               "the unfitted map")
    if why is not None:
        raise VariantNotApplicableError(
            f"decode export of {variant.describe()} keeps a recurrent state per site and "
            f"supports the fixed maps {', '.join(STATE_MAPS)} without calibration: {why}. Use "
            "Linear(feature_map='elu'), or export the whole-sequence model with "
            "attnopt.export_onnx(attnopt.optimize(model, inputs, config), ...)")


def _state_map(config, d) -> str | None:
    """The site's ``Linear`` feature map when it decodes with a recurrent state, else None."""
    from attnopt.variants import Linear

    variant = config.variant_for(user_location(d.site.location))
    if not isinstance(variant, Linear):
        return None
    if d.window:
        raise VariantNotApplicableError(
            f"{variant.describe()} on site {user_location(d.site.location)}, which has a "
            f"sliding window of {d.window}: linear attention would replace it by global "
            "attention (the whole-sequence Linear variant refuses such sites too). Use "
            "SlidingWindow(window=W) or Fused() there")
    return variant.feature_map


def _state_features(sites, layout: CacheLayout) -> int:
    """F of the files' recurrent states (0: a KV-cache file)."""
    from attnopt.export._linear_state import state_features

    name = sites[0].feature_map if sites else None
    return state_features(name, layout.head_dim) if name else 0


def _state_report(d, layout: CacheLayout, fdim: int) -> dict[str, Any]:
    L = layout
    item = torch.tensor([], dtype=L.dtype).element_size()
    return {"feature_map": d.feature_map, "S": [L.kv_heads, fdim, L.value_dim],
            "z": [L.kv_heads, fdim, 1],
            "bytes_per_sequence": L.kv_heads * fdim * (L.value_dim + 1) * item,
            "bytes_per_token": 0,
            "kv_cache_bytes_per_token": L.kv_heads * (L.head_dim + L.value_dim) * item}


def _state_example(layout: CacheLayout, fdim: int, batch: int, zero: bool = False
                   ) -> list[torch.Tensor]:
    """A flat state ``[S_0, z_0, S_1, z_1, ...]`` (non-negative like real states, or zeros)."""
    from attnopt.export._linear_state import empty_state

    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(layout.layers):
        for t in empty_state(batch, layout.kv_heads, fdim, layout.value_dim, layout.dtype):
            out.append(t if zero else torch.rand(t.shape, generator=g, dtype=t.dtype))
    return out


def _pattern_for(config, d) -> tuple[int, int]:
    """``(window, sinks)`` the export applies to a site."""
    from attnopt.variants import Fused, Linear, SlidingWindow, Streaming

    variant = config.variant_for(user_location(d.site.location))
    if isinstance(variant, (Fused, Linear)):
        return d.window, 0
    if isinstance(variant, Streaming):
        if d.window:
            # sinks + window within the model's own window is not one sinks + window pattern
            raise ConfigError(
                f"{variant.describe()} on site {user_location(d.site.location)}, which already "
                f"has a sliding window of {d.window}: the model's window would hide the sinks. "
                "Use SlidingWindow(window=W) there, or Streaming on a model without a window")
        return variant.window, variant.sinks
    assert isinstance(variant, SlidingWindow), "checked by _check_variants"
    return (variant.window if not d.window else min(variant.window, d.window)), 0


def _streaming_sites(config, sites) -> list[bool]:
    from attnopt.variants import Streaming

    return [isinstance(config.variant_for(user_location(d.site.location)), Streaming)
            for d in sites]


def _to_onnx(gm, example, layout: CacheLayout, target: str, path: Path, fuse: bool,
             notes: list[str], state_features: int = 0) -> None:
    """Export the rewritten graph, name the contract's inputs/outputs and dims, save."""
    import onnx_ir as ir

    from attnopt.export._decoder_capture import dynamic_spec
    from attnopt.export.onnx import _standard_fusions, _summarize_exporter_error

    ids, mask, pos, flat = example
    past_names, present_names = _cache_names(layout.layers)
    spec = dynamic_spec(flat)
    if state_features:  # a state has no sequence axis: only the batch is dynamic
        spec = (*spec[:3], *[{0: torch.export.Dim.AUTO} for _ in flat])
    try:
        program = torch.export.export(gm, (ids, mask, pos, *flat), dynamic_shapes=spec,
                                      strict=False)
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
            custom_translation_table=translation_table(target),
            input_names=[*INPUT_NAMES, *past_names],
            output_names=["logits", *present_names])
    except Exception as e:  # noqa: BLE001 - re-raised with a readable summary
        raise ExportError(f"torch.onnx.export failed for the decoder (target {target!r}): "
                          f"{_summarize_exporter_error(e)}") from e
    model = onnx_program.model
    _name_dims(model, layout, state_features)
    if fuse:
        model, counts = _standard_fusions(model, target)
        if counts:
            notes.append("standard fusions: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    ir.save(model, str(path), external_data="model.onnx.data")


def _cache_names(layers: int) -> tuple[list[str], list[str]]:
    past, present = [], []
    for i in range(layers):
        past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present += [f"present.{i}.key", f"present.{i}.value"]
    return past, present


def _name_dims(model, layout: CacheLayout, state_features: int = 0) -> None:
    """Give the contract's dims their names (the exporter calls them s0, s1, ...)."""
    import onnx_ir as ir

    L = layout
    shapes = {"input_ids": ["batch_size", "sequence_length"],
              "attention_mask": ["batch_size", "total_sequence_length"],
              "position_ids": ["batch_size", "sequence_length"],
              "logits": ["batch_size", "sequence_length", L.vocab]}
    for i in range(L.layers):
        for kind, d in (("key", L.head_dim), ("value", L.value_dim)):
            shapes[f"past_key_values.{i}.{kind}"] = ["batch_size", L.kv_heads,
                                                      "past_sequence_length", d]
            shapes[f"present.{i}.{kind}"] = ["batch_size", L.kv_heads,
                                             "total_sequence_length", d]
            if state_features:  # S [B, Hkv, F, Dv] (key) and z [B, Hkv, F, 1] (value)
                dim = L.value_dim if kind == "key" else 1
                for name in (f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"):
                    shapes[name] = ["batch_size", L.kv_heads, state_features, dim]
    for v in [*model.graph.inputs, *model.graph.outputs]:
        if v.name in shapes:
            v.shape = ir.Shape(shapes[v.name])


def _validate(staged: DecoderExport, wrapper, layout: CacheLayout, ids_pool, result,
              *, strict: bool, graph=None) -> None:
    """Generate a few steps of a left-padded batch in onnxruntime; compare logits with eager.

    With ``graph`` (state files) the logits are also compared, strictly, with that rewritten
    graph run in torch with its state fed back: the check of the ONNX lowering.
    """
    g = torch.Generator().manual_seed(2)
    ids = ids_pool.flatten()[torch.randint(0, ids_pool.numel(), (2, 7), generator=g)]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    for mode in staged.cache_modes:
        try:
            gen = staged.generate(ids, VALIDATION_STEPS, attention_mask=mask, cache=mode,
                                  keep_logits=True, eos_token_id=None)
        except Exception as e:  # noqa: BLE001 - onnxruntime refused the file: say which mode
            raise ExportError(f"onnxruntime failed running the exported decoder ({mode} "
                              f"cache): {str(e).splitlines()[0][:400]}") from e
        ref = _eager_logits(wrapper, layout, ids, mask, torch.from_numpy(gen.sequences))
        err = max(_rel(r, o) for r, o in zip(ref, gen.logits))
        result.parity[mode] = err
        if graph is not None:
            ref = _graph_logits(graph, layout, staged.state_features, ids, mask,
                                torch.from_numpy(gen.sequences))
            low = max(_rel(r, o) for r, o in zip(ref, gen.logits))
            result.lowering_error = low
            if low > result.tolerance:
                raise ValidationError(
                    f"onnxruntime logits differ from the rewritten graph in torch (recurrent "
                    f"state, left-padded batch of 2, {VALIDATION_STEPS} steps): error {low:.2e} "
                    f"> tolerance {result.tolerance:.0e}", error=low,
                    tolerance=result.tolerance, where="linear state lowering")
        if strict and err > result.tolerance:
            raise ValidationError(
                f"onnxruntime logits differ from the eager model ({mode} cache, left-padded "
                f"batch of 2, {VALIDATION_STEPS} steps): error {err:.2e} > tolerance "
                f"{result.tolerance:.0e}", error=err, tolerance=result.tolerance, where=mode)


def _eager_logits(wrapper, layout: CacheLayout, ids, mask, sequences) -> list[np.ndarray]:
    """Last-position logits of the eager model, teacher-forced with ``sequences``."""
    s = ids.shape[1]
    past = layout.empty(ids.shape[0])
    cur, cur_mask, out = ids, mask, []
    with torch.no_grad():
        for step in range(sequences.shape[1] - s):
            pos = position_ids_for(cur_mask, cur.shape[1])
            res = wrapper(cur, cur_mask, pos, past)
            out.append(res[0][:, -1].float().numpy())
            past = list(res[1:])
            cur = sequences[:, s + step: s + step + 1]
            cur_mask = torch.cat([cur_mask, torch.ones_like(cur)], dim=1)
    return out


def _graph_logits(graph, layout: CacheLayout, fdim: int, ids, mask, sequences
                  ) -> list[np.ndarray]:
    """Last-position logits of the rewritten state graph in torch, teacher-forced."""
    s = ids.shape[1]
    state = _state_example(layout, fdim, ids.shape[0], zero=True)
    cur, cur_mask, out = ids, mask, []
    with torch.no_grad():
        for step in range(sequences.shape[1] - s):
            res = graph(cur, cur_mask, position_ids_for(cur_mask, cur.shape[1]), *state)
            out.append(res[0][:, -1].float().numpy())
            state = list(res[1:])
            cur = sequences[:, s + step: s + step + 1]
            cur_mask = torch.cat([cur_mask, torch.ones_like(cur)], dim=1)
    return out


def _rel(ref: np.ndarray, out: np.ndarray) -> float:
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(ref.astype(np.float64) - out).max()) / scale


def _special_tokens(model) -> tuple[Any, Any]:
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if eos is None and cfg is not None:
        eos = getattr(cfg, "eos_token_id", None)
    if pad is None and cfg is not None:
        pad = getattr(cfg, "pad_token_id", None)
    return eos, pad


def _write_side_files(tmp: Path, model, hf_config, tokenizer, layout: CacheLayout, sites,
                      result: DecoderExport, max_length: int | None) -> list[str]:
    """config.json, generation_config.json, tokenizer files, genai_config.json (KV files)."""
    if hf_config is not None:
        hf_config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception as e:  # noqa: BLE001 - a generation config HF itself rejects
                result.notes.append(f"generation_config.json not written: {e}")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if not result.state_features:  # genai cannot drive a recurrent state (module doc)
        genai = genai_config(model, hf_config, layout, sites, result, max_length)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=4))
    return [p.name for p in tmp.iterdir()]


def genai_config(model, hf_config, layout: CacheLayout, sites, result: DecoderExport,
                 max_length: int | None) -> dict[str, Any]:
    """The onnxruntime-genai config of an exported directory (builder-compatible keys)."""
    def get(name, default=None):
        return getattr(hf_config, name, default) if hf_config is not None else default

    model_type = get("model_type", "") or ""
    genai_type = GENAI_TYPES.get(model_type, "decoder")
    if genai_type == "decoder":
        result.notes.append(f"genai_config type 'decoder' (onnxruntime-genai has no type for "
                            f"model_type {model_type or type(model).__name__!r})")
    context = get("max_position_embeddings") or get("n_positions") or 4096
    heads = get("num_attention_heads") or layout.kv_heads
    hidden = get("hidden_size") or heads * layout.head_dim
    eos, pad = result.eos_token_id, result.pad_token_id
    bos = get("bos_token_id")
    if eos is None:
        eos = 0
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": layout.head_dim,
        "hidden_size": hidden,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": heads,
        "num_hidden_layers": layout.layers,
        "num_key_value_heads": layout.kv_heads,
    }
    return {
        "model": {"bos_token_id": bos if bos is not None else 0, "context_length": context,
                  "decoder": decoder, "eos_token_id": eos, "pad_token_id": pad,
                  "type": genai_type, "vocab_size": layout.vocab},
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
                   "length_penalty": 1.0, "max_length": int(max_length or context),
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1,
                   "past_present_share_buffer": result.target == "onnxruntime",
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def user_location(location: str) -> str:
    """A site's module path in the user's model (without the capture wrappers' prefix)."""
    prefix = "inner.model."
    return location[len(prefix):] if location.startswith(prefix) else location


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)
