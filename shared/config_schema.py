"""The configuration's schema: the core sections as typed dataclasses, `Config`, and the registry of
the methods' settings sections (every method adds its own, e.g. `fedtiny:`, with `register_method`).

`shared.config` loads and flattens configs, `shared.config_checks` validates them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
BUILTIN_METHODS = "shared.methods"  # importing this package registers the built-in methods and their sections
FAIL_MODES = ("crash", "straggle")  # simulation.fail_mode
MAX_WIDTH = 16.0  # model.width: 16x the channels is already ~256x the weights
MAX_CPUS = 4096  # simulation.num_cpus: logical CPUs Ray may schedule on (spare actors for stragglers included)
ATTACKS = ("none", "scale", "huge", "bn-variance", "topk", "feddst", "evaluate", "search",
           "flip", "flip-clip", "flip-reject")  # client.attacks
TRACKING = ("tensorboard", "none")  # tracking: TensorBoard event files in the run's directory, or none


class ConfigError(ValueError):
    """A configuration problem, reported as one line (the CLI exits with code 2)."""


@dataclass
class SyntheticConfig:
    """FedProx's Synthetic(alpha, beta) (shared.synthetic), read when dataset.name=synthetic."""

    alpha: float = 1.0  # how much the clients' models differ (std of u_k)
    beta: float = 1.0  # how much the clients' inputs differ (std of B_k)
    dimension: int = 60  # features per sample
    classes: int = 10  # labels (the softmax regression's outputs)
    min_samples: int = 50  # a client's samples: a power law from min_samples, P(n >= m) = (m / min_samples)^-power,
    max_samples: int = 1000  # truncated at max_samples
    power: float = 1.5
    test_clients: int = 100  # held-out clients (a separate seed stream) whose data are the test set

    def validate(self, c: Config, check) -> None:
        """Its own ranges; `config_checks` adds that min_samples leaves every client enough to train and hold out."""
        key = "dataset.synthetic."
        for name in ("alpha", "beta", "power"):
            check(math.isfinite(getattr(self, name)), key + name, "must be a finite number")
        check(self.alpha >= 0, key + "alpha", "must be >= 0")
        check(self.beta >= 0, key + "beta", "must be >= 0")
        check(self.power > 0, key + "power", "must be > 0")
        check(1 <= self.dimension <= 4096, key + "dimension", "must be in [1, 4096]")
        check(2 <= self.classes <= 1000, key + "classes", "must be in [2, 1000]")
        check(1 <= self.min_samples, key + "min_samples", "must be at least 1")
        check(self.min_samples <= self.max_samples <= 100_000, key + "max_samples", "must be in [min_samples, 100000]")
        check(1 <= self.test_clients <= 10_000, key + "test_clients", "must be in [1, 10000]")
        check(self.test_clients * self.max_samples * self.dimension <= 2**28, key + "test_clients",
              "x max_samples x dimension must be at most 2^28 (a test set of at most 1 GiB)")


@dataclass
class DatasetConfig:
    name: str = "digits"
    path: str = ""  # empty: the dataset's default location
    partition: str = "dirichlet"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration (label skew)
    holdout: float = 0.2  # fraction of each client's data held out (adaptive BN selection, evaluation)
    test_fraction: float = 0.2  # central test split for datasets without one (digits)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


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
    eval_every: int = 1  # central test evaluation every this many rounds; round 0 and the last round always
    # Seeds which clients each round samples and their local work (-1: `seed`). Another value keeps the seed's
    # data, partition, initial model and candidate masks and replays the run under other client samples:
    # a replicate, to tell a method's effect from the spread of client sampling on one seed.
    sampling_seed: int = -1
    # Robust aggregation (shared.aggregate): each update's distance from the global model is clipped to
    # clip_multiple x the round's median distance (0: off); no client weighs more than max_weight_share of
    # the round (0: off); aggregator median (coordinate-wise) | trimmed-mean (per coordinate the extreme
    # clients left out, the rest sample-weighted) | mean (FedAvg).
    clip_multiple: float = 10.0
    reject_multiple: float = 100.0  # an update farther than this multiple of the round's median distance is rejected
    max_weight_share: float = 0.25
    aggregator: str = "median"
    trim_fraction: float = 0.1  # trimmed-mean: the fraction of clients left out at each end per coordinate (at least 1)


