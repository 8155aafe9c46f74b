"""Run ``tritonclient`` requests against a local server from attnopt's environment.

tritonclient's HTTP/gRPC clients are installed in ``.venv-serve`` (beside the server), not in
attnopt's environment, so requests go through ``_triton_client.py`` run by that environment's
Python; arrays travel as ``.npz`` files.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from attnopt.errors import ServingError
from attnopt.serving.launcher import TritonServer

_SCRIPT = Path(__file__).with_name("_triton_client.py")


def _save_requests(path: Path, requests: list[dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{i}/{k}": np.ascontiguousarray(v)
                      for i, r in enumerate(requests) for k, v in r.items()})


def _run(server: TritonServer, args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([str(server.env.python), str(_SCRIPT), *args], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ServingError(f"tritonclient run failed ({proc.returncode}): "
                           f"{proc.stderr[-2000:]}\nserver log:\n{server.logs()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def infer(server: TritonServer, model: str, requests: list[dict[str, np.ndarray]], *,
          concurrency: int = 1, timeout: float = 120.0
          ) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Send ``requests`` (input name → array, batch axis first) and return the outputs.

    ``concurrency`` 1 sends them one by one (``infer``); more sends them all at once with
    ``async_infer`` from one HTTP client (up to ``concurrency`` connections).

    Returns:
        Per request the outputs (name → array), and the run's info: ``elapsed_s`` and the
        server's statistics ``before`` / ``after`` (requests, executions).
    """
    with tempfile.TemporaryDirectory(prefix="attnopt-client-") as tmp:
        src, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        _save_requests(src, requests)
        info = _run(server, ["infer", "--url", server.url.removeprefix("http://"),
                             "--model", model, "--inputs", str(src), "--out", str(out),
                             "--concurrency", str(concurrency)], timeout)
        data = np.load(out)
        outputs: list[dict[str, np.ndarray]] = [{} for _ in requests]
        for key in data.files:
            i, name = key.split("/", 1)
            outputs[int(i)][name] = data[key]
    return outputs, info


def load(server: TritonServer, model: str, request: dict[str, np.ndarray], *,
         requests: int = 2000, concurrency: int = 8, warmup: int = 20,
         timeout: float = 600.0) -> dict[str, Any]:
    """Closed-loop load: ``requests`` copies of ``request``, ``concurrency`` in flight (gRPC).

    Returns:
        ``p50_ms``, ``p99_ms``, ``throughput_rps``, ``errors``, ``server_requests``,
        ``server_executions`` (from the server's statistics, warm-up excluded).
    """
    with tempfile.TemporaryDirectory(prefix="attnopt-client-") as tmp:
        src = Path(tmp) / "in.npz"
        _save_requests(src, [request])
        return _run(server, ["load", "--url", server.url.removeprefix("http://"),
                             "--grpc-url", server.grpc_url, "--model", model,
                             "--inputs", str(src), "--requests", str(requests),
                             "--concurrency", str(concurrency), "--warmup", str(warmup),
                             "--timeout", str(timeout)], timeout + 60)
