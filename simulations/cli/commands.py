"""The `fedtiny` subcommands, each with the module that defines it, and the built-in method names.

Kept static so that `fedtiny --help`, `fedtiny --version` and `fedtiny run --help` answer at once:
the parser imports only the module of the subcommand it runs, never torch, Flower or the methods
for a help text. tests/test_cli_startup.py checks both tables against the modules and the registry.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {  # name: (module, one-line help)
    "run": ("simulations.cli.run", "run a federated job in Flower's simulation engine"),
    "config": ("simulations.cli.run", "print the resolved, validated config of a run (YAML) without running it"),
    "compare": ("simulations.cli.compare", "run methods x densities x seeds and write a comparison table and plots"),
    "export": ("simulations.cli.export", "export a finished run's model (packed, onnx, torchscript, c)"),
    "infer": ("simulations.cli.export", "accuracy and CPU latency of exported models on a test split"),
    "deploy-local": ("simulations.cli.deploy",
                     "run a federated job on a local SuperLink and N SuperNodes with TLS and node authentication"),
    "fleet-gate": ("simulations.cli.fleet_gate",
                   "TLS proxy that exposes only a SuperLink's Fleet API to SuperNodes (Control and Runtime stay on 127.0.0.1)"),
}

# The built-in methods (`method=NAME`), as the method registry names them.
METHODS = ("centralized", "fedavg", "feddst", "fedmef", "fedrts", "fedtiny", "grasp", "imp", "prunefl", "snip",
           "sparsyfed", "synflow")


def help_for(command: str) -> str:
    """The one-line help of a subcommand (its module's `add_parser(..., help=help_for(name))`)."""
    return COMMANDS[command][1]
