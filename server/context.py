"""Everything a method needs during a run, built once from the validated config."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, unique
from pathlib import Path

import numpy as np
import torch

from server.aggregate import cap_weights
from server.fleet import Fleet, Reply, Traffic
from server.recorder import Recorder
from shared.config import Config
from shared.data import DataBundle, batches, to_tensor
from shared.device import DeviceBatches, on_device, resolve
from shared.models import model_for, prunable_blocks
from shared.pruning.params import prunable_names
from shared.training import EvalResult, evaluate


@unique
class Draw(IntEnum):
    """The run's independent random streams, each keyed by (seed, stream, key) (`seed_sequence`):
    which clients round t samples depends on nothing else. So every method on one seed trains round
    t on the same clients (a paired comparison, whatever search, score or BN rounds came before and
    whatever retries failures caused), and a resumed run needs no generator state."""

    TRAIN = 1
    EVALUATE = 2
    SCORES = 3
    BN = 5
    FAULTS = 7  # the fault drill's failing clients (simulation.fail_fraction)
    SEARCH_PANEL = 17  # the held-out panel that scores every successive-halving stage
    HALVING = 29  # successive halving's training rounds, the same for every candidate
    CLIENT_SEEDS = 37  # each client's seed for its local work in a round (`RunContext.client_seed`)
    THOMPSON = 41  # FedRTS's Thompson sampling of the new masks in an adjustment round


def seed_sequence(seed: int, stream: Draw, *key: int) -> np.random.SeedSequence:
    """The one seed sequence of `stream` at `key` in run `seed`. Streams and keys are a spawn key,
    not more entropy words, so no two (stream, key) pairs share a sequence: with
    `SeedSequence([seed, stream, round])` and `SeedSequence([seed, round, partition])`, training
    round 7's draw and partition 7's seed in round 1 were one sequence."""
    return np.random.SeedSequence(seed, spawn_key=(int(stream), *key))


@dataclass
class RunContext:
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
        """The replies' sample weights, none above `fl.max_weight_share` of them (when set)."""
        return cap_weights([r.num_examples for r in replies], self.config.fl.max_weight_share)

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
