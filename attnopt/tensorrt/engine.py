"""Engine builds through the TensorRT Python API: ONNX file → serialized plan (needs a GPU).

    build_engine("m.onnx", "m.plan")        # profiles from the ranges recorded in the file

Steps, as the TensorRT Python API documents them: ``trt.Builder(logger)``;
``builder.create_network(flags)`` (strongly typed: the default on 11.x, the
``STRONGLY_TYPED`` creation flag on 10.x, so precision comes from the ONNX types);
``trt.OnnxParser(network, logger).parse_from_file(path)`` with every ``ParserError`` (node,
node name, operator, description) surfaced; ``builder.create_builder_config()`` with the
workspace pool limit and an optional timing cache; one optimization profile per profile given
(``create_optimization_profile`` + ``set_shape(input, min, opt, max)`` for every dynamic input);
``builder.build_serialized_network(network, config)`` → ``IHostMemory`` written atomically.

Profile construction (:func:`profiles_from_onnx`) needs no TensorRT and is what the tests check
here; everything that imports ``tensorrt`` needs the package and a CUDA GPU.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnopt.errors import ConfigError, ExportError

log = logging.getLogger("attnopt.tensorrt")

#: metadata key under which the export records the shape ranges it verified.
RANGES_KEY = "attnopt.tensorrt.shape_ranges"

Shape = tuple[int, ...]


class EngineBuildError(ExportError):
    """TensorRT is missing, its parser refused the file, or the engine build failed."""


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ``{input: (min, opt, max)}`` for every dynamic input."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        """Plain data (the form the export records in the file's metadata)."""
        return {k: {"min": list(a), "opt": list(b), "max": list(c)}
                for k, (a, b, c) in self.shapes.items()}


@dataclass
class EngineBuild:
    """A built engine: the plan file and how it was built."""

    plan_path: Path
    profiles: list[Profile]
    tensorrt_version: str
    build_seconds: float
    plan_bytes: int
    timing_cache: Path | None = None


# -- profiles (no TensorRT needed) -----------------------------------------------------------------


def onnx_inputs(onnx_path: str | os.PathLike) -> dict[str, list[int | str]]:
    """The graph inputs of an ONNX file: name → dims (ints, or the dim's name when dynamic)."""
    model = _load_graph(onnx_path)
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[int | str]] = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim
        out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                       for d in dims]
    return out


def recorded_ranges(onnx_path: str | os.PathLike) -> dict[str, Any] | None:
    """The shape ranges the export verified, as recorded in the file's metadata (or None)."""
    model = _load_graph(onnx_path)
    for p in model.metadata_props:
        if p.key == RANGES_KEY:
            return json.loads(p.value)
    return None


def profiles_from_onnx(onnx_path: str | os.PathLike,
                       profiles: Any = None) -> list[Profile]:
    """Optimization profiles for ``onnx_path``, validated against its real inputs.

    Args:
        onnx_path: the ONNX file.
        profiles: None (use the ranges the export recorded in the file's metadata), one
            ``{input: (min, opt, max)}`` mapping, or a list of them (one profile each).

    Returns:
        The profiles ([] when every input is static).

    Raises:
        ConfigError: an unknown input, a rank or static-dim mismatch, ``min <= opt <= max``
            violated, a dynamic input left out, or a dim shared by several inputs (same dim
            name) given different sizes; or no recorded ranges and no ``profiles``.
    """
    inputs = onnx_inputs(onnx_path)
    dynamic = [n for n, dims in inputs.items() if any(not isinstance(d, int) for d in dims)]
    if profiles is None:
        recorded = recorded_ranges(onnx_path)
        if recorded is None:
            if not dynamic:
                return []
            raise ConfigError(f"{onnx_path} has dynamic inputs {dynamic} and no recorded shape "
                              "ranges (it was not written by attnopt's tensorrt target): pass "
                              "profiles={'input': (min_shape, opt_shape, max_shape), ...}")
        profiles = {k: (v["min"], v["opt"], v["max"]) for k, v in recorded.items()}
    given = [profiles] if isinstance(profiles, dict) else list(profiles)
    if not given and dynamic:
        raise ConfigError(f"dynamic inputs {dynamic} need at least one profile")
    return [_validate(p, inputs, dynamic, i) for i, p in enumerate(given)]


