"""The methods by name: `register` records a `Method` subclass and its settings section.

Both apps find a method here: the ServerApp its hooks, the ClientApp its client half (`Method.client`).
Importing `shared.methods` registers every built-in method; `method=package.module:Class` loads a
user's method from a trusted package (`trusted=[package]`).
"""

from __future__ import annotations

from typing import Callable, Iterable

from shared.config_schema import register_method
from shared.methods.api import Method
from shared.registry import Registry, import_callable

METHODS: Registry = Registry("method", allow_import=True)


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a method under `name`, with its settings section."""

    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.register(name)(cls)
        cls.name = name
        _register_settings(cls, name)
        return cls

    return decorator


def _register_settings(cls: type[Method], name: str) -> None:
    if cls.Settings is not None:
        cls.section = cls.section or name
    register_method(name, cls.section, cls.Settings)


def load(name: str, trusted: Iterable[str] = ()) -> type[Method]:
    """The method registered as `name`, or a `package.module:Class` Method subclass from a trusted package."""
    if name in METHODS:
        return METHODS.get(name)
    cls = import_callable(name, "method", trusted)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {name!r} is not a subclass of shared.methods.Method")
    if not cls.name:
        cls.name = name
        _register_settings(cls, name.rpartition(":")[2].lower())
    return cls
