"""One small registry reused for models, datasets and (later) audit checks.

Registration happens when a family module is imported explicitly (see ``pupil.models.__init__``);
there is no ``import *`` magic and a duplicate name raises.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pupil.errors import PupilError

# Registries whose names a command lists; the error for an unknown name points at it once the names are too many
# to list on one line. Other registries (checks, datasets, tasks) list their names in the error itself.
LISTED_BY = {"model": "pupil models"}
MAX_LISTED = 15


@dataclass(frozen=True)
class Entry:
    """A registered object and the metadata given with it (family, paper, year, ...)."""

    name: str
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Maps names to objects. ``kind`` only appears in error messages ("unknown model 'x'")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator: ``@MODELS.register("lenet5", family="LeNet", year=1998)``."""

        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, obj, dict(meta))
            return obj

        return add

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            near = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            if self.kind in LISTED_BY and len(self._entries) > MAX_LISTED:
                choices = f"`{LISTED_BY[self.kind]}` lists them"
            else:
                choices = f"choose one of {', '.join(self._entries)}"
            raise PupilError(f"unknown {self.kind} {name!r}{hint}; {choices}")
        return self._entries[name]

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
