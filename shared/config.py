"""Typed, validated configuration: YAML in configs/ -> OmegaConf -> `Config`.

Config flows one way. Entry points (the CLI, the ServerApp, the ClientApp) call
`load_config` or `from_flat` once; everything below receives plain dataclasses.
Errors are `ConfigError` with one line naming the key and what to do.

The core sections are fixed; every method adds its own settings section (`fedtiny:`,
`feddst:`, ...), a dataclass registered with `register_method` by the method's module
(`shared.methods`). A config carries every registered section, so one file can set several
methods' settings (e.g. for `fedtiny compare`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shared.config_checks import resolve, validate
from shared.config_schema import (
    _CORE, ATTACKS, BUILTIN_METHODS, CONFIG_DIR, DEFAULT_CONFIG, FAIL_MODES, MAX_CPUS, MAX_WIDTH, TRACKING, Config,
    ConfigError, DatasetConfig, FLConfig, ModelConfig, PruningConfig, SimulationConfig, SyntheticConfig, WarmupConfig, _builtin,
    _discover, register_method,
)

__all__ = [
    "ATTACKS", "BUILTIN_METHODS", "CONFIG_DIR", "DEFAULT_CONFIG", "FAIL_MODES", "MAX_CPUS", "MAX_WIDTH", "TRACKING",
    "Config", "ConfigError", "DatasetConfig", "FLConfig", "ModelConfig", "PruningConfig", "SimulationConfig",
    "SyntheticConfig", "WarmupConfig", "from_flat", "from_mapping", "load_config", "register_method", "resolve", "to_flat", "to_yaml",
    "validate",
]


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


USER_SECTIONS = "user_sections"  # flat key: JSON of the sections of methods outside shared.methods


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
