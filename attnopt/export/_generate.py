"""Generation runners over an exported decoder file (onnxruntime, IOBinding).

One session runs prefill (past length 0) and every decode step. Two cache modes:
  * ``"growing"`` (optimum's ``ORTModelForCausalLM`` style): each step's presents, left where
    onnxruntime allocated them, are bound as the next step's past (no copy through numpy);
  * ``"shared"`` (onnxruntime-genai's ``past_present_share_buffer``): one preallocated
    ``[B, kv_heads, max_length, head_dim]`` buffer per cache tensor is bound as both past and
    present; ``GroupQueryAttention`` appends the new keys in place. Only the ``onnxruntime``
    target can do this (the standard ``Attention`` op always returns a new present).

Bounded cache (``streaming=(sinks, window)``, files whose sites are all ``attnopt.Streaming``):
let ``K = sinks + window - 1``. The graph's pattern is in cache-index space: the query in slot
``i`` sees the slots ``j < sinks`` and ``i - j < window``, so the slots between the sinks and the
window are hidden by the graph's own mask. The runner therefore lets the cache grow to
``K + evict_every`` slots (default ``evict_every = window``) and only then compacts it to ``K``:
it keeps the slots ``[0, sinks)`` and the last ``window - 1`` and drops the same columns of the
``attention_mask`` it passes to the graph. Every query still sees exactly its sinks and its
recent window, as in the whole-sequence variant (``evict_every=1`` compacts after every step;
the tokens are the same, the logits equal up to float summation order); ``position_ids`` stay
absolute (computed from the full mask). The cache, and the memory, are then flat in the
generated length.
  * ``"shared"`` (the default for Streaming files of the ``onnxruntime`` target): one buffer of
    ``max(prompt, K + evict_every)`` slots per cache tensor, a numpy array wrapped without copy
    by ``OrtValue.ortvalue_from_numpy`` (CPU) and bound as past and present; the kernel appends
    in place at ``total_sequence_length - 1`` (the graph mask's length) and compaction is an
    in-place slice copy of ``window - 1`` slots every ``evict_every`` steps.
  * ``"growing"``: onnxruntime copies the past into a new present every step anyway; compaction
    makes a new past of the kept slots.
Without eviction (``evict=False``, onnxruntime-genai, optimum) the same file computes the same
attention over an unbounded cache.

Recurrent state (``state_features=F``, files whose sites are all causal ``attnopt.Linear``): the
past pair of each layer is the state ``S [B, kv_heads, F, value_dim]`` (``.key``) and
``z [B, kv_heads, F, 1]`` (``.value``), zeros before the prompt; each step's presents are bound
as the next step's pasts (``"growing"`` mode, the only one: the standard ops that compute the
state cannot write over their input), so the bound memory is the same at every step. The
``attention_mask`` still grows (positions come from it; the graph reads its last columns).

Greedy by default; ``do_sample=True`` draws from ``softmax(logits / temperature)`` restricted to
the ``top_k`` best tokens. Rows that emitted ``eos_token_id`` continue with ``pad_token_id``
and generation stops when every row has finished, as HF ``generate`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnopt.errors import ConfigError

CACHE_MODES = ("growing", "shared")


@dataclass
class Generation:
    """Generated tokens and timings.

    Attributes:
        sequences: ``[B, S + new]`` int64, the prompt followed by the generated tokens.
        logits: per step ``[B, vocab]`` float logits of the chosen position (when kept).
        prefill_s: seconds of the prefill run.
        decode_s: seconds of all decode steps.
        new_tokens: decode steps run + 1 (tokens generated per row).
        cache_lengths: per step, the cache slots in use after the graph ran (its
            ``total_sequence_length``: the prefill's holds the whole prompt; compaction of a
            bounded cache comes after it).
        cache_capacity: slots allocated per cache tensor: the shared buffer's length, or the
            longest present of a growing cache.
        step_s: per step, seconds (prefill first; eviction included).
        cache_shapes: per step, the shape of the first present (``present.0.key``) the graph
            returned: ``[B, kv_heads, slots, head_dim]`` for a KV cache, the constant
            ``[B, kv_heads, F, value_dim]`` for a recurrent state (whose ``cache_lengths`` are
            then ``F``).
    """

    sequences: np.ndarray
    logits: list[np.ndarray] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    cache_lengths: list[int] = field(default_factory=list)
    cache_capacity: int = 0
    step_s: list[float] = field(default_factory=list)
    cache_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per row over the decode steps (prefill excluded)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    @property
    def max_cache_length(self) -> int:
        """The longest cache of the decode steps (the prefill excluded; 0 without any)."""
        return max(self.cache_lengths[1:], default=0)


class OrtRunner:
    """Runs an exported decoder file; see the module docstring.

    Args:
        path: the ``model.onnx`` file.
        layers, kv_heads, head_dim, value_dim: the cache layout.
        shared_ok: whether the file supports a shared past/present buffer.
        streaming: ``(sinks, window)`` when every site is ``Streaming`` with these values: the
            cache can be bounded by eviction (see the module docstring).
        threads: intra-op threads (None: onnxruntime's default).
        spin: let idle onnxruntime threads busy-wait between ops (its default). On cores shared
            with other work, ``False`` was ~1.9x faster for SmolLM2 decode (measured under load;
            see README); onnxruntime-genai's config has no switch for it.
        state_features: F when the file's past pairs are recurrent states ``(S, z)`` (see the
            module docstring), else 0.
    """

    def __init__(self, path: str | Path, *, layers: int, kv_heads: int, head_dim: int,
                 value_dim: int, shared_ok: bool, threads: int | None = None,
                 spin: bool = True, providers: list[str] | None = None,
                 streaming: tuple[int, int] | None = None, state_features: int = 0) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so,
                                            providers=providers or ["CPUExecutionProvider"])
        self.layers, self.kv_heads = layers, kv_heads
        self.head_dim, self.value_dim = head_dim, value_dim
        self.shared_ok = shared_ok
        self.streaming = streaming
        self.state_features = state_features
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dtype = _np_dtype(self.session.get_inputs()[3].type) if len(
            self.input_names) > 3 else np.float32

    def generate(self, input_ids: Any, max_new_tokens: int = 32, *, attention_mask: Any = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 cache: str = "growing", max_length: int | None = None, seed: int = 0,
                 keep_logits: bool = False, evict: bool | None = None,
                 evict_every: int | None = None) -> Generation:
        """Generate ``max_new_tokens`` tokens after ``input_ids`` (left-padded when batched).

        Args:
            input_ids: ``[B, S]`` ints (tensor, array or nested list).
            max_new_tokens: tokens to generate per row.
            attention_mask: ``[B, S]``, 0 at (left) padding; all ones when None.
            do_sample, temperature, top_k: sampling instead of greedy.
            eos_token_id, pad_token_id: stop token(s) and the filler after them.
            cache: ``"growing"`` or ``"shared"`` (see the module docstring).
            max_length: size of the shared buffer (default prompt + max_new_tokens, or with
                eviction ``max(prompt, sinks + window - 1 + evict_every)``).
            seed: sampling seed.
            keep_logits: keep every step's logits in the result.
            evict: bound the cache of a Streaming file (default: whenever the file is one).
            evict_every: with eviction, compact the cache every this many steps, letting it
                grow to ``sinks + window - 1 + evict_every`` slots (default ``window``; 1:
                after every step). Same tokens whatever the value (see the module docstring).
        """
        ids = _as_int64(input_ids, "input_ids")
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ConfigError(f"input_ids must be [batch, length] with length >= 1, got "
                              f"shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask,
                                                                          "attention_mask")
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask shape {mask.shape} differs from input_ids "
                              f"{ids.shape}")
        if cache not in CACHE_MODES:
            raise ConfigError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache == "shared" and self.state_features:
            raise ConfigError("this file keeps a recurrent state (Linear), computed by standard "
                              "ops that cannot write over their input: use cache='growing' (the "
                              "state is fixed-size, fed back every step)")
        if cache == "shared" and not self.shared_ok:
            raise ConfigError("this file cannot share past and present buffers (target 'onnx': "
                              "the standard Attention op returns a new present); use "
                              "cache='growing'")
        evict = self.streaming is not None if evict is None else evict
        if evict and self.streaming is None:
            raise ConfigError("evict=True needs a file whose attention sites are all "
                              "Streaming(sinks, window) with the same values; this one is not")
        bound = None
        if evict:
            sinks, window = self.streaming
            evict_every = window if evict_every is None else evict_every
            if not isinstance(evict_every, int) or evict_every < 1:
                raise ConfigError(f"evict_every must be an int >= 1, got {evict_every!r}")
            bound = (sinks, window, evict_every)
        elif evict_every is not None:
            raise ConfigError("evict_every needs eviction (a Streaming file, evict not False)")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b, s = ids.shape
        total_max = s + max_new_tokens
        if cache == "shared":
            # the last token is not fed back: the graph sees at most total_max - 1 slots
            need = total_max
            if bound:
                need = max(s, min(total_max, bound[0] + bound[1] - 1 + bound[2]))
            max_length = max_length or need
            if max_length < need:
                raise ConfigError(f"max_length {max_length} < the {need} slots this generation "
                                  f"needs (prompt {s}, {max_new_tokens} new tokens"
                                  f"{', bounded cache' if bound else ''})")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        rng = np.random.default_rng(seed)
        state = _State(self, b, cache, max_length, bound)
        out = Generation(sequences=ids)
        unfinished = np.ones(b, dtype=bool)
        tokens = [ids]
        cur_ids, cur_mask, graph_mask = ids, mask, mask
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            logits = state.run(cur_ids, cur_mask, graph_mask)
            graph_mask = state.evict(graph_mask)
            nxt = _choose(logits, do_sample, temperature, top_k, rng)
            dt = time.perf_counter() - t0
            if step == 0:
                out.prefill_s = dt
            else:
                out.decode_s += dt
            if keep_logits:
                out.logits.append(logits.copy())
            if eos:
                nxt = np.where(unfinished, nxt, pad)
                unfinished &= ~np.isin(nxt, list(eos))
            tokens.append(nxt[:, None])
            out.new_tokens = step + 1
            out.cache_lengths.append(state.length)
            out.cache_shapes.append(state.shape)
            out.step_s.append(dt)
            if eos and not unfinished.any():
                break
            cur_ids = nxt[:, None].astype(np.int64)
            cur_mask = np.concatenate([cur_mask, np.ones((b, 1), np.int64)], axis=1)
            graph_mask = np.concatenate([graph_mask, np.ones((b, 1), np.int64)], axis=1)
        out.sequences = np.concatenate(tokens, axis=1)
        out.cache_capacity = state.capacity if cache == "shared" else max(out.cache_lengths)
        return out


class _State:
    """The IOBinding and cache of one generation.

    ``bound``: ``(sinks, window, evict_every)`` for a bounded cache, else None.
    """

    def __init__(self, runner: OrtRunner, batch: int, cache: str, max_length: int | None,
                 bound: tuple[int, int, int] | None):
        import onnxruntime as ort

        self.r = runner
        self.batch = batch
        self.cache = cache
        self.bound = bound
        self.length = 0
        self.shape: tuple[int, ...] = ()
        self.capacity = (max_length or 0) if cache == "shared" else 0
        self.binding = runner.session.io_binding()
        names = []
        for i in range(runner.layers):
            names += [(f"past_key_values.{i}.key", f"present.{i}.key", runner.head_dim),
                      (f"past_key_values.{i}.value", f"present.{i}.value", runner.value_dim)]
        n = self.capacity
        if runner.state_features:  # S [B, Hkv, F, Dv] and z [B, Hkv, F, 1], zero at first
            names = [(past, present, runner.value_dim if i % 2 == 0 else 1)
                     for i, (past, present, _) in enumerate(names)]
            n = runner.state_features
        self.names = names
        # shared: the kernel writes through these OrtValues into the numpy arrays (CPU
        # ortvalue_from_numpy wraps the array's memory), so compaction can work on the arrays
        self.arrays = [np.zeros((batch, runner.kv_heads, n, d), runner.dtype)
                       for _, _, d in names]
        self.past = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]

    def run(self, ids: np.ndarray, mask: np.ndarray, graph_mask: np.ndarray) -> np.ndarray:
        """One forward (prefill or decode); returns the last position's logits ``[B, V]``.

        ``mask`` is the full ``[B, T]`` mask (absolute positions come from it), ``graph_mask``
        the mask over the cache slots the graph sees (``mask`` minus evicted columns).
        """
        io = self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        # HF's positions: cumsum(mask) - 1, and 1 at padding (attnopt.export._decoder_capture)
        pos = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)[:, -ids.shape[1]:]
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(graph_mask))
        if "position_ids" in self.r.input_names:
            io.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
        io.bind_output("logits", "cpu")
        for (past_name, present_name, _), value in zip(self.names, self.past):
            io.bind_ortvalue_input(past_name, value)
            if self.cache == "shared":
                io.bind_ortvalue_output(present_name, value)
            else:
                io.bind_output(present_name, "cpu")
        self.r.session.run_with_iobinding(io)
        outs = io.get_outputs()  # in binding order: logits, then the presents
        if self.cache == "growing":
            self.past = list(outs[1:])
            self.length = self.past[0].shape()[2]
            self.shape = tuple(self.past[0].shape())
        else:
            self.length = graph_mask.shape[1]
            self.shape = (*self.arrays[0].shape[:2], self.length, self.arrays[0].shape[3])
        return outs[0].numpy()[:, -1, :]

    def evict(self, graph_mask: np.ndarray) -> np.ndarray:
        """Compact a bounded cache that reached ``sinks + window - 1 + evict_every`` slots.

        Keeps the slots ``[0, sinks)`` and the last ``window - 1``, and the mask's columns alike;
        ``length`` keeps the slots the step returned (``Generation.cache_lengths``).
        """
        if self.bound is None:
            return graph_mask
        import onnxruntime as ort

        sinks, window, every = self.bound
        kept, t = sinks + window - 1, graph_mask.shape[1]
        if t < kept + every:
            return graph_mask
        if self.cache == "shared":
            for a in self.arrays:  # numpy copes with the overlap (evict_every < window - 1)
                a[:, :, sinks:kept] = a[:, :, t - (window - 1):t]
            return np.ascontiguousarray(np.concatenate(
                [graph_mask[:, :sinks], graph_mask[:, t - (window - 1):]], axis=1))
        keep = np.r_[0:sinks, t - (window - 1):t]
        self.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(
            v.numpy()[:, :, keep])) for v in self.past]
        return np.ascontiguousarray(graph_mask[:, keep])


def _choose(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None,
            rng: np.random.Generator) -> np.ndarray:
    if not do_sample:
        return logits.argmax(-1).astype(np.int64)
    x = logits.astype(np.float64) / max(temperature, 1e-6)
    if top_k:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[1], p=row) for row in p], dtype=np.int64)


def _as_int64(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        return np.ascontiguousarray(np.asarray(x, dtype=np.int64))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be integers, got {type(x).__name__}") from e


def _np_dtype(onnx_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(onnx_type, np.float32)
