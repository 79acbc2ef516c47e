"""What a method decides around the shared training loop (server.loop)."""

from __future__ import annotations

from server.context import RunContext
from server.fleet import Reply
from server.global_model import GlobalModel
from shared.registry import Registry

METHODS: Registry = Registry("method")


class Method:
    """Hooks with do-nothing defaults: a method overrides only what defines it."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.summary: dict = {}

    def prepare(self, ctx: RunContext) -> GlobalModel:
        """The starting global model and masks (may talk to clients, e.g. a policy search)."""
        return GlobalModel(ctx.new_model().state_dict())

    def round_config(self, ctx: RunContext, gm: GlobalModel, t: int) -> dict:
        """Extra per-round config sent to the training clients."""
        return {}

    def after_round(self, ctx: RunContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        """Runs after aggregation of round t (e.g. prune/grow)."""

    def phase(self, t: int) -> str:
        return "train"
