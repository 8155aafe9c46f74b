"""A local Triton server for a quick try: the tritonserver bundled with nvidia-pytriton.

    handle = start_server("repo/")          # or an .onnx file
    handle.url                              # http://127.0.0.1:<port>
    handle.stop()

The server runs in its own environment ``.venv-serve`` (``scripts/setup_serve.sh``): pytriton's
wheel carries a real ``tritonserver`` 2.51 binary and the Python backend, but no onnxruntime
backend, so ONNX models are served by a Python-backend model running onnxruntime (a repository
written with ``backend="onnxruntime"`` is served through such a twin, built in a temporary
directory). Production serving is NVIDIA's Triton container on the same repository, where
``onnxruntime_onnx`` and ``tensorrt_plan`` load natively.

Set-up per start: a temporary backend directory holding the Python backend and the stub for the
venv's Python version; ``LD_LIBRARY_PATH`` = pytriton's bundled libraries + the venv
interpreter's ``LIBDIR`` (the stub must load the same libpython as that interpreter); ``PATH``
starts with the venv's ``bin`` (the stub's embedded Python finds the venv's site-packages from
it); HTTP and gRPC on 127.0.0.1 at free ports; metrics off.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnopt.errors import ConfigError, ServingError

log = logging.getLogger("attnopt.serving")

MIN_GLIBC = (2, 35)


@dataclass
class ServeEnv:
    """Where the pip-installed tritonserver and its Python live."""

    venv: Path
    python: Path
    server: Path
    libs: Path
    backend: Path
    stub: Path
    python_libdir: str


def find_serve_env(venv: str | os.PathLike | None = None) -> ServeEnv:
    """Locate ``.venv-serve`` and the tritonserver inside it.

    Looks at ``venv``, then ``$ATTNOPT_SERVE_VENV``, then ``.venv-serve`` in the attnopt checkout
    and in the current directory.

    Raises:
        ServingError: glibc is older than 2.35, or no complete ``.venv-serve`` was found (the
            message says how to create it).
    """
    glibc = glibc_version()
    if glibc is not None and glibc < MIN_GLIBC:
        raise ServingError(f"glibc {glibc[0]}.{glibc[1]} is older than 2.35, which the "
                           "pip-installed tritonserver needs; serve the repository with NVIDIA's "
                           "Triton container instead")
    candidates = [venv, os.environ.get("ATTNOPT_SERVE_VENV"),
                  Path(__file__).resolve().parents[2] / ".venv-serve", Path.cwd() / ".venv-serve"]
    for c in candidates:
        if not c:
            continue
        root = Path(c)
        sites = sorted(root.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
        if (root / "bin" / "python").exists() and sites:
            dist = sites[-1]
            pyver = dist.parents[2].name.removeprefix("python")
            stub = dist / "python_backend_stubs" / pyver / "triton_python_backend_stub"
            if not stub.is_file():
                raise ServingError(f"nvidia-pytriton in {root} has no Python-backend stub for "
                                   f"Python {pyver}")
            libdir = subprocess.run(
                [str(root / "bin" / "python"), "-c",
                 "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                capture_output=True, text=True, check=True).stdout.strip()
            return ServeEnv(root, root / "bin" / "python", dist / "bin" / "tritonserver",
                            dist.parents[1] / "nvidia_pytriton.libs", dist / "backends" / "python",
                            stub, libdir)
    raise ServingError("no .venv-serve with nvidia-pytriton found; create it with "
                       "scripts/setup_serve.sh (or set ATTNOPT_SERVE_VENV)")


def glibc_version() -> tuple[int, int] | None:
    """The C library's version, or None when it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A running local tritonserver; :meth:`stop` ends it (also on ``with`` exit)."""

    process: subprocess.Popen
    repository: Path
    http_port: int
    grpc_port: int
    models: list[str]
    env: ServeEnv
    log_path: Path
    _cleanup: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        """HTTP endpoint (KServe v2 protocol), e.g. ``http://127.0.0.1:8000``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """The gRPC endpoint, ``127.0.0.1:<port>`` (tritonclient.grpc form)."""
        return f"127.0.0.1:{self.grpc_port}"

    def alive(self) -> bool:
        """Whether the server process still runs."""
        return self.process.poll() is None

    def statistics(self, model: str | None = None) -> dict[str, Any]:
        """The server's inference statistics (``GET /v2/models[/<model>]/stats``)."""
        path = f"/v2/models/{model}/stats" if model else "/v2/models/stats"
        return _get_json(self.url + path)

    def logs(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for p in self._cleanup:
            shutil.rmtree(p, ignore_errors=True)
        self._cleanup.clear()
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    model: str | os.PathLike,
    *,
    http_port: int | None = None,
    grpc_port: int | None = None,
    venv: str | os.PathLike | None = None,
    timeout: float = 90.0,
    log_verbose: int = 0,
    max_batch_size: int = 8,
) -> TritonServer:
    """Start the pip-installed tritonserver on 127.0.0.1 and wait until its models are ready.

    Args:
        model: a Triton model repository (as written by :func:`write_triton_repository`, any
            backend but ``tensorrt``) or a single ``.onnx`` file (served under its stem).
        http_port, grpc_port: ports to bind; default: free ones.
        venv: the server environment (default: ``.venv-serve``, see :func:`find_serve_env`).
        timeout: seconds to wait for readiness.
        log_verbose: tritonserver's ``--log-verbose`` level.
        max_batch_size: for an ``.onnx`` file: the batch limit of the generated config.

    Returns:
        A :class:`TritonServer` handle; call ``stop()`` (or use it as a context manager).

    Raises:
        ServingError: no server environment, or the server did not become ready (the message
            ends with the server's log).
        ConfigError: the repository or model file is invalid.
    """
    env = find_serve_env(venv)
    work = Path(tempfile.mkdtemp(prefix="attnopt-triton-"))
    try:
        repo, models = _local_repository(Path(model), work, max_batch_size)
        backends = work / "backends"
        shutil.copytree(env.backend, backends / "python",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(env.stub, backends / "python" / "triton_python_backend_stub")
        http_port = http_port or free_port()
        grpc_port = grpc_port or free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        cmd = [str(env.server), f"--model-repository={repo}", f"--backend-directory={backends}",
               "--http-address=127.0.0.1", f"--http-port={http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
               "--allow-metrics=false", "--strict-readiness=true", "--exit-timeout-secs=10",
               f"--log-verbose={log_verbose}"]
        run_env = dict(os.environ)
        libs = [str(env.libs)] + ([env.python_libdir] if env.python_libdir else [])
        if run_env.get("LD_LIBRARY_PATH"):
            libs.append(run_env["LD_LIBRARY_PATH"])
        run_env["LD_LIBRARY_PATH"] = ":".join(libs)
        run_env["PATH"] = f"{env.venv / 'bin'}:{run_env.get('PATH', '')}"
        run_env.pop("PYTHONPATH", None)  # attnopt's path must not leak into the backend stub
        run_env.pop("PYTHONHOME", None)
        log_path = work / "tritonserver.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=run_env, cwd=work, start_new_session=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    handle = TritonServer(process, repo, http_port, grpc_port, models, env, log_path, [work])
    try:
        _wait_ready(handle, timeout)
    except BaseException:
        handle.stop()
        raise
    log.info("tritonserver ready at %s (gRPC %s), models %s", handle.url, handle.grpc_url,
             models)
    return handle


def _local_repository(model: Path, work: Path, max_batch_size: int) -> tuple[Path, list[str]]:
    """A repository the pip server can load: Python-backend twins of ONNX Runtime models."""
    from attnopt.serving import repository

    if model.is_file():
        if model.suffix != ".onnx":
            raise ConfigError(f"{model}: serve a model repository or an .onnx file")
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in model.stem) or "model"
        repository.write_triton_repository(model, work / "repo", name, backend="python",
                                           max_batch_size=_batchable(model, max_batch_size))
        return work / "repo", [name]
    if not model.is_dir():
        raise ConfigError(f"{model} is neither a model repository nor an .onnx file")
    models = sorted(p for p in model.iterdir() if (p / "config.pbtxt").is_file()
                    and not p.name.startswith("."))
    if not models:
        raise ConfigError(f"{model} has no model directories with a config.pbtxt")
    if all(_backend(p) == "python" for p in models):
        for p in models:
            repository.check_model_dir(p)
        return model, [p.name for p in models]
    repo = work / "repo"
    repo.mkdir()
    for p in models:
        config = repository.check_model_dir(p)
        if config.platform == "tensorrt_plan":
            raise ServingError(f"{p.name}: a TensorRT plan needs a GPU and NVIDIA's Triton "
                               "container; the local pip server cannot load it")
        if config.backend == "python":
            (repo / p.name).symlink_to(p.resolve(), target_is_directory=True)
            continue
        _python_twin(p, config, repo / p.name)
    return repo, [p.name for p in models]


