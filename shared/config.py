"""Typed, validated configuration: YAML in configs/ -> OmegaConf -> `Config`.

Config flows one way. Entry points (the CLI, the ServerApp, the ClientApp) call
`load_config` or `from_flat` once; everything below receives plain dataclasses.
Errors are `ConfigError` with one line naming the key and what to do.

The core sections are fixed; every method adds its own settings section (`fedtiny:`,
`feddst:`, ...), a dataclass registered with `register_section` by the method's module
(server.methods). A config carries every registered section, so one file can set several
methods' settings (e.g. for `fedtiny compare`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
BUILTIN_METHODS = "server.methods"  # importing this package registers the built-in methods and their sections
FAIL_MODES = ("crash", "straggle")  # simulation.fail_mode
AGGREGATORS = ("trimmed-mean", "mean", "median")  # fl.aggregator (server.aggregate)
MAX_WIDTH = 16.0  # model.width: 16x the channels is already ~256x the weights
MAX_CPUS = 4096  # simulation.num_cpus: logical CPUs Ray may schedule on (spare actors for stragglers included)
ATTACKS = ("none", "scale", "huge", "bn-variance", "topk", "feddst", "evaluate", "search")  # client.attacks
TRACKING = ("tensorboard", "none")  # tracking: TensorBoard event files in the run's directory, or none


class ConfigError(ValueError):
    """A configuration problem, reported as one line (the CLI exits with code 2)."""


@dataclass
class SyntheticConfig:
    """FedProx's Synthetic(alpha, beta) (shared.synthetic), read when dataset.name=synthetic."""

    alpha: float = 1.0  # how much the clients' models differ (std of u_k)
    beta: float = 1.0  # how much the clients' inputs differ (std of B_k)
    dimension: int = 60  # features per sample
    classes: int = 10
    min_samples: int = 50  # a client's samples: a power law from min_samples, P(n >= m) = (m / min_samples)^-power,
    max_samples: int = 1000  # truncated at max_samples
    power: float = 1.5
    test_clients: int = 100  # held-out clients (a separate seed stream) whose data are the test set

    def validate(self, c: Config, check) -> None:
        from shared.partition import min_client_size

        key = "dataset.synthetic."
        for name in ("alpha", "beta", "power"):
            check(math.isfinite(getattr(self, name)), key + name, "must be a finite number")
        check(self.alpha >= 0, key + "alpha", "must be >= 0")
        check(self.beta >= 0, key + "beta", "must be >= 0")
        check(self.power > 0, key + "power", "must be > 0")
        check(1 <= self.dimension <= 4096, key + "dimension", "must be in [1, 4096]")
        check(2 <= self.classes <= 1000, key + "classes", "must be in [2, 1000]")
        need = min_client_size(c.dataset.holdout) if c.dataset.name == "synthetic" else 1
        check(need <= self.min_samples, key + "min_samples",
              f"must be at least {need} (2 to train and 2 held out at dataset.holdout={c.dataset.holdout:g})")
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
    # Robust aggregation (server.aggregate): each update's distance from the global model is clipped to
    # clip_multiple x the round's median distance (0: off); no client weighs more than max_weight_share of
    # the round (0: off); aggregator trimmed-mean (per coordinate the extreme clients left out, the rest
    # sample-weighted) | mean (FedAvg) | median (coordinate-wise).
    clip_multiple: float = 10.0
    reject_multiple: float = 100.0  # an update farther than this multiple of the round's median distance is rejected
    max_weight_share: float = 0.0
    aggregator: str = "trimmed-mean"
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
    """Record a method's name and its settings section; server.methods' `register` calls this.

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
        layers.append(OmegaConf.from_dotlist([_bracket_list(o) for o in overrides]))
    return _build(layers, defaults=1)


def _bracket_list(item: str) -> str:
    """`key=a,b` for a list-valued key means `key=[a,b]`, so both spellings work on the command line."""
    key, _, value = item.partition("=")
    if tuple(key.strip().split(".")) in _list_fields() and not value.strip().startswith("["):
        return f"{key}=[{value}]"
    return item


def from_mapping(values: Mapping[str, Any]) -> Config:
    """Build a validated Config from a nested mapping (e.g. a saved config.yaml)."""
    return _build([OmegaConf.create(dict(values))])


def from_flat(flat: Mapping[str, Any]) -> Config:
    """Build a Config from Flower's flat run config (`'fl.rounds': 3`, lists as comma-separated strings)."""
    flat = dict(flat)
    nested: dict[str, Any] = json.loads(flat.pop(USER_SECTIONS, "") or "{}")
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    for path in _list_fields():
        parent = nested
        for part in path[:-1]:
            parent = parent.get(part, {})
        if isinstance(parent.get(path[-1]), str):
            parent[path[-1]] = _split(parent[path[-1]])
    return from_mapping(nested)


