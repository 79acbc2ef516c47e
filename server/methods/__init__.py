"""Federated (pruning) methods, one module each, registered by name for the `method` config key.

Every module of this package is imported here, so a new method is one new file (`base.py` says
what it holds); `method=package.module:Class` loads a user's method from a trusted package.
"""

import importlib
import pkgutil

from server.methods.base import METHODS, ClientHalf, Method, TrainJob, load, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "ClientHalf", "Method", "TrainJob", "load", "register"]
