"""The run's independent random streams of client draws, keyed by (seed, stream, key).

Pure numpy, so a method's hooks (`shared.methods`) can name a stream for the server's draws.
"""

from __future__ import annotations

from enum import IntEnum, unique

import numpy as np


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
    CLIENT_SEEDS = 37  # each client's seed for its local work in a round (the server's `client_seed`)
    THOMPSON = 41  # FedRTS's Thompson sampling of the new masks in an adjustment round


def seed_sequence(seed: int, stream: Draw, *key: int) -> np.random.SeedSequence:
    """The one seed sequence of `stream` at `key` in run `seed`. Streams and keys are a spawn key,
    not more entropy words, so no two (stream, key) pairs share a sequence: with
    `SeedSequence([seed, stream, round])` and `SeedSequence([seed, round, partition])`, training
    round 7's draw and partition 7's seed in round 1 were one sequence."""
    return np.random.SeedSequence(seed, spawn_key=(int(stream), *key))
