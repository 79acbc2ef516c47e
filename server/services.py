"""The server's context as a method's hooks get it: the run's state plus the services that talk to
clients, implementing `shared.methods.MethodContext` (so the methods never import `server/`)."""

from __future__ import annotations

import torch

from server import queries, rounds
from server.context import RunState
from shared.batchnorm import BNStats
from shared.draws import Draw
from shared.global_model import GlobalModel
from shared.methods.api import Method, Reply

Tensors = dict[str, torch.Tensor]


class RunContext(RunState):
    """Everything a method needs during a run (`shared.methods.MethodContext`)."""

    def training_round(self, method: Method, gm: GlobalModel, t: int, extra: dict, stream: Draw = Draw.TRAIN,
                       reference: bool = True) -> list[Reply]:
        return rounds.training_round(self, method, gm, t, extra, stream, reference)

    def client_scores(self, model: torch.nn.Module, score: str, clients: int, batches: int) -> Tensors:
        return queries.client_scores(self, model, score, clients, batches)

    def pooled_bn(self, model: torch.nn.Module, masks: list[Tensors], clients: int,
                  t: int = 0) -> tuple[list[BNStats], dict[int, int]]:
        return queries.pooled_bn(self, model, masks, clients, t)

    def candidate_losses(self, pooled: list[BNStats], examples: dict[int, int]) -> list[float]:
        return queries.candidate_losses(self, pooled, examples)

    def sample_clients(self, k: int, stream: Draw, *key: int) -> list[int]:
        return self.fleet.sample(k, self.draws(stream, *key))

    def held_out_loss(self, gm: GlobalModel, nodes: list[int]) -> float:
        return queries.held_out_loss(self, gm, nodes)
