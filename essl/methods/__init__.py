"""SSL methods: one small file each, composed with a backbone (not inherited).

A method is an ``nn.Module`` with ``loss(backbone, views, step, max_steps) -> Tensor``: it owns its heads
(and, for BYOL, the momentum encoder) and reads features from the shared backbone. E-SSL's equivariance
branch (:mod:`essl.equivariance`) is added beside any method by the LightningModule.

The registry :data:`METHODS` maps a name to the method's class; the class's constructor arguments (after
``backbone`` and ``feature_dim``) are the method's hyper-parameters, set from ``method.kwargs`` and checked
against the signature; the first line of its docstring is its description (``essl list methods``).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from essl.errors import UserError
from essl.methods.barlowtwins import BarlowTwins
from essl.methods.byol import BYOL
from essl.methods.simclr import SimCLR
from essl.methods.simsiam import SimSiam
from essl.methods.vicreg import VICReg

METHODS: dict[str, type[nn.Module]] = {
    "simclr": SimCLR,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlowtwins": BarlowTwins,
    "vicreg": VICReg,
}

#: Feature size of the stand-in backbone on which :func:`check_method_kwargs` builds a method to check values.
PROBE_FEATURE_DIM = 8
#: Constructor arguments the composition root provides (not user hyper-parameters).
INJECTED = ("backbone", "feature_dim", "gather_distributed")


def method_parameters(name: str) -> dict[str, Any]:
    """The user-settable hyper-parameters of method ``name`` with their defaults."""
    params = inspect.signature(METHODS[name]).parameters.values()
    return {p.name: p.default for p in params if p.name not in INJECTED}


def describe(name: str) -> str:
    """One line: the first line of the method's docstring."""
    return (inspect.getdoc(METHODS[name]) or name).splitlines()[0]


def check_method_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """UserError naming ``method.kwargs.<key>`` for an unknown parameter or a value of the wrong type."""
    allowed = method_parameters(name)
    for key, value in kwargs.items():
        if key not in allowed:
            raise UserError(f"config key 'method.kwargs.{key}': {name} has no parameter {key!r} "
                            f"(its parameters: {', '.join(allowed)})")
        default = allowed[key]
        if default is None or value is None:
            continue
        expected = float if isinstance(default, float) else type(default)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UserError(f"config key 'method.kwargs.{key}': expected {expected.__name__}, got {value!r}")
    try:  # the method checks its own values (ranges, choices): build it once on a stand-in backbone
        METHODS[name](backbone=nn.Identity(), feature_dim=PROBE_FEATURE_DIM, **kwargs)
    except ValueError as err:
        raise UserError(f"config key 'method.kwargs': {name}: {err}") from None


def build_method(name: str, backbone: nn.Module, feature_dim: int, gather_distributed: bool = False,
                 **kwargs) -> nn.Module:
    """Build SSL method ``name`` around ``backbone`` (kwargs: the method's own hyper-parameters, checked)."""
    if name not in METHODS:
        raise UserError(f"config key 'method.name': unknown method {name!r}; choose one of {', '.join(METHODS)}")
    check_method_kwargs(name, kwargs)
    extra = {"gather_distributed": gather_distributed} if "gather_distributed" in inspect.signature(
        METHODS[name]).parameters else {}
    try:
        return METHODS[name](backbone=backbone, feature_dim=feature_dim, **extra, **kwargs)
    except ValueError as err:
        raise UserError(f"config key 'method.kwargs': {name}: {err}") from None


__all__ = ["BYOL", "METHODS", "SimCLR", "build_method", "check_method_kwargs", "describe", "method_parameters"]