def _python_twin(src: Path, config: Any, dst: Path) -> None:
    """The same model as a Python-backend model (the pip server has no onnxruntime backend)."""
    from google.protobuf import text_format

    from attnopt.serving import repository

    twin = type(config)()
    twin.CopyFrom(config)
    twin.ClearField("platform")
    twin.backend = "python"
    twin.ClearField("optimization")  # ORT-backend graph level: not a Python-backend option
    twin.parameters["onnx_file"].string_value = "model.onnx"
    (dst / "1").mkdir(parents=True)
    (dst / "1" / "model.onnx").symlink_to((src / "1" / "model.onnx").resolve())
    shutil.copy2(repository._PYTHON_MODEL, dst / "1" / "model.py")
    (dst / "config.pbtxt").write_text(text_format.MessageToString(twin))
    repository.check_model_dir(dst)


def _backend(model_dir: Path) -> str:
    from attnopt.serving import _schema

    config = _schema.parse_config((model_dir / "config.pbtxt").read_text(),
                                  where=str(model_dir / "config.pbtxt"))
    return config.backend or config.platform


def _batchable(path: Path, max_batch_size: int) -> int:
    """``max_batch_size`` when every tensor has a dynamic first axis, else 0."""
    from attnopt.serving import _onnx_io

    io = _onnx_io.model_io(path)
    ok = all(d and d[0] == -1 for kind in io.values() for _, d in kind.values())
    return max_batch_size if ok else 0


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - 127.0.0.1 only
        return json.loads(r.read() or b"null")


def _wait_ready(handle: TritonServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise ServingError(f"tritonserver exited with code {handle.process.returncode}: "
                               f"{handle.logs()[-3000:]}")
        try:
            with urllib.request.urlopen(handle.url + "/v2/health/ready", timeout=1) as r:  # noqa: S310
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.1)
    raise ServingError(f"tritonserver was not ready after {timeout:.0f}s: "
                       f"{handle.logs()[-3000:]}")
