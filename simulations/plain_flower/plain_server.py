"""Flower's built-in FedAvg strategy on fedtiny's model and data; writes plain.json with round times.

A round's time runs from the end of one centralized evaluation to the end of the next,
as fedtiny's `rounds[].seconds` does (send, train, aggregate, evaluate centrally).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plain_common import config_and_data, new_model
from shared.data import batches
from shared.training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, bundle = config_and_data(str(context.run_config["config-file"]))
    f = config.fl
    model = new_model(config, bundle)
    marks: list[float] = []
    accuracy: list[float] = []

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, batches(bundle, bundle.x_test, bundle.y_test, 256, False, 0))
        marks.append(time.monotonic())
        accuracy.append(result.accuracy)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy = FedAvg(
        fraction_train=f.clients_per_round / f.num_clients, fraction_evaluate=0.0,
        min_train_nodes=f.clients_per_round, min_available_nodes=f.num_clients,
    )
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=f.rounds,
        train_config=ConfigRecord({"seed": config.seed}), evaluate_fn=central,
    )
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    out = Path(str(context.run_config["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "plain.json").write_text(json.dumps({"round_seconds": seconds, "accuracy": accuracy}))
