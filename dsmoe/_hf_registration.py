"""Registers dsmoe's DeepSeekMoE classes with transformers' Auto classes (see dsmoe.hf.modeling)
as soon as transformers is imported, without importing it from ``import dsmoe``: transformers'
model machinery takes seconds to import, which a CLI call or a script that never uses it should
not pay."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


def _register() -> None:
    try:
        # importing the module registers (at its end; a module still being imported does so
        # when it finishes)
        importlib.import_module("dsmoe.hf.modeling")
    except Exception as e:  # an incompatible transformers must not break importing it
        warnings.warn(f"dsmoe: could not register the DeepSeekMoE classes with transformers: {e}", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` through the other finders, registering once it has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Registers now if transformers is imported, else when it is (nothing if it is absent)."""
    if "transformers" in sys.modules:
        if sys.modules["transformers"] is not None:
            _register()
        return
    if importlib.util.find_spec("transformers") is None:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
