"""Serving: Triton model repositories for exported models, and a local Triton server.

    res = attnopt.export_onnx(fast, inputs, "model.onnx")
    write_triton_repository(res, "repo", "bert")                    # NVIDIA's Triton container
    write_triton_repository(res, "repo", "bert", backend="python")  # pip tritonserver
    with start_server("repo") as server:                            # 127.0.0.1, free ports
        ...  # tritonclient.http.InferenceServerClient(server.url[7:])

Every written ``config.pbtxt`` is checked against Triton's own schema (the ``model_config.proto``
module shipped in ``tritonclient``) and against the model file (names, data types, dims, batch
axis).
"""

from attnopt.serving.launcher import TritonServer, find_serve_env, start_server
from attnopt.serving.repository import (
    DynamicBatching,
    TritonModel,
    check_model_dir,
    write_triton_repository,
)

__all__ = [
    "DynamicBatching",
    "TritonModel",
    "TritonServer",
    "check_model_dir",
    "find_serve_env",
    "start_server",
    "write_triton_repository",
]
