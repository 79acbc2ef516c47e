"""Iterative magnitude pruning over the run, LotteryFL-style: prune the global model in steps.

Li et al., "LotteryFL: Personalized and Communication-Efficient Federated Learning with Lottery
Ticket Hypothesis on Non-IID Datasets", https://arxiv.org/abs/2008.03371, after Frankle &
Carbin, "The Lottery Ticket Hypothesis", https://arxiv.org/abs/1803.03635. Training starts
dense; after rounds t_1 < ... < t_K, evenly spread up to T = `imp.end_fraction` x rounds
(K = T // `imp.interval`, at least 1; the defaults are FedTiny's timeline), the
server prunes the global model by global magnitude to density d^(k/K) (a constant fraction
per step, as IMP), each step pruning only weights still kept; the rounds after T fine-tune
at exactly the target d = `pruning.density`. Weights are not rewound: LotteryFL's rewinding
serves personalised client models, while we compare one global model. Clients train densely
until the first step, so IMP pays a dense model's client memory and early traffic.
Client config keys: only the shared training keys (``round``, ``seed``, ``epochs``, ``lr``, ``fail``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.global_model import GlobalModel
from shared.methods.api import Method, MethodContext, Reply
from shared.methods.registry import register
from shared.pruning import full_masks, shrink_by_magnitude


@dataclass
class IMPSettings:
    end_fraction: float = 0.6  # T: the last pruning step is at end_fraction x rounds
    interval: int = 5  # about this many rounds between pruning steps

    def validate(self, c, check) -> None:
        check(0.0 <= self.end_fraction <= 1.0, "imp.end_fraction", "must be in [0, 1]")
        check(self.interval >= 1, "imp.interval", "must be >= 1")


def prune_rounds(rounds: int, end_fraction: float, interval: int) -> list[int]:
    """Rounds after which IMP prunes: K evenly spread rounds ending at T = max(1, floor(end_fraction x rounds))."""
    t_end = max(1, math.floor(end_fraction * rounds))
    steps = max(1, t_end // interval)
    return [round(k * t_end / steps) for k in range(1, steps + 1)]


def step_density(target: float, step: int, steps: int) -> float:
    """Density after the step-th of `steps` pruning steps: target^(step/steps)."""
    return target ** (step / steps)


@register("imp")
class IMP(Method):
    Settings = IMPSettings

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        s = self.settings
        self.schedule = prune_rounds(ctx.config.fl.rounds, s.end_fraction, s.interval)
        self.pruned = False
        self.dense: list[str] = []

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        model = self.initial_model(ctx)
        self.dense = ctx.dense_layers(model)
        return GlobalModel(model.state_dict(), full_masks(model, ctx.prunable(model) + self.dense))

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        self.pruned = bool(gm.masks) and t in self.schedule
        if not self.pruned:
            return
        step = self.schedule.index(t) + 1
        target = step_density(ctx.config.pruning.density, step, len(self.schedule))
        gm.set_masks(shrink_by_magnitude(gm.state, gm.masks, target, ctx.config.seed, self.dense))
        ctx.note(f"imp: round {t} pruned to density {gm.density:.4f}")

    def phase(self, t: int) -> str:
        return "prune" if t in self.schedule else "train"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "dense": self.dense}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.dense = state["dense"]
