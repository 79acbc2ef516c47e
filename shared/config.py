"""Typed, validated configuration: YAML in configs/ -> OmegaConf -> `Config`.

Config flows one way. Entry points (the CLI, the ServerApp, the ClientApp) call
`load_config` or `from_flat` once; everything below receives plain dataclasses.
Errors are `ConfigError` with one line naming the key and what to do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
METHODS = ("fedtiny", "fedavg", "snip", "synflow", "prunefl", "feddst", "imp")
FAIL_MODES = ("crash", "straggle")  # simulation.fail_mode


class ConfigError(ValueError):
    """A configuration problem, reported as one line (the CLI exits with code 2)."""


@dataclass
class DatasetConfig:
    name: str = "digits"
    path: str = ""  # empty: the dataset's default location
    partition: str = "dirichlet"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration (label skew)
    holdout: float = 0.2  # fraction of each client's data held out (adaptive BN selection, evaluation)
    test_fraction: float = 0.2  # central test split for datasets without one (digits)


@dataclass
class ModelConfig:
    name: str = "cnn"
    width: float = 1.0


@dataclass
class PruningConfig:
    density: float = 0.05  # fraction of prunable weights kept
    keep_first_dense: bool = True  # keep the first conv layer dense (reference code does); density still counts it


@dataclass
class FLConfig:
    rounds: int = 40
    num_clients: int = 20
    clients_per_round: int = 10
    local_epochs: int = 3
    batch_size: int = 32
    lr: float = 0.05
    lr_schedule: str = "cosine"  # client lr per round: constant | cosine (decays to ~0 at the last round)
    momentum: float = 0.9
    weight_decay: float = 0.0
    min_replies: float = 0.5  # fraction of sampled clients whose replies a round needs
    round_timeout: float = 300.0  # seconds to wait for replies in a round
    max_update_norm: float = 0.0  # clip each update's L2 distance from the global model (0: off)


@dataclass
class FedTinyConfig:
    abns: bool = True  # adaptive batch-norm selection among candidates (False: first candidate)
    progressive: bool = True  # progressive layer-wise prune/grow after selection
    allocations: list[str] = field(default_factory=lambda: ["uniform-noise", "global", "erk", "lamp"])
    scores: list[str] = field(default_factory=lambda: ["magnitude", "synflow"])
    search_clients: int = 10  # clients sampled for BN recalibration and candidate evaluation
    score_batches: int = 2  # local batches for client-computed scores (SNIP)
    adjust_interval: int = 5  # dT: rounds between block adjustments
    alpha: float = 0.2  # initial prune/grow fraction (cosine-decayed)
    end_fraction: float = 0.6  # T_end = end_fraction * rounds
    warmup_epochs: int = 5  # server warm-up epochs on a tiny labelled set (0: none)
    warmup_shots: int = 10  # examples per class in the server's warm-up set


@dataclass
class SimulationConfig:
    cpus_per_client: int = 1  # whole CPUs per virtual client (Flower 1.42 takes no fractions)
    # Logical CPUs Ray may use when it starts its own cluster: num_cpus / cpus_per_client clients run
    # at once. More than the cores is allowed, e.g. spare actors for sleeping stragglers.
    num_cpus: int = 2
    ray_address: str = ""  # join this running Ray cluster ("auto" or host:port) instead of starting one
    fail_fraction: float = 0.0  # fraction of sampled clients made to fail each round (fault drills)
    # How they fail: "crash" (raise an error) or "straggle" (sleep past fl.round_timeout, reply late).
    fail_mode: str = "crash"
    # Simulation only: the server tells each virtual client which partition it holds (node i of the
    # sorted node ids holds partition i), so no registration round over the whole fleet is needed.
    virtual_partitions: bool = False


@dataclass
class Config:
    method: str = "fedtiny"
    seed: int = 0
    output_dir: str = ""  # empty: outputs/<timestamp>-<method>
    resume: bool = False  # continue from output_dir's last checkpoint (fedtiny run --resume DIR)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    fedtiny: FedTinyConfig = field(default_factory=FedTinyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


def load_config(file: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Merge configs/default.yaml, an optional YAML file and `key=value` overrides, then validate."""
    layers = [_load_yaml(DEFAULT_CONFIG)]
    if file is not None:
        layers.append(_load_yaml(Path(file)))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. pruning.density=0.01)")
    if overrides:
        layers.append(OmegaConf.from_dotlist(overrides))
    return _build(layers)


def from_mapping(values: Mapping[str, Any]) -> Config:
    """Build a validated Config from a nested mapping (e.g. a saved config.yaml)."""
    return _build([OmegaConf.create(dict(values))])


def from_flat(flat: Mapping[str, Any]) -> Config:
    """Build a Config from Flower's flat run config (`'fl.rounds': 3`, lists as comma-separated strings)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    for section, name in _list_fields():
        raw = nested.get(section, {}).get(name)
        if isinstance(raw, str):
            nested[section][name] = [s.strip() for s in raw.split(",") if s.strip()]
    return from_mapping(nested)


def to_flat(config: Config) -> dict[str, Any]:
    """Flatten to Flower's run-config form: dotted keys, scalar values, lists comma-joined."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(key + ".", value)
            elif isinstance(value, list):
                flat[key] = ",".join(value)
            else:
                flat[key] = value

    walk("", config)
    return flat


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _list_fields() -> list[tuple[str, str]]:
    return [
        (section.name, f.name)
        for section in dataclasses.fields(Config)
        if dataclasses.is_dataclass(section.default_factory) if section.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(section.default_factory)
        if f.default_factory is not dataclasses.MISSING
    ]


