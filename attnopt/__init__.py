"""attnopt: find every attention in a PyTorch model, rewrite it, verify it, export it.

import attnopt
sites = attnopt.find_attention(model, example_inputs)
fast = attnopt.optimize(model, example_inputs)      # exact: every attention fused
print(fast.report)
attnopt.save(fast, "model.pt2"); fast = attnopt.load("model.pt2")
"""

from attnopt import serving  # noqa: F401 - attnopt.serving.write_triton_repository(...)
from attnopt._archive import load, save
from attnopt.api import OptimizedModel, find_attention, optimize
from attnopt.auto import Auto
from attnopt.config import Config
from attnopt.errors import (
    AttnoptError,
    CallError,
    CaptureError,
    ConfigError,
    ExportError,
    ServingError,
    ValidationError,
    VariantNotApplicableError,
)
from attnopt.export.decoder import DecoderExport, export_decoder
from attnopt.export.onnx import ExportResult, export_onnx
from attnopt.report import Report, SiteResult
from attnopt.sites import AttentionSite
from attnopt.variants import (
    BlockTopK,
    Fused,
    GroupKV,
    Linear,
    Neighborhood2D,
    PruneHeads,
    SlidingWindow,
    Streaming,
    StreamingHeads,
    Variant,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Subpackages loaded on first use, so ``import attnopt`` stays fast:
    # ``attnopt.tensorrt.check(...)``.
    if name == "tensorrt":
        import importlib

        return importlib.import_module("attnopt.tensorrt")
    raise AttributeError(f"module 'attnopt' has no attribute {name!r}")


__all__ = [
    "Auto",
    "AttentionSite",
    "BlockTopK",
    "AttnoptError",
    "CallError",
    "CaptureError",
    "Config",
    "ConfigError",
    "DecoderExport",
    "ExportError",
    "ExportResult",
    "Fused",
    "GroupKV",
    "Linear",
    "Neighborhood2D",
    "OptimizedModel",
    "PruneHeads",
    "Report",
    "ServingError",
    "SiteResult",
    "SlidingWindow",
    "Streaming",
    "StreamingHeads",
    "ValidationError",
    "Variant",
    "VariantNotApplicableError",
    "export_decoder",
    "export_onnx",
    "find_attention",
    "load",
    "optimize",
    "save",
]


# Public subpackages reached as attributes (attnopt.serving.write_triton_repository).
_PUBLIC_MODULES = ["serving"]


def __dir__() -> list[str]:
    # Other submodules (attnopt.api, attnopt.capture, ...) are importable for advanced use but
    # are not the public API: dir(attnopt) lists the public names only.
    return sorted(__all__ + _PUBLIC_MODULES + ["__version__"])
