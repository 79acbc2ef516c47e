"""Federated (pruning) methods, one module each, registered by name for the `method` config key.

A method module (see `fedtiny.py`, or docs/own-method.md) defines:
- optionally a settings dataclass, its own config section (`Settings`, `section`);
- a `Method` subclass registered with `@register("name")`, overriding only the hooks that define it:
  `prepare` (starting model and masks), `round_config` (extra keys for the round's clients),
  `check_reply` (its payload in a client's reply: accepted or rejected before anything uses it),
  `check_update_masks` (only when its clients upload on masks of their own, as SparsyFed's),
  `aggregate` (the round's new global state), `after_round` (e.g. prune/grow), `state_dict`;
- optionally a `ClientHalf` subclass (the method's `client` attribute): what a client computes
  beyond masked training.
Server hooks reach the server only through their `MethodContext` (`api.py`), so the ServerApp and
the ClientApp each find their half here without importing each other.

Every module of this package is imported here, so a new method is one new file;
`method=package.module:Class` loads a user's method from a trusted package.
"""

import importlib
import pkgutil

from shared.methods.api import ClientHalf, Method, MethodContext, Reply, TrainJob
from shared.methods.registry import METHODS, load, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "ClientHalf", "Method", "MethodContext", "Reply", "TrainJob", "load", "register"]
