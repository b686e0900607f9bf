"""Package names that load their module on first use (PEP 562), so light commands (``plan``, ``status``,
``inspect``, reading a config) reach small modules of a package without importing torch."""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_names(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``where`` maps each exported name to its module, relative to
    the package (``"trainer"``) or absolute (``"fillup_data.train.presets"``).  The value is cached in the
    package's namespace after the first lookup."""
    import sys

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = where[name] if where[name].startswith("fillup_data.") else f"{package}.{where[name]}"
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
