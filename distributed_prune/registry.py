"""A name -> object table: the one registry behind models, datasets, importance criteria,
re-initialisation methods and training engines.

Registering a name twice is a programming error (``ValueError``); looking up an unknown name is
the user's (:class:`~distributed_prune.errors.UserError` naming the config key and listing the
valid names). An entry may be lazy (``add_lazy``): its loader runs on first lookup, so an optional
heavy dependency (DeepSpeed) is imported only by the runs that use it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Mapping, Generic[T]):
    """Names of one kind (``what``: "model", "criterion", ...) read from config key ``key``."""

    def __init__(self, what: str, key: str):
        self.what, self.key = what, key
        self._entries: dict[str, T] = {}
        self._loaders: dict[str, Callable[[], T]] = {}

    def _claim(self, name: str) -> None:
        if name in self._entries or name in self._loaders:
            raise ValueError(f"{self.what} {name!r} registered twice")

    def add(self, name: str, obj: T) -> T:
        self._claim(name)
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda obj: self.add(name, obj)

    def add_lazy(self, name: str, loader: Callable[[], T]) -> None:
        """``loader()`` returns the entry; it is called once, on first lookup."""
        self._claim(name)
        self._loaders[name] = loader

    def __getitem__(self, name: str) -> T:
        if name not in self._entries and name in self._loaders:
            self._entries[name] = self._loaders.pop(name)()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted([*self._entries, *self._loaders]))

    def __len__(self) -> int:
        return len(self._entries) + len(self._loaders)

    def __contains__(self, name) -> bool:
        return name in self._entries or name in self._loaders

    def lookup(self, name: str, hint: str = "") -> T:
        """The entry for ``name``; an unknown name is a UserError listing the valid ones."""
        if name not in self:
            raise UserError(f"{self.key}: unknown {self.what} {name!r}; choose one of "
                            f"{', '.join(self)}{hint}")
        return self[name]
