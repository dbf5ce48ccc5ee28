"""Methods and models by name: one way to dispatch a setting such as ``background="vsharp"``.

A :class:`Registry` maps names to callables (functions or classes). Stages
register their methods where they are defined; the pipeline, the command line
and users pick them by the same names, and an unknown name gets one error
message listing the valid ones. (:mod:`chisep.settings` keeps the same names as
plain tuples, so the command line starts without loading the stages; a test keeps
the two equal.)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator

from chisep.errors import InputError

__all__ = ["Registry"]


class Registry:
    """Named callables of one kind (e.g. "background method").

    Examples
    --------
    >>> methods = Registry("greeting")
    >>> @methods.register("hello")
    ... def hello(name):
    ...     return "hello " + name
    >>> methods.get("hello")("chisep")
    'hello chisep'
    >>> methods.get("bye")
    Traceback (most recent call last):
    ...
    chisep.errors.InputError: unknown greeting 'bye'; valid choices are: hello
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str, item: Callable | None = None):
        """Register ``item`` under ``name``; without ``item``, a decorator."""
        if item is None:
            return lambda obj: self.register(name, obj)
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> Callable:
        """The callable registered as ``name``, else an error listing the valid names."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise InputError(f"unknown {self.kind} {name!r}; valid choices are: {', '.join(self._items)}") from None

    def settings_of(self, name: str, shared: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The keyword-only settings of the callable registered as ``name``, except the ``shared`` ones."""
        params = inspect.signature(self.get(name)).parameters
        return tuple(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in shared)

    def check_settings(self, name: str, settings, shared: tuple[str, ...] = ()) -> None:
        """Refuse settings the method ``name`` does not take, listing the ones it does."""
        allowed = self.settings_of(name, shared)
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise InputError(f"unknown setting(s) {unknown} for {self.kind} {name!r}; "
                             f"valid settings: {', '.join(allowed)}")

    def build(self, name: str, *args, **kwargs) -> Any:
        """Call the item registered as ``name`` (e.g. construct a model)."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, name: str) -> Callable:
        return self.get(name)

    def items(self):
        return self._items.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
