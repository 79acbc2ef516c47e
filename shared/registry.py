"""Name -> callable registries, so configs pick implementations by name."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T", bound=Callable)
USER_DIR_ENV = "FEDTINY_USER_DIR"  # the directory `fedtiny` was started in, for the processes Flower starts elsewhere


class Registry(Generic[T]):
    """A mapping from names to callables with an error that lists the valid names.

    >>> SCORES = Registry("score")
    >>> @SCORES.register("magnitude")
    ... def magnitude(...): ...
    """

    def __init__(self, kind: str, allow_import: bool = False) -> None:
        self.kind = kind
        self.allow_import = allow_import
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return decorator

    def get(self, name: str, trusted: Iterable[str] = ()) -> T:
        """The callable registered as `name`, or `package.module:callable` from a `trusted` package."""
        if name in self._items:
            return self._items[name]
        if self.allow_import and ":" in name:
            return import_callable(name, self.kind, trusted)
        hint = " (or package.module:callable from a trusted package)" if self.allow_import else ""
        raise ValueError(f"Unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}{hint}")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_callable(spec: str, kind: str = "callable", trusted: Iterable[str] = ()) -> Callable:
    """Import `package.module:attr`, with a one-line error naming what failed.

    Importing runs the module's code, so only packages the user named as trusted (the config's
    `trusted` list) are imported; anything else is refused before any import happens.
    """
    module_name, _, attr = spec.partition(":")
    package = module_name.split(".", 1)[0]
    if not (all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
        raise ValueError(f"{kind} {spec!r} is not package.module:name (dotted Python identifiers)")
    if package not in set(trusted):
        raise ValueError(
            f"{kind} {spec!r} would import and run code from package {package!r}, which is not trusted; "
            f"if you trust it, add it to the config: trusted=[{package}] (fedtiny infer: --trust {package}; "
            f"a run folder's own trusted list is never used)"
        )
    find_in_user_dir(package)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  a trusted module that fails to import is one line, not a traceback
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{kind} {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {first})") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{kind} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{kind} {spec!r} is not callable")
    return fn


def call_user(fn: Callable, what: str, *args, **kwargs):
    """`fn(*args, **kwargs)` for a user's imported callable: any exception it raises (a wrong signature
    included) becomes one ValueError line naming `what`, so a config naming it ends in exit code 2."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  user code: whatever it raises is reported, not a traceback
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{what} failed: {type(exc).__name__}: {first[:300]}") from None


def find_in_user_dir(package: str) -> None:
    """Make a trusted `package` that is not installed importable from the directory `fedtiny` was
    started in (`$FEDTINY_USER_DIR`, set by the launcher for the ServerApp and Ray workers, else the
    current directory). The directory is appended to sys.path, so it never shadows an installed package.
    """
    if importlib.util.find_spec(package) is not None:
        return
    for folder in filter(None, (os.environ.get(USER_DIR_ENV), os.getcwd())):
        root = Path(folder).resolve()
        if (root / package).is_dir() or (root / f"{package}.py").is_file():
            if str(root) not in sys.path:
                sys.path.append(str(root))
            importlib.invalidate_caches()
            return
