"""Atomic per-round checkpoints of the whole server state, and resuming from them.

The weights and masks go to `checkpoint-<round>.ftc` (codec format), everything else
(round, mask versions, the method's own state, the sampling RNG, metrics and byte
totals) to `checkpoint.json`, written last and atomically, so a crash at any moment
leaves a consistent pair. Client work is seeded from (seed, round, partition), so a
resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from server.context import RunContext
from server.global_model import GlobalModel
from server.recorder import RoundRecord
from shared import codec, rundir

STATE_FILE = rundir.CHECKPOINT
TOTALS = ("bytes_up", "bytes_down", "dense_bytes_up", "dense_bytes_down", "failures", "rejected")


def save(ctx: RunContext, gm: GlobalModel, method, t: int) -> None:
    out = ctx.output_dir
    weights = rundir.CHECKPOINT_WEIGHTS.format(round=t)
    codec.save(out / weights, gm.state, gm.masks or None)
    state = {
        "round": t,
        "weights": weights,
        "version": gm.version,
        "layer_version": gm.layer_version,
        "method": method.state_dict(),
        "rng": ctx.rng.bit_generator.state,
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


def restore(ctx: RunContext, method) -> tuple[GlobalModel, int]:
    """The global model and the last finished round; ctx and method continue from there."""
    state = json.loads((ctx.output_dir / STATE_FILE).read_text())
    tensors, masks = codec.load(ctx.output_dir / state["weights"])
    gm = GlobalModel(tensors)
    gm.masks = masks
    gm.version = state["version"]
    gm.layer_version = {k: int(v) for k, v in state["layer_version"].items()}
    method.load_state_dict(state["method"])
    ctx.rng.bit_generator.state = state["rng"]
    ctx.recorder.rounds = [RoundRecord(**r) for r in state["rounds"]]
    for key, value in state["totals"].items():
        setattr(ctx, key, value)
    ctx.recorder.note(f"resumed after round {state['round']} from {ctx.output_dir / STATE_FILE}")
    return gm, int(state["round"])
