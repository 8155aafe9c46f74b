"""ONNX Runtime sessions on exported files: execution providers and GPU-resident I/O.

Providers, in the order ONNX Runtime should try them; each is a name or ``(name, options)``:

* ``"TensorrtExecutionProvider"`` (``"tensorrt"``): TensorRT engines built by ORT for the
  subgraphs TensorRT supports; options such as ``{"trt_fp16_enable": True,
  "trt_engine_cache_enable": True, "trt_engine_cache_path": "trt_cache"}`` (the first run builds
  the engines: cache them).
* ``"CUDAExecutionProvider"`` (``"cuda"``): ``{"device_id": 0, "cudnn_conv_algo_search":
  "HEURISTIC", "enable_cuda_graph": False}``; runs the contrib attention ops attnopt emits
  (MultiHeadAttention, GroupQueryAttention) with ORT's fused CUDA kernels.
* ``"CPUExecutionProvider"`` (``"cpu"``): always last, the fallback for every op.

Without a list, the session uses CUDA then CPU where ``onnxruntime-gpu`` offers CUDA (TensorRT is
opt-in: engine builds take minutes on first use), else CPU.

On a GPU, :func:`bind` keeps inputs and outputs in device memory across runs (``IOBinding``):
``session.run`` would copy every input host→device and every output back on each call.
"""

from __future__ import annotations

from typing import Any

from attnopt.errors import ConfigError

_SHORT = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
          "cpu": "CPUExecutionProvider"}


def providers(requested: list[Any] | None) -> list[Any]:
    """Resolve short names and check availability; default: CUDA (when present) then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    out = []
    for p in requested:
        name, opts = (p if isinstance(p, tuple) else (p, None))
        name = _SHORT.get(str(name).lower(), name)
        if name not in available:
            raise ConfigError(f"execution provider {name!r} is not available in this "
                              f"onnxruntime ({ort.__version__}: {available}); install "
                              "onnxruntime-gpu for CUDA/TensorRT")
        out.append((name, opts) if opts else name)
    return out


def session(path: str, requested: list[Any] | None = None, threads: int | None = None,
            **options: Any):
    """An ``onnxruntime.InferenceSession``; ``options`` are ``SessionOptions`` attributes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    for k, v in options.items():
        if not hasattr(so, k):
            raise ConfigError(f"{k!r} is not an onnxruntime.SessionOptions attribute")
        setattr(so, k, v)
    return ort.InferenceSession(path, so, providers=providers(requested))


def bind(sess, feed: dict[str, Any], device: str = "cuda", device_id: int = 0):
    """An ``IOBinding`` with ``feed`` copied to ``device`` once and outputs kept there.

    Run it with ``sess.run_with_iobinding(binding)`` as often as needed, then read the outputs
    with ``binding.copy_outputs_to_cpu()`` (or pass ``binding.get_outputs()`` — ``OrtValue`` s on
    the device — to the next model). ``device="cpu"`` works everywhere (same API, no copies).
    """
    import numpy as np
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, value in feed.items():
        array = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach")
                                     else value)
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device,
                                                                          device_id))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device, device_id)
    return binding
