"""Let a subpackage double as the API function of the same name.

``dinov2_repro.train``, ``dinov2_repro.distill`` and ``dinov2_repro.plan`` are packages (the verbs'
code lives in them), so a function of that name at the top level would be replaced by the package
as soon as any of its submodules is imported. Instead the package itself becomes callable and
forwards to :mod:`dinov2_repro.api`: ``dinov2_repro.train(config)`` works however the package was
reached, and ``dinov2_repro.train.cli`` stays importable.
"""
from __future__ import annotations

import sys
import types
from typing import Any


def make_package_callable(package_name: str, function_name: str) -> None:
    """Calling the module ``package_name`` calls ``dinov2_repro.api.<function_name>``."""

    class CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from dinov2_repro import api

            return getattr(api, function_name)(*args, **kwargs)

    CallablePackage.__call__.__doc__ = f"Calls :func:`dinov2_repro.api.{function_name}`."
    sys.modules[package_name].__class__ = CallablePackage
