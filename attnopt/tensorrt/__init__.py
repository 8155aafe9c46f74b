"""TensorRT: TensorRT-ready ONNX, a GPU-free compatibility check, engine builds.

    attnopt.export_onnx(model, inputs, "m.onnx", target="tensorrt", tensorrt_version="11.4",
                        precision="fp16")         # standard ONNX TensorRT's parser accepts
    attnopt.tensorrt.check("m.onnx", version="11.4")             # no GPU needed
    attnopt.tensorrt.build_engine("m.onnx", "m.plan")            # needs tensorrt + a GPU

The check reads the ONNX-TensorRT operator matrix of the chosen release
(``operator_matrix.json``); the engine build follows the TensorRT Python API (``Builder``,
``OnnxParser``, ``BuilderConfig``, optimization profiles, ``build_serialized_network``).
"""

from attnopt.tensorrt._matrix import DEFAULT_VERSION, known_versions
from attnopt.tensorrt.check import CheckResult, Problem, check
from attnopt.tensorrt.engine import (
    EngineBuild,
    EngineBuildError,
    EngineRunner,
    Profile,
    build_engine,
    profiles_from_onnx,
)

__all__ = [
    "DEFAULT_VERSION",
    "CheckResult",
    "EngineBuild",
    "EngineBuildError",
    "EngineRunner",
    "Problem",
    "Profile",
    "build_engine",
    "check",
    "known_versions",
    "profiles_from_onnx",
]