@dataclass
class WarmupConfig:
    """Optional dense pre-training on a tiny labelled server set from the train split, for every method
    (FedTiny's phase 0, arXiv 2212.01977; never the test split, unlike the reference code)."""

    epochs: int = 5  # 0: none
    shots: int = 10  # examples per class in the server's warm-up set


@dataclass
class SimulationConfig:
    cpus_per_client: int = 1  # whole CPUs per virtual client (Flower 1.42 takes no fractions)
    # GPUs Ray reserves per virtual client, a fraction (0.25: four clients share a GPU); 0 reserves
    # none (clients then share every visible GPU, and only CPUs limit how many run at once).
    gpus_per_client: float = 0.0
    # Logical CPUs Ray may use when it starts its own cluster: num_cpus / cpus_per_client clients run
    # at once. More than the cores is allowed, e.g. spare actors for sleeping stragglers.
    num_cpus: int = 2
    ray_address: str = ""  # join this running Ray cluster ("auto" or host:port) instead of starting one
    fail_fraction: float = 0.0  # fraction of sampled clients made to fail each round (fault drills)
    # How they fail: "crash" (raise an error) or "straggle" (sleep past fl.round_timeout, reply late).
    fail_mode: str = "crash"
    # Attack drill (client.attacks): this fraction of the partitions (seeded) sends well-formed poison of one kind.
    attack: str = "none"
    attack_fraction: float = 0.0
    # Simulation only: the server tells each virtual client which partition it holds (node i of the
    # sorted node ids holds partition i), so no registration round over the whole fleet is needed.
    virtual_partitions: bool = False


METHOD_NAMES: set[str] = set()  # registered methods (register_method)
SECTIONS: dict[str, type] = {}  # method settings: section name -> dataclass with defaults


def register_method(name: str, section: str | None = None, settings: type | None = None) -> None:
    """Record a method's name and its settings section; `shared.methods.register` calls this.

    A settings dataclass may define `validate(self, config, check)`, called with the whole config
    and `check(ok, dotted_key, why)`, to reject impossible values in one line.
    """
    METHOD_NAMES.add(name)
    if settings is None:
        return
    if section in _CORE or SECTIONS.get(section, settings) is not settings:
        raise ValueError(f"config section {section!r} is registered twice or clashes with a core section")
    SECTIONS[section] = settings


def _default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in _discover().items()}


@dataclass
class Config:
    method: str = "fedtiny"  # a registered method, or package.module:Class from a trusted package
    seed: int = 0
    output_dir: str = ""  # empty: outputs/<timestamp>-<method>
    resume: bool = False  # continue from output_dir's last checkpoint (fedtiny run --resume DIR)
    # Packages whose code a `package.module:name` in this config may import (methods, models, datasets,
    # scores, allocations). Importing runs that code with your permissions: name only code you trust.
    trusted: list[str] = field(default_factory=list)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N: clients' and server's torch work
    tracking: str = "tensorboard"  # tensorboard (event files in output_dir) | none
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    sections: dict[str, Any] = field(default_factory=_default_sections)  # method settings by section name

    def __getattr__(self, name: str) -> Any:
        """A method's settings section as an attribute: `config.fedtiny.alpha`."""
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}; known: {sorted(sections or {})}")


_CORE = {f.name for f in dataclasses.fields(Config)}


def _discover(method: str | None = None, trusted: Iterable[str] = ()) -> dict[str, type]:
    """The sections of a config: every built-in method's, plus a user's `package.module:Class` method's.

    A user method's section belongs to the configs that name that method only, although its
    registration stays for the process.
    """
    plugins = importlib.import_module(BUILTIN_METHODS)
    sections = {name: cls for name, cls in SECTIONS.items() if _builtin(cls)}
    if method and ":" in method:
        cls = plugins.load(method, trusted)
        if cls.Settings is not None:
            sections[cls.section] = cls.Settings
    return sections


def _builtin(settings: type) -> bool:
    return settings.__module__.startswith(BUILTIN_METHODS + ".")
