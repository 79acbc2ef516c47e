"""The `fedtiny` command line (`fedtiny = "simulations.cli:main"`; also `python -m simulations.cli`)."""

from simulations.cli.main import main

__all__ = ["main"]
