"""A worked example of a federated pruning method in one file (docs/own-method.md, which shows this file).

Magnitude pruning with random regrowth (SET-style: Mocanu et al., "Scalable training of artificial
neural networks with adaptive sparse connectivity", Nature Communications 2018, arXiv 1707.04780),
made federated: the server prunes the starting model by global magnitude; every `interval` rounds
it drops the `fraction` smallest kept weights of one layer and regrows as many pruned positions
at random. Which layer? The one whose weights moved most in the clients' local training: each
client's half reports, per sparse layer, how far local training moved its weights.

Run it with `fedtiny run method=example_method:RandomRegrowth trusted=[example_method]` from a
directory where `example_method` imports (here: tests/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shared.methods import ClientHalf, Method, TrainJob
from shared import codec
from shared.pruning.prune_grow import DropGrow

MOVED = "moved"  # payload key of the client half: codec tensors, per layer the L2 norm of the local change
ADJUST = "regrow-now"  # config key: this round's clients report how far their layers moved


@dataclass
class RegrowSettings:
    interval: int = 1  # rounds between regrowths
    fraction: float = 0.2  # share of the layer's kept weights dropped and regrown

    def validate(self, c, check) -> None:
        check(self.interval >= 1, "regrow.interval", "must be >= 1")
        check(0.0 < self.fraction <= 1.0, "regrow.fraction", "must be in (0, 1]")


class RandomGrow(DropGrow):
    """Drop by |w| as RigL does; grow at random (a seeded score instead of the gradient)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def grow_scores(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator)


class RegrowClient(ClientHalf):
    """When asked, report how far local training moved each sparse layer's weights."""

    def before_training(self, job: TrainJob) -> None:
        job.scratch["start"] = {n: w.detach().clone() for n, w in job.model.named_parameters() if n in job.masks}

    def after_training(self, job: TrainJob, result) -> dict[str, bytes]:
        if not job.config.get(ADJUST, False):
            return {}
        params = dict(job.model.named_parameters())
        moved = {n: (params[n].detach() - start).norm().reshape(1) for n, start in job.scratch["start"].items()}
        return {MOVED: codec.encode(moved)}


def check_moved(blob: bytes | None, masks: dict) -> dict[str, float] | str:
    """A client's per-layer movement, or why it is unusable (a reply is hostile until checked)."""
    if blob is None:
        return "no movement reported"
    try:
        moved, _ = codec.decode(blob, max_bytes=64 * len(masks) + 4096)
    except ValueError as exc:
        return f"undecodable movement ({exc})"
    if set(moved) != set(masks) or any(v.numel() != 1 or not torch.isfinite(v).all() or v < 0 for v in moved.values()):
        return "movement must be one finite value >= 0 per sparse layer"
    return {n: float(v) for n, v in moved.items()}


class RandomRegrowth(Method):
    section = "regrow"
    Settings = RegrowSettings
    client = RegrowClient()

    def __init__(self, ctx):
        super().__init__(ctx)
        self.adjusting = False
        self.regrown: list[str] = []

    def prepare(self, ctx):
        return self.pruned_at_start(ctx, "magnitude", "global")

    def round_config(self, ctx, gm, t):
        self.adjusting = bool(gm.masks) and t % self.settings.interval == 0
        return {ADJUST: True} if self.adjusting else {}

    def check_reply(self, ctx, gm, reply):
        if not self.adjusting:
            return None
        vote = check_moved(reply.payload(MOVED), gm.masks)
        if isinstance(vote, str):
            return vote  # the reply is rejected: neither aggregated nor seen by after_round
        reply.extras[MOVED] = vote
        return None

    def after_round(self, ctx, gm, t, replies):
        if not (self.adjusting and replies):
            return
        layer = max(gm.masks, key=lambda n: sum(r.extras[MOVED][n] for r in replies))
        k = math.ceil(self.settings.fraction * int(gm.masks[layer].sum()))
        updater = RandomGrow(ctx.config.seed * 1000 + t)
        masks, weights = updater.update(gm.state, gm.masks, gm.state, {layer: k})
        gm.state.update(weights)
        gm.set_masks(masks)
        self.regrown.append(layer)

    def phase(self, t):
        return "adjust" if self.adjusting else "train"

    def state_dict(self):
        return {**super().state_dict(), "regrown": self.regrown}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.regrown = state["regrown"]
