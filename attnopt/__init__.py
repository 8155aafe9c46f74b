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
from attnopt.export.onnx import ExportResult, export_onnx
from attnopt.report import Report, SiteResult
from attnopt.sites import AttentionSite
from attnopt.variants import (
    BlockTopK,
    Fused,
    Linear,
    Neighborhood2D,
    SlidingWindow,
    Streaming,
    Variant,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionSite",
    "BlockTopK",
    "AttnoptError",
    "CallError",
    "CaptureError",
    "Config",
    "ConfigError",
    "ExportError",
    "ExportResult",
    "Fused",
    "Linear",
    "Neighborhood2D",
    "OptimizedModel",
    "Report",
    "ServingError",
    "SiteResult",
    "SlidingWindow",
    "Streaming",
    "ValidationError",
    "Variant",
    "VariantNotApplicableError",
    "export_onnx",
    "find_attention",
    "load",
    "optimize",
    "save",
]