def _validate(profile: dict, inputs: dict[str, list[int | str]], dynamic: list[str],
              index: int) -> Profile:
    where = f"profile {index}"
    if not isinstance(profile, dict):
        raise ConfigError(f"{where}: expected {{input: (min, opt, max)}}, got "
                          f"{type(profile).__name__}")
    unknown = sorted(set(profile) - set(inputs))
    if unknown:
        raise ConfigError(f"{where}: {unknown} are not inputs of the model "
                          f"(inputs: {list(inputs)})")
    missing = [n for n in dynamic if n not in profile]
    if missing:
        raise ConfigError(f"{where}: dynamic inputs {missing} have no (min, opt, max) shapes")
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    sizes: dict[str, tuple[int, int, int, str]] = {}
    for name, triple in profile.items():
        try:
            mn, opt, mx = (tuple(int(d) for d in s) for s in triple)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name!r} needs (min, opt, max) shapes of ints, got "
                              f"{triple!r}") from None
        dims = inputs[name]
        for label, s in (("min", mn), ("opt", opt), ("max", mx)):
            if len(s) != len(dims):
                raise ConfigError(f"{where}: {name!r} {label} shape {list(s)} has rank "
                                  f"{len(s)}; the input has rank {len(dims)} ({dims})")
        for axis, d in enumerate(dims):
            lo, mid, hi = mn[axis], opt[axis], mx[axis]
            if not 0 < lo <= mid <= hi:
                raise ConfigError(f"{where}: {name!r} axis {axis}: need 0 < min <= opt <= max, "
                                  f"got {lo}, {mid}, {hi}")
            if isinstance(d, int) and not lo == mid == hi == d:
                raise ConfigError(f"{where}: {name!r} axis {axis} is fixed to {d} by the model; "
                                  f"got {lo}, {mid}, {hi}")
            if isinstance(d, str) and d != "?":
                seen = sizes.setdefault(d, (lo, mid, hi, name))
                if seen[:3] != (lo, mid, hi):
                    raise ConfigError(
                        f"{where}: dim {d!r} is shared by {seen[3]!r} and {name!r} but gets "
                        f"{list(seen[:3])} and {[lo, mid, hi]}: give both the same range")
        shapes[name] = (mn, opt, mx)
    return Profile(shapes)


# -- the build (TensorRT + GPU) --------------------------------------------------------------------


def import_tensorrt():
    """``import tensorrt``, or an :class:`EngineBuildError` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineBuildError(
            "the 'tensorrt' Python package is not installed (it needs NVIDIA's package index "
            "and a CUDA GPU: pip install tensorrt-cu12 or tensorrt-cu13 on the GPU machine). "
            "The ONNX file and its trtexec / polygraphy commands work without it: see the "
            "'.trt.txt' file next to the export") from e
    return trt


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike,
                 profiles: Any = None, timing_cache: str | os.PathLike | None = None,
                 workspace: int | None = None) -> EngineBuild:
    """Build a serialized TensorRT engine (a ``.plan``) from an ONNX file.

    Args:
        onnx_path: the ONNX file (``target="tensorrt"`` exports record their shape ranges).
        plan_path: where to write the plan (written under a temporary name, then moved).
        profiles: None (the recorded ranges), one ``{input: (min, opt, max)}`` mapping or a
            list of them; see :func:`profiles_from_onnx`.
        timing_cache: a timing-cache file, read if it exists and written back after the build.
        workspace: the builder's workspace memory pool limit in bytes (TensorRT's default when
            None).

    Returns:
        An :class:`EngineBuild`.

    Raises:
        ConfigError: bad profiles or paths.
        EngineBuildError: ``tensorrt`` missing, the parser refused a node (every parser error
            is listed with its node), or ``build_serialized_network`` returned nothing.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise ConfigError(f"{onnx_path}: no such ONNX file")
    if not plan_path.parent.is_dir():
        raise ConfigError(f"cannot write {plan_path}: directory {plan_path.parent} does not "
                          "exist")
    chosen = profiles_from_onnx(onnx_path, profiles)
    trt = import_tensorrt()
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(_parser_errors(parser, onnx_path, trt.__version__))
    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    for profile in chosen:
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile.shapes.items():
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} could not build an engine from "
                               f"{onnx_path} (build_serialized_network returned None; the "
                               "TensorRT log above says why)")
    write_atomic(plan_path, memoryview(serialized))
    if cache_path is not None:
        write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - t0
    log.info("built %s with TensorRT %s in %.1fs", plan_path, trt.__version__, seconds)
    return EngineBuild(plan_path, chosen, trt.__version__, seconds, plan_path.stat().st_size,
                       cache_path)


