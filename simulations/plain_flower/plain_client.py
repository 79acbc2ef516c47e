"""A minimal ClientApp in the style of Flower's quickstart-pytorch, training with fedtiny's own loop."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plain_common import config_and_data, new_model
from shared.data import batches
from shared.partition import client_data
from shared.training import train_masked

app = ClientApp()


@lru_cache(maxsize=64)
def _partition(config_file: str, partition_id: int):
    config, bundle = config_and_data(config_file)
    d = config.dataset
    return client_data(bundle, config.fl.num_clients, partition_id, d.partition, d.alpha, d.holdout, config.seed)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config_file = str(context.run_config["config-file"])
    config, bundle = config_and_data(config_file)
    data = _partition(config_file, int(context.node_config["partition-id"]))
    model = new_model(config, bundle)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    f, seed = config.fl, int(msg.content["config"]["seed"])
    result = train_masked(
        model, None, lambda e: batches(bundle, data.x_train, data.y_train, f.batch_size, True, seed * 1009 + e),
        f.local_epochs, f.lr, f.momentum, f.weight_decay,
    )
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss}),
    })
    return Message(content, reply_to=msg)
