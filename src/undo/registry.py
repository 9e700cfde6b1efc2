"""Registries of named plugins (methods, attacks, tasks): name -> "module:Class" (imported
when first used, so a plugin's optional dependencies load only when it runs) or a class.
Code outside the package adds its own with `register`; the engine needs no change."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from .errors import UndoError


class Registry(dict):
    def __init__(self, kind: str, listing: str, entries: dict[str, Any]):
        super().__init__(entries)
        self.kind, self.listing = kind, listing  # e.g. "method", "undo methods"

    def register(self, name: str, target: Any) -> None:
        """Add `name` -> "module:Class" or the class itself."""
        self[name] = target

    def get_class(self, name: str) -> Any:
        """The class registered as `name`; an unknown name is one line with the closest match."""
        if name not in self:
            close = difflib.get_close_matches(name, list(self), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UndoError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(self)} (see `{self.listing}`)")
        target = self[name]
        if not isinstance(target, str):
            return target
        module, cls = target.split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ModuleNotFoundError as e:
            raise UndoError(f"{self.kind} '{name}' is not available in this install ({e})") from None