def _network_flags(trt) -> int:
    """Strongly typed: 11.x networks are (the flag is deprecated there); 10.x needs the flag."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _parser_errors(parser, onnx_path: Path, version: str) -> str:
    lines = [f"TensorRT {version}'s ONNX parser refused {onnx_path} "
             f"({parser.num_errors} errors):"]
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        lines.append(f"  node {e.node()} {e.node_name()!r} ({e.node_operator()}): "
                     f"{e.code()}: {e.desc()}")
    lines.append(f"  run `attnopt check-trt {onnx_path} --version {version}` for the "
                 "documented reasons and fixes")
    return "\n".join(lines)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- running a plan (TensorRT + GPU + torch.cuda) --------------------------------------------------


class EngineRunner:
    """Run a serialized engine on torch CUDA tensors (for parity checks against torch).

    ``runner(feed) -> {output name: tensor}``: inputs are moved to the GPU in the engine's
    dtypes, shapes set with ``set_input_shape``, every I/O address bound with
    ``set_tensor_address``, then ``execute_async_v3`` on the current CUDA stream.
    """

    def __init__(self, plan_path: str | os.PathLike) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EngineBuildError("running a TensorRT engine needs a CUDA GPU (torch sees none)")
        trt = import_tensorrt()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize {plan_path} (built by "
                                   "another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _torch_dtype(self, name: str):
        import torch

        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16,
                 trt.bfloat16: torch.bfloat16, trt.int32: torch.int32, trt.int64: torch.int64,
                 trt.bool: torch.bool, trt.int8: torch.int8, trt.uint8: torch.uint8}
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Run once; ``feed`` maps every input name to a tensor or numpy array."""
        import torch

        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise ConfigError(f"the engine takes inputs {self.inputs}; missing {missing}")
        keep = []
        for name in self.inputs:
            t = torch.as_tensor(feed[name]).to("cuda", self._torch_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return outs


def parity(model: Any, inputs: Any, export_result: Any, plan_path: str | os.PathLike) -> Any:
    """Error of the engine against torch: ``model(inputs)`` vs the engine on the same inputs.

    Args:
        model: the torch model (or :class:`attnopt.OptimizedModel`) in the precision exported.
        inputs: its example inputs (tuple / dict), as given to ``export_onnx``.
        export_result: the :class:`attnopt.ExportResult` of the file the plan was built from
            (its input / output names map the feed and the outputs).
        plan_path: the plan built by :func:`build_engine`.

    Returns:
        :class:`attnopt.verify.ErrorStats` over every output, in output order.
    """
    import torch
    import torch.utils._pytree as pytree

    from attnopt._inputs import normalize
    from attnopt.verify import compare

    norm = normalize(inputs)
    with torch.no_grad():
        ref = norm.call(model)
    ref_leaves = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    outs = EngineRunner(plan_path)(export_result.feed(inputs))
    got = [outs[n].cpu() for n in export_result.output_names if n in outs]
    return compare(ref_leaves[: len(got)], got)


def _load_graph(onnx_path: str | os.PathLike):
    import onnx

    if not os.path.isfile(onnx_path):
        raise ConfigError(f"{onnx_path}: no such ONNX file")
    return onnx.load(str(onnx_path), load_external_data=False)
