"""The variant contract and registry: one frozen config dataclass per variant, looked up by type.

A variant module defines
  * its config (a subclass of ``Variant``: frozen, keyword-only, validated in ``__post_init__``),
  * its custom op ``torch.ops.attnopt.<name>`` (reference math, fast implementation, fake impl),
  * an implementation registered with ``@register(ConfigClass)`` that says whether it can apply to
    a site (a reason when not) and emits the op call into a graph.
A new variant touches only its own module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from attnopt.errors import ConfigError, VariantNotApplicableError

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite


@dataclass(frozen=True, kw_only=True)
class Variant:
    """Base class of variant configs. ``name`` is the registry key used in JSON and the CLI."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-serialisable data, with its variant name."""
        return {"variant": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Variant:
        """Rebuild a variant config from :meth:`to_dict` output."""
        data = dict(data)
        name = data.pop("variant", None)
        cls = _BY_NAME.get(name)
        if cls is None:
            raise ConfigError(f"unknown variant {name!r}; known: {sorted(_BY_NAME)}")
        return cls(**data)

    def can_apply(self, site: AttentionSite, *, raise_error: bool = False) -> str | None:
        """None when this variant can rewrite ``site``; otherwise the reason it cannot.

        Args:
            site: a site from ``find_attention`` / ``fast.sites``.
            raise_error: raise :class:`VariantNotApplicableError` with the reason instead of
                returning it (for a variant the user forced on the site).
        """
        reason = implementation(self).can_apply(self, site)
        if reason is not None and raise_error:
            raise VariantNotApplicableError(
                f"{self.describe()} cannot be applied to site {site.index} ({site.location}): "
                f"{reason}")
        return reason

    def describe(self) -> str:
        """A short label for reports, e.g. ``SlidingWindow(window=512)``: the first field and
        every field that differs from its default.
        """
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}"
                           for i, f in enumerate(dataclasses.fields(self))
                           if i == 0 or f.default is dataclasses.MISSING
                           or getattr(self, f.name) != f.default)
        return f"{type(self).__name__}({fields})"


@dataclass(frozen=True)
class SiteOperands:
    """Graph nodes of a site's canonical operands, already emitted in the rewritten graph.

    q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``; mask: None, bool
    (True = attend) or additive float, broadcastable to ``[B, H, Lq, Lk]``.
    """

    q: Node
    k: Node
    v: Node
    mask: Node | None
    causal: bool
    scale: float
    state: Any = None  # what the variant's ``fit`` returned for this site (calibrated variants)
    #: maps a node of the captured graph to the node standing for it in the graph being emitted
    #: into (for variants that read other runtime sizes, e.g. an image's patch grid)
    lookup: Callable[[Node], Node] | None = None


class NeedsStaticShapes(str):
    """A refusal reason (from ``can_apply``) that a capture with static shapes would lift.

    ``optimize`` then captures the model again with every dimension specialised to the example
    inputs and says so in the report.
    """


class VariantImpl(Protocol):
    """What a variant implementation provides to the rewrite pass."""

    def can_apply(self, config: Variant, site: AttentionSite) -> str | None:
        """None when ``config`` can rewrite ``site``; otherwise the reason it cannot."""

    def emit(self, config: Variant, graph: Graph, ops: SiteOperands, site: AttentionSite) -> Node:
        """Insert the variant's op call; return the ``[B, H, Lq, Dv]`` output node."""

    def density(self, config: Variant, site: AttentionSite) -> float:
        """Fraction of query-key pairs the variant computes at the site's example sizes."""

    # Optional, for variants fitted on calibration data (e.g. learned feature maps):
    #   fit(config, site, samples) -> state
    # ``samples`` is a list of dicts with the site's canonical tensors on calibration inputs:
    # q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv], mask (or None), causal, scale, and out
    # [B,H,Lq,Dv] (the exact attention output). The returned state reaches ``emit`` as
    # ``ops.state``. Variants without ``fit`` need no calibration.
    #   wants_fit(config, calibration_given) -> bool   (optional; default: always fit)
    # says whether to fit at all: a variant that works unfitted (a fixed feature map) fits only
    # when the user passed calibration data.
    #   describe_state(config, site, state) -> str | None   (optional)
    # the report note of a fitted site; a variant with it reports ``density(config, site, state)``.


_REGISTRY: dict[type[Variant], VariantImpl] = {}
_BY_NAME: dict[str, type[Variant]] = {}


def register(config_cls: type[Variant]):
    """Class decorator registering an implementation for a variant config class."""

    def wrap(impl_cls: type) -> type:
        if not config_cls.name:
            raise TypeError(f"{config_cls.__name__} has no registry name")
        _REGISTRY[config_cls] = impl_cls()
        _BY_NAME[config_cls.name] = config_cls
        return impl_cls

    return wrap


def implementation(config: Variant) -> VariantImpl:
    """The registered implementation of ``config``'s variant."""
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        raise ConfigError(
            f"{type(config).__name__} is not a registered variant; known: {sorted(_BY_NAME)}"
        ) from None


def registered() -> dict[str, type[Variant]]:
    """All registered variant config classes by name."""
    return dict(_BY_NAME)


def wants_fit(config: Variant, calibration_given: bool) -> bool:
    """True when ``optimize`` should call the variant's ``fit`` (see ``VariantImpl``)."""
    impl = implementation(config)
    if not hasattr(impl, "fit"):
        return False
    ask = getattr(impl, "wants_fit", None)
    return True if ask is None else bool(ask(config, calibration_given))


def buffer_node(graph: Graph, site: AttentionSite, base: str, tensor: torch.Tensor) -> Node:
    """A ``get_attr`` node for ``tensor``, registered once as a buffer of the graph's module.

    A standalone check graph has no owning module: the buffer then goes on the module the site
    was found in, from which ``GraphModule(root, graph)`` copies it. An existing buffer of the
    same name and value is reused; another value gets a suffixed name.
    """
    owner = graph.owning_module
    if owner is None and site.graph is not None:
        owner = site.graph.output.graph.owning_module
    if owner is None:
        raise VariantNotApplicableError(f"{base}: no graph module to hold the variant's tensors")
    tensor = tensor.detach().contiguous()
    name, i = base, 0
    while hasattr(owner, name):
        old = getattr(owner, name)
        if isinstance(old, torch.Tensor) and old.shape == tensor.shape and torch.equal(old, tensor):
            return graph.get_attr(name)
        i += 1
        name = f"{base}_{i}"
    owner.register_buffer(name, tensor)
    return graph.get_attr(name)
