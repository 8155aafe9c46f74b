"""Config: which variant to apply, per-site overrides, tolerance, calibration data.

The variant configs themselves live in ``attnopt.variants`` (one module each) and are re-exported
from ``attnopt`` by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnopt.errors import ConfigError
from attnopt.variants import Fused, Variant


@dataclass(frozen=True, kw_only=True)
class Config:
    """How ``optimize`` rewrites attention.

    Attributes:
        variant: the variant applied to every site (``Fused()``, exact, by default).
        overrides: per-site choices by module-path glob, first match wins, e.g.
            ``{"model.layers.0.*": Fused(), "*.layers.29.*": None}``; ``None`` leaves the
            matched sites as the original code computed them.
        tolerance: max error (relative to the output's scale) accepted for exact rewrites;
            None picks a default from the model's dtype (1e-4 for fp32).
        calibration: example batches for variants that are fitted (e.g. learned feature maps).
        dynamic: keep batch / sequence dimensions dynamic when the model allows it.
        verify: run the numerical checks (per site and end to end). Turning this off is only
            for benchmarking the pipeline itself.
        strict: a variant chosen by the user (``variant`` other than ``Fused()``, or an
            override) that cannot apply to a site raises ``VariantNotApplicableError``; by
            default such a site is fused exactly instead and the report says why.
    """

    variant: Variant = field(default_factory=Fused)
    overrides: Mapping[str, Variant | None] = field(default_factory=dict)
    tolerance: float | None = None
    calibration: Any = None
    dynamic: bool = True
    verify: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.variant, Variant):
            raise ConfigError(
                f"variant must be a variant config such as attnopt.Fused() or "
                f"attnopt.SlidingWindow(window=512), got {self.variant!r}"
            )
        if not isinstance(self.overrides, Mapping):
            raise ConfigError("overrides must map module-path globs to variants (or None)")
        for glob, v in self.overrides.items():
            if not isinstance(glob, str) or not (v is None or isinstance(v, Variant)):
                raise ConfigError(f"override {glob!r}: {v!r} is not a variant config or None")
        object.__setattr__(self, "overrides", dict(self.overrides))
        if self.tolerance is not None and not (self.tolerance > 0):
            raise ConfigError(f"tolerance must be positive, got {self.tolerance!r}")

    def forced(self, location: str) -> bool:
        """True when the user chose the variant of the site at ``location`` (an override
        matches it, or ``variant`` is not the default ``Fused()``).
        """
        return (any(fnmatch.fnmatchcase(location, g) for g in self.overrides)
                or self.variant != Fused())

    def variant_for(self, location: str) -> Variant | None:
        """The variant for a site at module path ``location`` (None: leave it untouched)."""
        for glob, v in self.overrides.items():
            if fnmatch.fnmatchcase(location, glob):
                return v
        return self.variant

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (calibration data is not serialised)."""
        return {
            "variant": self.variant.to_dict(),
            "overrides": {g: (v.to_dict() if v else None) for g, v in self.overrides.items()},
            "tolerance": self.tolerance,
            "dynamic": self.dynamic,
            "verify": self.verify,
            "strict": self.strict,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Rebuild a config from :meth:`to_dict` output."""
        data = dict(data)
        variant = Variant.from_dict(data.pop("variant", {"variant": "fused"}))
        overrides = {g: (Variant.from_dict(v) if v else None)
                     for g, v in data.pop("overrides", {}).items()}
        return cls(variant=variant, overrides=overrides, **data)


def check_overrides(config: Config, locations: list[str]) -> None:
    """Raise when an override glob matches none of the sites' module paths.

    A glob that matches nothing is a typo or a wrong path; ignoring it would silently apply the
    default variant where the user asked for something else.

    Raises:
        ConfigError: naming the globs and listing the site locations.
    """
    unmatched = [g for g in config.overrides
                 if not any(fnmatch.fnmatchcase(loc, g) for loc in locations)]
    if not unmatched:
        return
    shown = ", ".join(locations[:12]) + (f", ... ({len(locations)} in all)"
                                         if len(locations) > 12 else "")
    raise ConfigError(
        f"override {', '.join(repr(g) for g in unmatched)} matches no attention site; "
        + (f"the sites are at: {shown}" if locations else "the model has no attention sites")
        + " (globs match the whole module path, e.g. '*layers.0.*')")
