"""Lazy attributes for package namespaces: public names imported from their submodule on first use.

``import chisep`` and ``chisep --help`` must not start JAX; ``chisep.reconstruct_qsm`` must still
work. A package lists ``name -> submodule`` and takes the ``__getattr__`` and ``__dir__`` made here
(PEP 562).
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable, Mapping


def lazy_attributes(package: str, sources: Mapping[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``sources`` maps a public name to its submodule
    (relative to ``package``, ``""`` for a submodule of that name itself); the value found is cached in
    ``namespace`` (the package's globals)."""

    def __getattr__(name: str):
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = sources[name]
        value = import_module(f"{package}.{name}") if where == "" else getattr(
            import_module(f"{package}.{where}"), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(sources))

    return __getattr__, __dir__
