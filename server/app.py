"""The fedtiny ServerApp: parse the run config once, run the chosen method, write the outputs."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import loop
from server.fleet import Fleet
from server.recorder import PROGRESS_PREFIX, Recorder, plot, run_title
from server.services import RunContext
from server.tracking import open_tracker
from shared import methods
from shared import codec, rundir
from shared.accounting import count_parameters, flops, model_size
from shared.config import Config, from_flat, to_yaml
from shared.data import load_for
from shared.export import write_spec
from shared.partition import partition_sizes

app = ServerApp()
log = logging.getLogger("fedtiny")


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    _log_to_stdout()
    config = from_flat(context.run_config)
    run(grid, config)


def _log_to_stdout() -> None:
    """Client failures and rejected updates appear in the run's streamed output, one line each."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"{PROGRESS_PREFIX} %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def output_dir(config: Config) -> Path:
    if config.output_dir:
        return Path(config.output_dir).expanduser().resolve()
    return rundir.default_output_dir(config.method)


def run(grid: Grid, config: Config) -> Path:
    """Run one federated job on `grid` and write its outputs; returns the output directory."""
    out = output_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / rundir.CONFIG).write_text(to_yaml(config))
    recorder = Recorder(config.fl.rounds)
    tracker = open_tracker(config.tracking, out)
    if tracker:
        tracker.config(to_yaml(config))
    recorder.note(f"output directory {out}")
    fleet = Fleet(
        grid, config.fl.num_clients, config.fl.min_replies, config.fl.round_timeout, config.simulation.virtual_partitions
    )
    try:
        bundle = load_for(config)
        write_spec(out, config, bundle)  # what export needs, so it never reloads the dataset
        ctx = RunContext(config, fleet, bundle, recorder, out)
        ctx.tracker = tracker
        d = config.dataset
        fleet.register(lambda: partition_sizes(bundle, config.fl.num_clients, d.partition, d.alpha, d.holdout, config.seed))
        method = methods.load(config.method, config.trusted)(ctx)
        gm = loop.run_training(ctx, method)
        federated = loop.federated_evaluation(ctx, gm)
        ctx.totals(fleet.traffic.take())
        last = recorder.rounds[-1]
        last.federated_accuracy = federated["federated_accuracy"]  # the final model's, measured after the last round
        if tracker:
            tracker.scalar("federated/accuracy", last.federated_accuracy, last.round)
    except Exception as exc:
        if recorder.rounds or not config.resume:  # a resume that failed before its checkpoint loaded keeps the old metrics
            recorder.summary = {"error": f"{type(exc).__name__}: {exc}"}
            recorder.write(out)
        raise
    finally:
        if tracker:
            tracker.close()
    recorder.summary = summarize(ctx, gm, method, federated)
    recorder.write(out)
    codec.save(out / rundir.MODEL, gm.state, gm.masks or None)
    plot(out, recorder.rounds, gm.masks, run_title(config))
    recorder.note(
        f"done: accuracy={recorder.summary['accuracy']:.4f} density={recorder.summary['density']:.4f} "
        f"bytes={ctx.bytes_up + ctx.bytes_down} dense_bytes={ctx.dense_bytes_up + ctx.dense_bytes_down} -> {out}"
    )
    return out


def summarize(ctx: RunContext, gm, method, federated: dict) -> dict:
    model = ctx.new_model()
    model.load_state_dict(gm.state)
    masks = gm.masks or None
    final = ctx.recorder.rounds[-1]
    return {
        "method": ctx.config.method,
        "accuracy": final.accuracy,
        "loss": final.loss,
        "density": gm.density,
        "bytes_up": ctx.bytes_up,
        "bytes_down": ctx.bytes_down,
        "dense_bytes_up": ctx.dense_bytes_up,
        "dense_bytes_down": ctx.dense_bytes_down,
        "bytes_ratio": (ctx.bytes_up + ctx.bytes_down) / max(1, ctx.dense_bytes_up + ctx.dense_bytes_down),
        "client_failures": ctx.failures,
        "rejected_updates": ctx.rejected,
        "wall_seconds": time.monotonic() - ctx.recorder.started,
        "parameters": count_parameters(model, masks),
        "flops": flops(model, ctx.bundle.input_shape, masks),
        "model_size": model_size(model, masks),
        "candidates": [],
        "selected": None,
        **method.summary,  # the method's own record: FedTiny's search, its final BN recalibration
        **federated,
    }
