"""What a method decides around the shared training loop (server.loop)."""

from __future__ import annotations

import torch

from server.context import RunContext
from server.fleet import Reply
from server.global_model import GlobalModel
from shared.data import batches
from shared.partition import server_warmup_set
from shared.pruning import compute_masks
from shared.registry import Registry
from shared.training import warmup

METHODS: Registry = Registry("method")


class Method:
    """Hooks with do-nothing defaults: a method overrides only what defines it."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.summary: dict = {}

    def prepare(self, ctx: RunContext) -> GlobalModel:
        """The starting global model and masks (may talk to clients, e.g. a policy search)."""
        return GlobalModel(self.initial_model(ctx).state_dict())

    def pruned_at_start(self, ctx: RunContext, score: str, allocation: str) -> GlobalModel:
        """The starting model pruned once by a server-side score and allocation (dense at density 1)."""
        model = self.initial_model(ctx)
        c = ctx.config
        if c.pruning.density >= 1.0:
            return GlobalModel(model.state_dict())
        masks = compute_masks(model, c.pruning.density, score, allocation, seed=c.seed, keep_dense=ctx.dense_layers(model))
        return GlobalModel(model.state_dict(), masks)

    def initial_model(self, ctx: RunContext) -> torch.nn.Module:
        """The seeded model, warmed up on the server when configured (the same start for every method)."""
        model = ctx.new_model()
        server_warmup(ctx, model)
        return model

    def round_config(self, ctx: RunContext, gm: GlobalModel, t: int) -> dict:
        """Extra per-round config sent to the training clients."""
        return {}

    def after_round(self, ctx: RunContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        """Runs after aggregation of round t (e.g. prune/grow)."""

    def phase(self, t: int) -> str:
        return "train"

    def state_dict(self) -> dict:
        """JSON-serializable state a checkpoint needs to resume this method exactly."""
        return {"summary": self.summary}

    def load_state_dict(self, state: dict) -> None:
        self.summary = state["summary"]


def server_warmup(ctx: RunContext, model: torch.nn.Module) -> None:
    """Optional dense pre-training on a tiny labelled server set drawn from the train split (never test)."""
    c = ctx.config
    if c.fedtiny.warmup_epochs <= 0:
        return
    x, y = server_warmup_set(ctx.bundle, c.fedtiny.warmup_shots, c.seed)
    warmup(model, lambda e: batches(ctx.bundle, x, y, c.fl.batch_size, True, c.seed + e), c.fedtiny.warmup_epochs, c.fl.lr)
    ctx.recorder.note(f"server warm-up: {c.fedtiny.warmup_epochs} epochs on {len(y)} examples")
