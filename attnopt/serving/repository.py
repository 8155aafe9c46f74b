"""Triton model repository: exported model → ``<repo>/<name>/{config.pbtxt, 1/model.*}``.

Three layouts of the same model, chosen by ``backend``:

* ``"onnxruntime"`` — ``platform: "onnxruntime_onnx"`` + ``1/model.onnx``: NVIDIA's Triton
  container loads it natively (production serving).
* ``"tensorrt"`` — ``platform: "tensorrt_plan"`` + ``1/model.plan`` (an engine built from the
  ONNX file, whose inputs/outputs the config describes).
* ``"python"`` — ``backend: "python"`` + ``1/model.py`` (onnxruntime on ``1/model.onnx``): for the
  pip-installed tritonserver bundled with nvidia-pytriton, which has the Python backend but no
  onnxruntime backend (``attnopt serve``, tests, benchmarks).

Every layout gets the inputs/outputs (names, data types, dims) from the ONNX file, the batching
options and the instance group; the written config is parsed back with Triton's own schema and
checked against the model file (:mod:`attnopt.serving._schema`). The model directory is built
beside its final place and renamed into it only when complete and valid: a failure leaves the
repository as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from attnopt.errors import ConfigError
from attnopt.serving import _onnx_io, _schema

log = logging.getLogger("attnopt.serving")

Backend = Literal["onnxruntime", "tensorrt", "python"]
Device = Literal["cpu", "gpu"]
BACKENDS = ("onnxruntime", "tensorrt", "python")
_PYTHON_MODEL = Path(__file__).with_name("_triton_python_model.py")


@dataclass(frozen=True, kw_only=True)
class DynamicBatching:
    """Triton's dynamic batcher: merge concurrent requests into one model execution.

    Attributes:
        preferred_batch_sizes: batch sizes the batcher aims for (each ≤ max_batch_size);
            empty means ``(max_batch_size // 2, max_batch_size)`` when that is ≥ 1.
        max_queue_delay_us: how long a request may wait for others to join its batch.
    """

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 500

    def __post_init__(self) -> None:
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if any(int(p) < 1 for p in self.preferred_batch_sizes):
            raise ConfigError(f"preferred_batch_sizes must be positive, got "
                              f"{self.preferred_batch_sizes}")


@dataclass
class TritonModel:
    """One model written into a Triton model repository."""

    repository: Path
    name: str
    backend: str
    config_text: str

    @property
    def model_dir(self) -> Path:
        """``<repository>/<name>``."""
        return self.repository / self.name

    @property
    def config_path(self) -> Path:
        """``<repository>/<name>/config.pbtxt``."""
        return self.model_dir / "config.pbtxt"


def write_triton_repository(
    export_result: Any,
    repo_dir: str | os.PathLike,
    name: str,
    *,
    max_batch_size: int = 8,
    dynamic_batching: bool | DynamicBatching = True,
    instances: int = 1,
    backend: Backend = "onnxruntime",
    device: Device | None = None,
    engine: str | os.PathLike | None = None,
    threads: int = 0,
    overwrite: bool = False,
) -> TritonModel:
    """Write one model (config + version 1) into a Triton model repository.

    Args:
        export_result: an :class:`attnopt.ExportResult` or the path of an ``.onnx`` file.
        repo_dir: the repository directory (created if missing).
        name: the model's name (its directory; letters, digits, ``_ . -``).
        max_batch_size: largest batch Triton may send in one execution; 0 disables batching
            (then the config keeps the batch dim). Needs a dynamic batch axis in the file.
        dynamic_batching: True for the default batcher, a :class:`DynamicBatching`, or False.
        instances: model instances (parallel executions) in the instance group.
        backend: ``"onnxruntime"`` (NVIDIA's container), ``"tensorrt"`` (needs ``engine``) or
            ``"python"`` (the pip-installed tritonserver of ``attnopt serve``).
        device: ``"gpu"`` → ``KIND_GPU`` instances, ``"cpu"`` → ``KIND_CPU``; default GPU for
            TensorRT, else CPU.
        engine: a TensorRT ``.plan`` built from the ONNX file (``backend="tensorrt"`` only).
        threads: ONNX Runtime intra-op threads per instance (0: one per core).
        overwrite: replace an existing ``<repo_dir>/<name>``.

    Returns:
        A :class:`TritonModel` (directory, config text).

    Raises:
        ConfigError: bad arguments, a model the options cannot describe (e.g. batching on a
            fixed batch dim), or a config that Triton's schema rejects; nothing is left behind.
    """
    onnx_path = _onnx_file(export_result)
    _check_args(name, max_batch_size, instances, backend, engine, threads)
    device = device or ("gpu" if backend == "tensorrt" else "cpu")
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"device must be 'cpu' or 'gpu', got {device!r}")
    batching = _batching(dynamic_batching, max_batch_size)
    io = _onnx_io.model_io(onnx_path)
    _check_batch_axis(io, max_batch_size, onnx_path)
    text = config_text(name, io, backend=backend, max_batch_size=max_batch_size,
                       batching=batching, instances=instances, device=device, threads=threads,
                       source=onnx_path.name)

    repo = Path(repo_dir)
    created = not repo.exists()
    final = repo / name
    if final.exists() and not overwrite:
        raise ConfigError(f"{final} already exists; pass overwrite=True (--overwrite) or "
                          "another name")
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    except OSError as e:
        raise ConfigError(f"cannot write the repository {repo}: {e}") from e
    try:
        _fill(staging, text, onnx_path, backend, engine)
        check_model_dir(staging, dir_name=None, expected_name=name)
        _move_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(repo, ignore_errors=True)
        raise
    log.info("wrote Triton model %s (%s, max_batch_size %d)", final, backend, max_batch_size)
    return TritonModel(repo, name, backend, text)


def config_text(name: str, io: dict, *, backend: Backend, max_batch_size: int,
                batching: DynamicBatching | None, instances: int, device: Device,
                threads: int, source: str = "") -> str:
    """The ``config.pbtxt`` text for a model with inputs/outputs ``io`` (full dims)."""
    lines = [f"# Triton model configuration written by attnopt from {source or 'an ONNX file'}.",
             f'name: "{name}"']
    if backend == "onnxruntime":
        lines.append('platform: "onnxruntime_onnx"')
    elif backend == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append('backend: "python"')
    lines.append(f"max_batch_size: {max_batch_size}")
    for kind in ("input", "output"):
        entries = []
        for tname, (dtype, dims) in io[kind].items():
            d = dims[1:] if max_batch_size > 0 else dims
            entries.append(f'  {{\n    name: "{tname}"\n    data_type: {dtype}\n'
                           f'    dims: [ {", ".join(str(x) for x in d)} ]\n  }}')
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if batching is not None:
        pref = batching.preferred_batch_sizes or _default_preferred(max_batch_size)
        body = ""
        if pref:
            body += f"  preferred_batch_size: [ {', '.join(str(p) for p in pref)} ]\n"
        body += f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n"
        lines.append("dynamic_batching {\n" + body + "}")
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    if backend == "onnxruntime":
        # level 1: basic + extended ORT graph optimizations (the backend's -1 is basic only)
        lines.append("optimization {\n  graph { level: 1 }\n}")
    if backend in ("onnxruntime", "python"):
        params = {"intra_op_thread_count": str(threads), "inter_op_thread_count": "1",
                  "execution_mode": "0"}
        if backend == "python":
            params["onnx_file"] = "model.onnx"
        for k, v in params.items():
            lines.append(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    return "\n".join(lines) + "\n"


def check_model_dir(model_dir: str | os.PathLike, *, dir_name: str | None = "",
                    expected_name: str | None = None) -> Any:
    """Validate ``<model_dir>/config.pbtxt`` against Triton's schema and the model file in ``1/``.

    Args:
        model_dir: a model directory of a repository.
        dir_name: the name Triton will see ("" = the directory's own name; None = skip).
        expected_name: for a staging directory, the name the config must carry.

    Returns:
        The parsed ``ModelConfig``.

    Raises:
        ConfigError: the config or the directory layout is invalid (the message says where).
    """
    model_dir = Path(model_dir)
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.pbtxt")
    config = _schema.parse_config(path.read_text(), where=str(path))
    if dir_name == "":
        dir_name = model_dir.name
    if expected_name is not None and config.name != expected_name:
        raise ConfigError(f"{path}: name {config.name!r}, expected {expected_name!r}")
    version = model_dir / "1"
    onnx_file = version / "model.onnx"
    if config.platform == "tensorrt_plan":
        if not (version / "model.plan").is_file():
            raise ConfigError(f"{version} has no model.plan for platform tensorrt_plan")
        io = _onnx_io.model_io(onnx_file) if onnx_file.is_file() else None
    else:
        if config.backend == "python" and not (version / "model.py").is_file():
            raise ConfigError(f"{version} has no model.py for the Python backend")
        if not onnx_file.is_file():
            raise ConfigError(f"{version} has no model.onnx")
        io = _onnx_io.model_io(onnx_file)
    _schema.check_semantics(config, io, where=str(path), dir_name=dir_name)
    return config


# -- helpers -------------------------------------------------------------------------------------


def _onnx_file(export_result: Any) -> Path:
    path = getattr(export_result, "path", export_result)
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError("export_result must be an attnopt ExportResult or an .onnx path, got "
                          f"{type(export_result).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    if path.suffix != ".onnx":
        raise ConfigError(f"{path} is not an .onnx file; pass the ONNX export (for a TensorRT "
                          "engine pass the ONNX it was built from and engine=<.plan>)")
    return path


def _check_args(name: str, max_batch_size: int, instances: int, backend: str,
                engine: Any, threads: int) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name or ""):
        raise ConfigError(f"model name {name!r}: use letters, digits, '_', '.', '-' (it is a "
                          "directory name and part of request URLs)")
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: choose one of {BACKENDS}")
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be an int >= 0, got {max_batch_size!r}")
    if not isinstance(instances, int) or instances < 1:
        raise ConfigError(f"instances must be an int >= 1, got {instances!r}")
    if not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"threads must be an int >= 0 (0: one per core), got {threads!r}")
    if backend == "tensorrt":
        if engine is None or not Path(engine).is_file():
            raise ConfigError("backend='tensorrt' needs engine=<path of the .plan built from "
                              f"this ONNX file>; got {engine!r}")
    elif engine is not None:
        raise ConfigError(f"engine= is only used with backend='tensorrt' (backend is {backend!r})")


def _batching(option: bool | DynamicBatching, max_batch_size: int) -> DynamicBatching | None:
    if option is False or option is None:
        return None
    if max_batch_size == 0:
        if isinstance(option, DynamicBatching):
            raise ConfigError("dynamic batching needs max_batch_size > 0")
        return None  # the default (True) quietly means "batch when the model can"
    batching = DynamicBatching() if option is True else option
    if not isinstance(batching, DynamicBatching):
        raise ConfigError(f"dynamic_batching must be a bool or DynamicBatching, got {option!r}")
    too_big = [p for p in batching.preferred_batch_sizes if p > max_batch_size]
    if too_big:
        raise ConfigError(f"preferred batch sizes {too_big} exceed max_batch_size "
                          f"{max_batch_size}")
    return batching


def _default_preferred(max_batch_size: int) -> list[int]:
    return sorted({p for p in (max_batch_size // 2, max_batch_size) if p >= 1})


def _check_batch_axis(io: dict, max_batch_size: int, path: Path) -> None:
    if max_batch_size == 0:
        return
    for kind in ("input", "output"):
        for tname, (_, dims) in io[kind].items():
            if not dims or dims[0] != -1:
                found = "no dims (a scalar)" if not dims else f"first dim fixed to {dims[0]}"
                raise ConfigError(
                    f"{kind} {tname!r} of {path.name} has {found}, so Triton cannot batch it "
                    f"(max_batch_size={max_batch_size}); export with a dynamic batch axis "
                    "(not --static) or pass max_batch_size=0")


def _fill(staging: Path, text: str, onnx_path: Path, backend: str, engine: Any) -> None:
    version = staging / "1"
    version.mkdir()
    if backend == "tensorrt":
        shutil.copy2(engine, version / "model.plan")
    # the ONNX file also goes beside a TensorRT plan: it documents (and validates) the I/O
    shutil.copy2(onnx_path, version / "model.onnx")
    for rel in _onnx_io.external_data_files(onnx_path):
        src = onnx_path.parent / rel
        if not src.is_file():
            raise ConfigError(f"{onnx_path} refers to external data {rel!r}, which is missing")
        (version / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, version / rel)
    if backend == "python":
        shutil.copy2(_PYTHON_MODEL, version / "model.py")
    (staging / "config.pbtxt").write_text(text)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a repository is shared data


def _move_into_place(staging: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old / final.name, final)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
