"""Validation of a built config: every impossible value is one line naming its key (`ConfigError`)."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any

from shared.bounds import check_bounds
from shared.config_schema import ATTACKS, FAIL_MODES, MAX_CPUS, MAX_WIDTH, METHOD_NAMES, TRACKING, Config, ConfigError


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
            raise ConfigError(f"config key {key!r} {why} (got {_get(c, key)!r:.200})")

    check(c.method in METHOD_NAMES or ":" in c.method, "method",
          f"must be one of {', '.join(sorted(METHOD_NAMES))} (or package.module:Class from a trusted package)")
    check(0.0 < c.pruning.density <= 1.0 and math.isfinite(c.pruning.density), "pruning.density", "must be in (0, 1]")
    check(c.dataset.partition in ("iid", "dirichlet"), "dataset.partition", "must be iid or dirichlet")
    check(c.dataset.alpha > 0, "dataset.alpha", "must be > 0")
    check(0.0 < c.dataset.holdout < 1.0, "dataset.holdout", "must be in (0, 1)")
    check(0.0 < c.dataset.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)")
    c.dataset.synthetic.validate(c, check)
    if c.dataset.name == "synthetic":
        from shared.partition import min_client_size  # torch: only for a config that needs it

        need = min_client_size(c.dataset.holdout)
        check(need <= c.dataset.synthetic.min_samples, "dataset.synthetic.min_samples",
              f"must be at least {need} (2 to train and 2 held out at dataset.holdout={c.dataset.holdout:g})")
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
    check(0 <= c.fl.max_weight_share <= 1, "fl.max_weight_share",
          "must be in [0, 1] (0: off; below 1 / the round's replies they weigh equally)")
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
    check_bounds(c, check)  # finite but absurd values (shared.bounds)
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
    from shared.aggregate import AGGREGATORS
    from shared.training import LR_SCHEDULES

    if c.fl.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"config key 'fl.lr_schedule': unknown schedule {c.fl.lr_schedule!r}; known: {', '.join(LR_SCHEDULES.names())}")
    resolve(AGGREGATORS, c.fl.aggregator, "fl.aggregator", c)


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
