"""Upper bounds of config values: a finite but absurd value is refused in one line before a run starts.

Why: a value can be finite and still wreck a run or the machine: `fl.round_timeout=1e300` waits
forever for a lost client, `fl.lr=1e308` turns the first step into infinities, `fl.rounds=1e11`
never ends and `fl.batch_size=1e12` asks for terabytes. Each bound sits far above any setting a
real job uses (the paper's jobs, the configs in configs/), so only nonsense is refused.
`shared.config.validate` calls `check_bounds` after its own checks of each key's meaning.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

Check = Callable[[bool, str, str], None]  # shared.config.validate's check(ok, dotted_key, why)

BOUNDS: dict[str, tuple[float, float]] = {  # dotted key -> (lowest, highest), both allowed
    "seed": (0, 2**32 - 1),  # numpy's and torch's seeds both take it
    "fl.sampling_seed": (-1, 2**32 - 1),
    "fl.rounds": (1, 100_000),
    "fl.num_clients": (1, 1_000_000),
    "fl.local_epochs": (1, 1_000),
    "fl.batch_size": (1, 65_536),
    "fl.lr": (0, 10.0),
    "fl.weight_decay": (0, 1.0),
    "fl.round_timeout": (0, 7 * 24 * 3600.0),  # a week
    "fl.max_update_norm": (0, 1e6),
    "fl.clip_multiple": (0, 1e6),
    "fl.reject_multiple": (0, 1e6),
    "fl.eval_every": (1, 100_000),
    "dataset.alpha": (0, 1e6),
    "warmup.epochs": (0, 1_000),
    "warmup.shots": (1, 100_000),
    "simulation.gpus_per_client": (0, 64),
}
MAX_NUMBER = 1e9
"""Every other number of the config (a method's settings included) stays within +-MAX_NUMBER."""
MAX_PATH = 4096  # characters of output_dir (Linux PATH_MAX)
MAX_NAME = 255  # bytes of each of its folder names (Linux NAME_MAX)


def _numbers(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every int and float setting of a config, its method sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{f.name}", value
    for name, section in (getattr(obj, "sections", None) or {}).items() if not prefix else ():
        yield from _numbers(section, f"{name}.")


def _show(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"


def check_bounds(config: Any, check: Check) -> None:
    """Refuse (through `check`) a number outside its `BOUNDS`, else outside +-`MAX_NUMBER`, and an
    output_dir no file system holds."""
    for key, value in _numbers(config):
        low, high = BOUNDS.get(key, (-MAX_NUMBER, MAX_NUMBER))
        check(low <= value <= high, key, f"must be in [{_show(low)}, {_show(high)}]")
    out = config.output_dir
    check(len(out) <= MAX_PATH and all(len(p.encode()) <= MAX_NAME for p in out.split("/")), "output_dir",
          f"must be a path of at most {MAX_PATH} characters with folder names of at most {MAX_NAME} bytes")
