"""The in-process grid the server tests run on: the real ClientApp handlers, no Ray."""

from simulations.inprocess import InProcessGrid as FakeGrid

__all__ = ["FakeGrid"]
