"""Per-process client state: the validated config, the data of this node, a model factory.

A simulation process serves many virtual clients, so the dataset is loaded once
per process and each client's partition is cut on demand from the seed (lazy).
Models and batches live on the config's `device` (`shared.device`); on a GPU the
partition is moved there once, so batches are cut on the device without host copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable

import torch
from flwr.app import Context, RecordDict

from shared import protocol as p
from shared.config import Config, from_flat
from shared.data import DataBundle, batches, load_for, to_tensor
from shared.device import DeviceBatches, on_device, resolve
from shared.models import model_for
from shared.partition import ClientData, client_data


@dataclass
class ClientRuntime:
    config: Config
    bundle: DataBundle
    data: ClientData
    partition_id: int
    device: torch.device = torch.device("cpu")
    _resident: dict = field(default_factory=dict, repr=False)  # split -> (x, y) on a GPU

    def new_model(self) -> torch.nn.Module:
        return model_for(self.config, self.bundle).to(self.device)

    def train_batches(self, seed: int) -> Callable[[int], Iterable]:
        """Shuffled local training batches for epoch e, reproducible from (seed, e)."""
        d, bs = self.data, self.config.fl.batch_size
        if self.device.type != "cpu":
            x, y = self._on_device("train", d.x_train, d.y_train)
            return lambda epoch: DeviceBatches(x, y, bs, True, seed * 1009 + epoch)
        return lambda epoch: batches(self.bundle, d.x_train, d.y_train, bs, True, seed * 1009 + epoch)

    def holdout_batches(self) -> list:
        """The held-out split in order (`shared.batchnorm.recalibrate` counts a last batch of one with the one before)."""
        d = self.data
        if self.device.type != "cpu":
            x, y = self._on_device("holdout", d.x_holdout, d.y_holdout)
            return list(DeviceBatches(x, y, self.config.fl.batch_size, False, 0))
        return list(batches(self.bundle, d.x_holdout, d.y_holdout, self.config.fl.batch_size, False, 0))

    def _on_device(self, split: str, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """This client's split, normalized and moved to the device once (what `batches` would yield)."""
        if split not in self._resident:
            self._resident[split] = on_device(to_tensor(self.bundle, x), y, self.device)
        return self._resident[split]


def client_runtime(context: Context, content: RecordDict) -> ClientRuntime:
    """Parse the run config once per process (the entry point of config on the client side).

    The data is the node's own partition (`partition-id` in its node config), except in a
    simulation with `simulation.virtual_partitions`, where the server names it in each message.
    """
    flat = tuple(sorted(context.run_config.items()))
    node = context.node_config
    partition = int(node["partition-id"])
    if _config(flat).simulation.virtual_partitions:
        if p.CONFIG not in content or p.ACTING_PARTITION not in content[p.CONFIG]:
            raise ValueError("simulation.virtual_partitions is on but the message names no partition")
        partition = int(content[p.CONFIG][p.ACTING_PARTITION])
    return _runtime(flat, partition, int(node["num-partitions"]))


@lru_cache(maxsize=8)
def _config(flat: tuple) -> Config:
    torch.set_num_threads(1)
    return from_flat(dict(flat))


@lru_cache(maxsize=64)
def _runtime(flat: tuple, partition_id: int, num_partitions: int) -> ClientRuntime:
    config = _config(flat)
    if num_partitions != config.fl.num_clients:
        raise ValueError(
            f"this node belongs to a federation of {num_partitions} partitions but fl.num_clients="
            f"{config.fl.num_clients}; start the federation with num-supernodes={config.fl.num_clients}"
        )
    d = config.dataset
    bundle = load_for(config)
    data = client_data(bundle, config.fl.num_clients, partition_id, d.partition, d.alpha, d.holdout, config.seed)
    return ClientRuntime(config, bundle, data, partition_id, resolve(config.device))
