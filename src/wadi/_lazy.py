"""Packages whose public names live in submodules, imported on first use.

``wadi --help`` must not load torch, so a package's ``__init__`` names what it offers and
where (``{"name": "submodule"}``) instead of importing it.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``name`` comes from ``.exports[name]``."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(module, name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    return __getattr__, __dir__