def _load_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file (see configs/)")
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry multi-line messages
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def _build(layers: list) -> Config:
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, *layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    validate(config)
    return config


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not" in message:
        return f"unknown config key {key!r}; see configs/default.yaml for valid keys"
    if key:
        return f"config key {key!r}: {message}"
    return f"invalid config: {message}"


def validate(c: Config) -> None:
    """Reject impossible values with one line naming the key."""

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r} {why} (got {_get(c, key)!r})")

    check(c.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
    check(0.0 < c.pruning.density <= 1.0 and math.isfinite(c.pruning.density), "pruning.density", "must be in (0, 1]")
    check(c.dataset.partition in ("iid", "dirichlet"), "dataset.partition", "must be iid or dirichlet")
    check(c.dataset.alpha > 0, "dataset.alpha", "must be > 0")
    check(0.0 < c.dataset.holdout < 1.0, "dataset.holdout", "must be in (0, 1)")
    check(0.0 < c.dataset.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)")
    check(c.model.width > 0, "model.width", "must be > 0")
    check(c.fl.rounds >= 1, "fl.rounds", "must be >= 1")
    check(c.fl.num_clients >= 1, "fl.num_clients", "must be >= 1")
    check(1 <= c.fl.clients_per_round <= c.fl.num_clients, "fl.clients_per_round", "must be in [1, fl.num_clients]")
    check(c.fl.local_epochs >= 1, "fl.local_epochs", "must be >= 1")
    check(c.fl.batch_size >= 1, "fl.batch_size", "must be >= 1")
    check(c.fl.lr > 0, "fl.lr", "must be > 0")
    check(0.0 <= c.fl.momentum < 1.0, "fl.momentum", "must be in [0, 1)")
    check(c.fl.weight_decay >= 0, "fl.weight_decay", "must be >= 0")
    check(0.0 < c.fl.min_replies <= 1.0, "fl.min_replies", "must be in (0, 1]")
    check(c.fl.round_timeout > 0, "fl.round_timeout", "must be > 0")
    check(c.fl.max_update_norm >= 0, "fl.max_update_norm", "must be >= 0 (0 turns clipping off)")
    check(len(c.fedtiny.allocations) > 0, "fedtiny.allocations", "must name at least one allocation")
    check(len(c.fedtiny.scores) > 0, "fedtiny.scores", "must name at least one score")
    check(1 <= c.fedtiny.search_clients <= c.fl.num_clients, "fedtiny.search_clients", "must be in [1, fl.num_clients]")
    check(c.fedtiny.score_batches >= 1, "fedtiny.score_batches", "must be >= 1")
    check(c.fedtiny.adjust_interval >= 1, "fedtiny.adjust_interval", "must be >= 1")
    check(0.0 <= c.fedtiny.alpha <= 1.0, "fedtiny.alpha", "must be in [0, 1]")
    check(0.0 <= c.fedtiny.end_fraction <= 1.0, "fedtiny.end_fraction", "must be in [0, 1]")
    check(c.fedtiny.warmup_epochs >= 0, "fedtiny.warmup_epochs", "must be >= 0")
    check(c.fedtiny.warmup_shots >= 1, "fedtiny.warmup_shots", "must be >= 1")
    check(c.simulation.cpus_per_client >= 1, "simulation.cpus_per_client",
          "must be a whole number >= 1 (to run more clients at once raise simulation.num_cpus)")
    check(c.simulation.num_cpus >= 1, "simulation.num_cpus", "must be >= 1")
    check(0.0 <= c.simulation.fail_fraction < 1.0, "simulation.fail_fraction", "must be in [0, 1)")
    check(c.simulation.fail_mode in FAIL_MODES, "simulation.fail_mode", f"must be one of {', '.join(FAIL_MODES)}")
    _check_names(c)


def _check_names(c: Config) -> None:
    """Names that registries resolve are checked here so a typo fails before any work starts."""
    from shared.pruning.allocation import ALLOCATIONS
    from shared.pruning.scores import SCORES
    from shared.training import LR_SCHEDULES

    for name in c.fedtiny.allocations:
        if name not in ALLOCATIONS:
            raise ConfigError(f"config key 'fedtiny.allocations': unknown allocation {name!r}; known: {', '.join(ALLOCATIONS.names())}")
    if c.fl.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"config key 'fl.lr_schedule': unknown schedule {c.fl.lr_schedule!r}; known: {', '.join(LR_SCHEDULES.names())}")
    for name in c.fedtiny.scores:
        if name not in SCORES:
            raise ConfigError(f"config key 'fedtiny.scores': unknown score {name!r}; known: {', '.join(SCORES.names())}")


def _get(c: Config, dotted: str) -> Any:
    obj: Any = c
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
