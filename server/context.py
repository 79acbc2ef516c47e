"""The run's server-side state, built once from the validated config: the config, fleet, data,
recorder and byte totals, and the model helpers. `server.services.RunContext` adds the services
that talk to clients; together they are what a method's hooks get (`shared.methods.MethodContext`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from server.fleet import Fleet, Traffic
from server.recorder import Recorder
from shared.aggregate import cap_weights
from shared.config import Config
from shared.data import DataBundle, batches, to_tensor
from shared.device import DeviceBatches, on_device, resolve
from shared.draws import Draw, seed_sequence
from shared.methods.api import Reply
from shared.models import model_for, prunable_blocks
from shared.pruning.params import prunable_names
from shared.training import EvalResult, evaluate


@dataclass
class RunState:
    config: Config
    fleet: Fleet
    bundle: DataBundle
    recorder: Recorder
    output_dir: Path
    device: torch.device = field(init=False)  # central evaluation and warm-up (`config.device`)
    tracker: object = None  # server.tracking.Tracker of the run, when tracking is on
    bytes_up: int = 0
    bytes_down: int = 0
    dense_bytes_up: int = 0
    dense_bytes_down: int = 0
    failures: int = 0
    rejected: int = 0

    def __post_init__(self) -> None:
        self.device = resolve(self.config.device)
        self._test = None

    def note(self, line: str) -> None:
        self.recorder.note(line)

    def totals(self, traffic: Traffic) -> None:
        self.bytes_up += traffic.up
        self.bytes_down += traffic.down
        self.failures += len(traffic.failures)
        self.rejected += len(traffic.rejected)

    def dense_traffic(self, sampled: int, replied: int, model_bytes: int) -> None:
        """What dense FedAvg would have sent for the same sampled and replying clients."""
        self.dense_bytes_down += sampled * model_bytes
        self.dense_bytes_up += replied * model_bytes

    def new_model(self) -> torch.nn.Module:
        return model_for(self.config, self.bundle)

    def prunable(self, model: torch.nn.Module) -> list[str]:
        """Names of the weights that may be pruned (the first layer stays dense if configured)."""
        names = prunable_names(model)
        return names[1:] if self.config.pruning.keep_first_dense else names

    def dense_layers(self, model: torch.nn.Module) -> list[str]:
        """Prunable weights that stay dense (the first layer when `pruning.keep_first_dense`)."""
        keep = set(self.prunable(model))
        return [n for n in prunable_names(model) if n not in keep]

    def blocks(self, model: torch.nn.Module) -> list[list[str]]:
        keep = set(self.prunable(model))
        return [b for b in ([n for n in block if n in keep] for block in prunable_blocks(model)) if b]

    def weights(self, replies: list[Reply]) -> list[float]:
        """The replies' bounded counts (`Reply.weight`) as weights summing to 1, none above
        `fl.max_weight_share` of them (`shared.aggregate.cap_weights`)."""
        return cap_weights([r.weight for r in replies], self.config.fl.max_weight_share)

    def draws(self, stream: Draw, *key: int) -> np.random.Generator:
        """The generator of one draw of clients: stream `stream` at `key` (usually the round)."""
        return np.random.default_rng(seed_sequence(self.sampling_seed, stream, *key))

    def client_seed(self, round_: int, node_id: int) -> int:
        """A seed for a client's local work, reproducible from (sampling seed, round, partition)."""
        part = self.fleet.partition_of.get(node_id, 0)
        return int(seed_sequence(self.sampling_seed, Draw.CLIENT_SEEDS, round_, part).generate_state(1)[0] % (2**31))

    @property
    def sampling_seed(self) -> int:
        """The seed of client draws and local work: `fl.sampling_seed`, or the run's seed."""
        s = self.config.fl.sampling_seed
        return self.config.seed if s < 0 else s

    def evaluate_central(self, state: dict[str, torch.Tensor]) -> EvalResult:
        model = self.new_model().to(self.device)
        model.load_state_dict(state)
        return evaluate(model, self.test_batches())

    def test_batches(self):
        """The central test set in batches of 256; on a GPU moved there once and cut on the device."""
        b = self.bundle
        if self.device.type == "cpu":
            return batches(b, b.x_test, b.y_test, 256, False, 0)
        if self._test is None:
            self._test = on_device(to_tensor(b, b.x_test), b.y_test, self.device)
        return DeviceBatches(*self._test, 256, False, 0)