def _split(raw: Any) -> Any:
    return [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw


def _walk(config: Config) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf: core keys, then each method section's."""

    def walk(prefix: str, obj: Any) -> Iterator[tuple[str, Any]]:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(f"{prefix}{f.name}.", value)
            elif f.name != "sections" or prefix:
                yield f"{prefix}{f.name}", value

    yield from walk("", config)
    for name, section in config.sections.items():
        yield from walk(f"{name}.", section)


USER_SECTIONS = "user_sections"  # flat key: JSON of the sections of methods outside server.methods


def _builtin(settings: type) -> bool:
    return settings.__module__.startswith(BUILTIN_METHODS + ".")


def to_flat(config: Config) -> dict[str, Any]:
    """Flatten to Flower's run-config form: dotted keys, scalar values, lists comma-joined.

    Flower accepts only the keys of the app's own config (pyproject.toml), so the sections of a
    user's method travel as one JSON string under `user_sections`.
    """
    builtin = dataclasses.replace(config, sections={n: v for n, v in config.sections.items() if _builtin(type(v))})
    flat = {key: ",".join(v) if isinstance(v, list) else v for key, v in _walk(builtin)}
    user = {n: dataclasses.asdict(v) for n, v in config.sections.items() if not _builtin(type(v))}
    flat[USER_SECTIONS] = json.dumps(user) if user else ""
    return flat


def to_yaml(config: Config) -> str:
    nested = OmegaConf.to_container(OmegaConf.structured(config))
    nested.update(nested.pop("sections"))
    return OmegaConf.to_yaml(nested)


def _list_fields() -> list[tuple[str, ...]]:
    """Dotted paths of the list-valued keys (comma-joined in Flower's flat config)."""
    return [tuple(key.split(".")) for key, value in _walk(Config()) if isinstance(value, list)]


def _load_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file (see configs/)")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry multi-line messages
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} holds a YAML {type(loaded).__name__.replace('Config', '').lower()}, "
                          "not a mapping of sections (e.g. 'fl:' then '  rounds: 40')")
    if not loaded:
        raise ConfigError(f"config file {path} is empty; give it at least one section (see configs/tiny.yaml)")
    return loaded


def _build(layers: list, defaults: int = 0) -> Config:
    """Merge `layers` onto the schema and validate; the first `defaults` layers are defaults, not the user's."""
    try:
        raw = OmegaConf.merge(*layers)
        explicit = OmegaConf.merge({}, *layers[defaults:])
        method, trusted = raw.get("method"), list(raw.get("trusted") or [])
        active = _discover(method if isinstance(method, str) else None, trusted)
        sections = {name: raw.pop(name) for name in list(raw) if name in active}
        unknown = [k for k in raw if k not in _CORE or k == "sections"]
        if unknown:
            raise ConfigError(_unknown_key(unknown[0]))
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))
        config.sections = {}
        for name, cls in active.items():
            try:
                merged = OmegaConf.merge(OmegaConf.structured(cls), sections.get(name, {}))
            except OmegaConfBaseException as exc:
                raise ConfigError(_one_line(exc, f"{name}.")) from None
            config.sections[name] = OmegaConf.to_object(merged)
        _fit_fleet(config, explicit, active)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    except ConfigError:
        raise
    except ValueError as exc:  # an untrusted or broken package.module:Class method
        raise ConfigError(f"config key 'method': {str(exc).splitlines()[0]}") from None
    validate(config)
    return config


def _fit_fleet(config: Config, explicit, sections: Mapping[str, type]) -> None:
    """Client counts the user did not set follow the fleet: at most `fl.num_clients` (a set one is validated)."""
    n = config.fl.num_clients
    keys = [("fl", "clients_per_round")] + [
        (name, key) for name, cls in sections.items() for key in getattr(cls, "FLEET_BOUND", ())
    ]
    for section, key in keys:
        if OmegaConf.select(explicit, f"{section}.{key}") is None:
            obj = getattr(config, section)
            setattr(obj, key, min(getattr(obj, key), n))


def _unknown_key(key: str) -> str:
    """One line for an unknown key, with the closest valid keys ("did you mean")."""
    known = [k for k, _ in _walk(Config())] + list(_discover())
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.75)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"unknown config key {key!r}; {hint}see configs/default.yaml for valid keys"


def _one_line(exc: OmegaConfBaseException, section: str = "") -> str:
    key = getattr(exc, "full_key", None)
    key = f"{section}{key}" if key else key
    message = str(exc).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not" in message:
        return _unknown_key(str(key))
    if key:
        return f"config key {key!r}: {message}"
    return f"invalid config: {message}"


def _floats(c: Config):
    """(dotted key, value) of every float setting of every section (each must be finite)."""
    for section in fields(c):
        value = getattr(c, section.name)
        if is_dataclass(value):
            for f in fields(value):
                if isinstance(getattr(value, f.name), float):
                    yield f"{section.name}.{f.name}", getattr(value, f.name)
    for name, settings in c.sections.items():
        for f in fields(settings):
            if isinstance(getattr(settings, f.name), float):
                yield f"{name}.{f.name}", getattr(settings, f.name)


