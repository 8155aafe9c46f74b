"""attnopt: find every attention in a PyTorch model, rewrite it, verify it, export it.

import attnopt
sites = attnopt.find_attention(model, example_inputs)
fast = attnopt.optimize(model, example_inputs)      # exact: every attention fused
print(fast.report)
"""

from attnopt.api import OptimizedModel, find_attention, optimize
from attnopt.config import Config
from attnopt.errors import (
    AttnoptError,
    CaptureError,
    ConfigError,
    ExportError,
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
    "SiteResult",
    "SlidingWindow",
    "Streaming",
    "ValidationError",
    "Variant",
    "VariantNotApplicableError",
    "export_onnx",
    "find_attention",
    "optimize",
]


def __dir__() -> list[str]:
    # Submodules (attnopt.api, attnopt.capture, ...) are importable for advanced use but are
    # not the public API: dir(attnopt) lists the public names only.
    return sorted(__all__ + ["__version__"])
