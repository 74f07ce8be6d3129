"""Old import paths of moved public modules, kept working with a :class:`DeprecationWarning`.

``import fastdiff`` installs :data:`FINDER` on :data:`sys.meta_path`; it answers only for the names in
:data:`MOVED_MODULES` and hands back the module at its new path (the same module object, so ``isinstance``
and monkeypatching see one module). Imports nothing of fastdiff: any layer may use it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

__all__ = ["FINDER", "MOVED_MODULES", "install"]

#: old module name -> new module name
MOVED_MODULES: dict[str, str] = {
    # models/aux.py cannot be checked out on Windows (AUX is a reserved device name)
    "fastdiff.models.aux": "fastdiff.models.scorers",
}


def warn_moved(old: str, new: str, stacklevel: int = 2) -> None:
    """The :class:`DeprecationWarning` of a moved name."""
    warnings.warn(f"{old} is deprecated and will be removed in a future release; use {new}",
                  DeprecationWarning, stacklevel=stacklevel + 1)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of :data:`MOVED_MODULES`; loading one warns and returns the new module."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warn_moved(spec.name, new, stacklevel=2)  # importlib's own frames are skipped: the importer's line
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already executed."""


FINDER = _MovedModuleFinder()


def install() -> None:
    """Put :data:`FINDER` on :data:`sys.meta_path` (once)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(FINDER)
