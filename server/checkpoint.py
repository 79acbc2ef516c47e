"""Atomic per-round checkpoints of the whole server state, and resuming from them.

The weights and masks go to `checkpoint-<round>.ftc` (codec format), everything else
(round, mask versions, the method's own state, metrics and byte totals) to
`checkpoint.json`, written last and atomically, so a crash at any moment leaves a
consistent pair. Client draws are keyed by (sampling seed, stream, round) (`shared.draws.Draw`)
and client work is seeded from (sampling seed, round, partition), the sampling seed being
`fl.sampling_seed` or `seed`, so a resumed run repeats exactly what the uninterrupted run would
have done.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from server.context import RunState
from server.recorder import RoundRecord
from shared import codec, rundir
from shared.global_model import GlobalModel
from shared.pruning import density

STATE_FILE = rundir.CHECKPOINT
TOTALS = ("bytes_up", "bytes_down", "dense_bytes_up", "dense_bytes_down", "failures", "rejected")


def save(ctx: RunState, gm: GlobalModel, method, t: int) -> None:
    out = ctx.output_dir
    weights = rundir.CHECKPOINT_WEIGHTS.format(round=t)
    codec.save(out / weights, gm.state, gm.masks or None)
    state = {
        "round": t,
        "weights": weights,
        "version": gm.version,
        "layer_version": gm.layer_version,
        "method": method.state_dict(),
        "rounds": [asdict(r) for r in ctx.recorder.rounds],
        "totals": {k: getattr(ctx, k) for k in TOTALS},
    }
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out / STATE_FILE)
    for old in out.glob(rundir.CHECKPOINT_WEIGHTS.format(round="*")):
        if old.name != weights:
            old.unlink(missing_ok=True)


def exists(out: Path) -> bool:
    return (out / STATE_FILE).exists()


class BadCheckpoint(ValueError):
    """A checkpoint that does not belong to this run's config and model (refused before anything is written)."""


def restore(ctx: RunState, method) -> tuple[GlobalModel, int]:
    """The global model and the last finished round; ctx and method continue from there.

    The checkpoint is hostile until checked (`check`): nothing of the run is overwritten before it is.
    """
    try:
        state = json.loads((ctx.output_dir / STATE_FILE).read_text())
        t = check_state(state, ctx.config.fl.rounds)
        reference = ctx.new_model().state_dict()
        check_records(state, reference)
        tensors, masks = codec.load(ctx.output_dir / state["weights"], expected=codec.expect(reference))  # sized before read
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadCheckpoint(f"cannot resume from {ctx.output_dir / STATE_FILE}: {str(exc).splitlines()[0]}") from None
    reason = check_model(tensors, masks, reference, state["rounds"][-1]["density"])
    if reason:
        raise BadCheckpoint(f"cannot resume from {ctx.output_dir / STATE_FILE}: {reason}")
    try:
        method.load_state_dict(state["method"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise BadCheckpoint(f"cannot resume from {ctx.output_dir / STATE_FILE}: its method state does not load "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    gm = GlobalModel(tensors)
    gm.masks = masks
    gm.version = state["version"]
    gm.layer_version = dict(state["layer_version"])
    ctx.recorder.rounds = [RoundRecord(**r) for r in state["rounds"]]
    for key, value in state["totals"].items():
        setattr(ctx, key, value)
    ctx.recorder.note(f"resumed after round {t} from {ctx.output_dir / STATE_FILE}")
    return gm, t


def check_state(state, rounds: int) -> int:
    """The checkpoint's round, after checking that it is a finished round of this run, that the weights
    file is this round's own inside the run folder, and that every round up to it was recorded."""
    if not isinstance(state, dict) or not {"round", "weights", "rounds", "totals", "method"} <= set(state):
        raise ValueError("it is not a fedtiny checkpoint (keys missing)")
    t = state["round"]
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= rounds:
        raise ValueError(f"its round {t!r} is not a round of this run (0 to fl.rounds={rounds})")
    if state["weights"] != rundir.CHECKPOINT_WEIGHTS.format(round=t):
        raise ValueError(f"its weights file {state['weights']!r} is not {rundir.CHECKPOINT_WEIGHTS.format(round=t)!r}")
    if not isinstance(state["rounds"], list) or len(state["rounds"]) != t + 1:
        raise ValueError(f"it records {len(state['rounds'])} rounds for round {t}")
    return t


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_records(state: dict, reference: dict) -> None:
    """ValueError unless the round records, totals and mask versions have the types `restore` copies
    into the run: a record's fields as `RoundRecord` declares them, counts as non-negative integers,
    measures as numbers (a diverged round's loss may be infinite), mask versions only for the model's tensors."""
    declared = {f.name: f for f in dataclasses.fields(RoundRecord)}
    for i, record in enumerate(state["rounds"]):
        if not isinstance(record, dict) or not set(record) <= set(declared):
            raise ValueError(f"its round record {i} is not a round record")
        for name, f in declared.items():
            if name not in record and f.default is dataclasses.MISSING:
                raise ValueError(f"its round record {i} has no {name}")
            value = record.get(name, f.default)
            ok = (isinstance(value, str) if f.type == "str" else _count(value) if f.type == "int"
                  else value is None if value is None and "None" in f.type else _number(value))
            if not ok:
                raise ValueError(f"its round record {i} has {name}={value!r}, not a {f.type}")
    if not 0 <= state["rounds"][-1]["density"] <= 1:
        raise ValueError(f"its last round records density {state['rounds'][-1]['density']!r}, not in [0, 1]")
    totals = state["totals"]
    if not isinstance(totals, dict) or set(totals) != set(TOTALS) or not all(map(_count, totals.values())):
        raise ValueError(f"its totals are not non-negative counts of {', '.join(TOTALS)}")
    version, layers = state.get("version"), state.get("layer_version")
    if not _count(version) or not isinstance(layers, dict):
        raise ValueError("its mask versions are not counts")
    for name, v in layers.items():
        if name not in reference or not _count(v) or v > version:
            raise ValueError(f"its mask version of {str(name)[:60]!r} is {v!r}: not a count up to {version} for a model tensor")


def check_model(tensors: dict, masks: dict, reference: dict, recorded_density: float) -> str | None:
    """Why checkpointed weights and masks do not fit this run's model and its recorded density, or None."""
    if set(tensors) != set(reference):
        return f"its weights name other layers than the model: {sorted(set(tensors) ^ set(reference))[:3]}"
    for name, value in tensors.items():
        if value.shape != reference[name].shape or value.dtype != reference[name].dtype:
            return f"{name} is {value.dtype} {tuple(value.shape)}, the model's is {reference[name].dtype} {tuple(reference[name].shape)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{name} holds non-finite values (NaN or infinity)"
    for name, mask in masks.items():
        if name not in reference or mask.shape != reference[name].shape:
            return f"its mask of {name} fits no weight of the model"
    kept = density(masks) if masks else 1.0
    if abs(kept - recorded_density) > 1e-9:
        return f"its masks keep density {kept:.4f} but the run recorded {recorded_density:.4f} for that round"
    return None
