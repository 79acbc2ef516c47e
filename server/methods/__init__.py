"""Federated (pruning) methods, registered by name for the `method` config key."""

from server.methods.base import METHODS, Method
from server.methods import fedavg, fedtiny  # noqa: F401  (registration)
from server.methods import feddst, imp, prunefl, snip, synflow  # noqa: F401  (registration)

__all__ = ["METHODS", "Method"]