def validate(c: Config) -> None:
    """Reject impossible values with one line naming the key."""

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r} {why} (got {_get(c, key)!r})")

    check(c.method in METHOD_NAMES or ":" in c.method, "method",
          f"must be one of {', '.join(sorted(METHOD_NAMES))} (or package.module:Class from a trusted package)")
    check(0.0 < c.pruning.density <= 1.0 and math.isfinite(c.pruning.density), "pruning.density", "must be in (0, 1]")
    check(c.dataset.partition in ("iid", "dirichlet"), "dataset.partition", "must be iid or dirichlet")
    check(c.dataset.alpha > 0, "dataset.alpha", "must be > 0")
    check(0.0 < c.dataset.holdout < 1.0, "dataset.holdout", "must be in (0, 1)")
    check(0.0 < c.dataset.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)")
    c.dataset.synthetic.validate(c, check)
    for key, value in _floats(c):
        check(math.isfinite(value), key, "must be a finite number")
    check(0 < c.model.width <= MAX_WIDTH, "model.width", f"must be in (0, {MAX_WIDTH}] (a multiple of the model's channels)")
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
    check(c.fl.eval_every >= 1, "fl.eval_every", "must be >= 1 (1 evaluates every round)")
    check(c.fl.sampling_seed >= -1, "fl.sampling_seed", "must be >= 0, or -1 to follow seed")
    check(c.fl.max_update_norm >= 0, "fl.max_update_norm", "must be >= 0 (0 turns clipping off)")
    check(c.fl.clip_multiple == 0 or c.fl.clip_multiple >= 1, "fl.clip_multiple",
          "must be 0 (off) or >= 1 (a multiple of the round's median update distance)")
    check(c.fl.reject_multiple == 0 or c.fl.reject_multiple >= max(1.0, c.fl.clip_multiple), "fl.reject_multiple",
          "must be 0 (off) or at least fl.clip_multiple (and >= 1)")
    check(c.fl.max_weight_share == 0 or 1 / c.fl.clients_per_round <= c.fl.max_weight_share <= 1,
          "fl.max_weight_share", "must be 0 (off) or in [1 / fl.clients_per_round, 1]")
    check(c.fl.aggregator in AGGREGATORS, "fl.aggregator", f"must be one of {', '.join(AGGREGATORS)}")
    check(0 <= c.fl.trim_fraction < 0.5, "fl.trim_fraction", "must be in [0, 0.5)")
    check(c.warmup.epochs >= 0, "warmup.epochs", "must be >= 0")
    check(c.warmup.shots >= 1, "warmup.shots", "must be >= 1")
    check(c.simulation.cpus_per_client >= 1, "simulation.cpus_per_client",
          "must be a whole number >= 1 (to run more clients at once raise simulation.num_cpus)")
    check(1 <= c.simulation.num_cpus <= MAX_CPUS, "simulation.num_cpus", f"must be in [1, {MAX_CPUS}]")
    _check_device(c, check)
    check(c.tracking in TRACKING, "tracking", f"must be one of {', '.join(TRACKING)}")
    check(0.0 <= c.simulation.fail_fraction < 1.0, "simulation.fail_fraction", "must be in [0, 1)")
    check(c.simulation.fail_mode in FAIL_MODES, "simulation.fail_mode", f"must be one of {', '.join(FAIL_MODES)}")
    check(c.simulation.attack in ATTACKS, "simulation.attack", f"must be one of {', '.join(ATTACKS)}")
    check(0.0 <= c.simulation.attack_fraction < 0.5, "simulation.attack_fraction", "must be in [0, 0.5)")
    for section in c.sections.values():
        if hasattr(section, "validate"):
            section.validate(c, check)
    _check_names(c)


def _check_device(c: Config, check) -> None:
    """`device` must name hardware this process has; GPUs reserved per client need a GPU Ray can see."""
    from shared.device import DeviceError, resolve

    try:
        device = resolve(c.device)
    except DeviceError as exc:
        raise ConfigError(f"config key 'device' {exc} (got {c.device!r})") from None
    g = c.simulation.gpus_per_client
    check(math.isfinite(g) and g >= 0 and (g <= 1 or g == int(g)), "simulation.gpus_per_client",
          "must be a fraction in [0, 1] or a whole number of GPUs")
    if g > 0 and not c.simulation.ray_address:
        check(resolve("auto").type == "cuda", "simulation.gpus_per_client",
              "reserves GPUs, but this machine has no CUDA GPU for Ray to hand out (use 0)")
        check(device.index in (None, 0), "device",
              "names one GPU, but with simulation.gpus_per_client > 0 Ray hands each client its own: use device=cuda")


def _check_names(c: Config) -> None:
    """Names that registries resolve are checked here so a typo fails before any work starts."""
    from shared.training import LR_SCHEDULES

    if c.fl.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"config key 'fl.lr_schedule': unknown schedule {c.fl.lr_schedule!r}; known: {', '.join(LR_SCHEDULES.names())}")


def resolve(registry, name: str, key: str, c: Config) -> None:
    """Check that `registry` resolves `name` under this config's trusted packages (for a section's validate)."""
    try:
        registry.get(name, c.trusted)
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {message[0].lower()}{message[1:]}") from None


def _get(c: Config, dotted: str) -> Any:
    obj: Any = c
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
