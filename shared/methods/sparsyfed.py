"""SparsyFed: Powerpropagation and activation pruning on clients, client-side global magnitude pruning.

Guastella et al., "SparsyFed: Sparse Adaptive Federated Training", ICLR 2025,
https://arxiv.org/abs/2504.05153 (reference code relogu/fl_powerpropagation, read as in
BASELINES-2024.md section 2). The global model starts dense. Each round every client:
- trains the Powerpropagation reparameterisation w = sign(v)|v|^beta of every conv and linear
  weight (`sparsyfed.beta`; 1 is plain training), without a mask: with beta > 1 a weight at 0 gets
  gradient 0 and stays 0 (`shared.sparse_training.powerprop`);
- prunes the input of each of those layers, for its weight gradient only, to the layer's weight
  density as received (`sparsyfed.activation_pruning`; round 1's dense model prunes nothing;
  `shared.sparse_training.activations`, which keeps the exact count per batch where the reference
  reuses a conv threshold learned on the round's first batch);
- after training, prunes its weights to `pruning.density` by global magnitude over the same layers
  (`pruning.keep_first_dense` keeps the first layer whole, counted in the density) and uploads the
  kept values on its own mask, sent as packed bits or delta-coded indices: never a dense array
  (the reference sends dense arrays).
The server averages the clients' zero-filled models at every position, as FedAvg does in the
reference, with the run's `fl.aggregator` (with the default trimmed mean, a weight that fewer clients
keep than are trimmed at each end counts as 0, where the reference's mean shrinks it), and then prunes that aggregate to exactly `pruning.density` by
global magnitude (`aggregate_density` in the summary records the aggregate's density first). The
reference does not prune on the server: there the union of the clients' supports is the global
support, whose density exceeds the target and then only falls; here the global model is at the
target density after every round, as for every other method. Consequence of that choice with
beta > 1: from round 2 on no client can regrow a weight, so the mask chosen after round 1 (the top
of the average of the clients' own top sets) stays; with beta = 1 clients regrow and the mask moves
every round. The hyperparameter-free spectral variant (beta < 0 in the reference) is not provided:
as written there it loses the weights' signs.
Client config keys: ``prune-layers`` and ``dense-layers``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from shared import protocol as p
from shared.aggregate import combine
from shared.global_model import GlobalModel
from shared.methods.api import ClientHalf, Method, MethodContext, Reply, TrainJob
from shared.methods.registry import register
from shared.pruning import apply_masks, masks_from_scores
from shared.pruning.allocation import budget
from shared.sparse_training.activations import prune_activations
from shared.sparse_training.powerprop import powerpropagate
from shared.training import TrainResult

Tensors = dict[str, torch.Tensor]
STACK = "sparsyfed-stack"  # TrainJob.scratch: the reparameterisation and activation pruning, undone after training


@dataclass
class SparsyFedSettings:
    beta: float = 1.25  # Powerpropagation exponent (the authors' CIFAR runs; 1: plain training)
    activation_pruning: bool = True  # prune each layer's input for its weight gradient to the layer's density

    def validate(self, c, check) -> None:
        check(1.0 <= self.beta <= 8.0, "sparsyfed.beta", "must be in [1, 8] (1: plain layers)")


def global_magnitude_masks(weights: Tensors, density: float, dense: list[str]) -> Tensors:
    """Masks keeping round(density x total) weights: the `dense` layers whole, the rest by one |w| threshold."""
    return masks_from_scores({n: w.detach().abs() for n, w in weights.items()}, density, "global", keep_dense=dense)


def layer_keep(weights: Tensors) -> dict[str, float]:
    """Module name -> fraction of nonzero weights: the activation keep fraction SparsyFed uses."""
    return {n.rpartition(".")[0]: float((w != 0).float().mean()) for n, w in weights.items()}


class SparsyFedClient(ClientHalf):
    """Dense, reparameterised training with pruned weight-gradient inputs; prune to the density before upload."""

    def before_training(self, job: TrainJob) -> None:
        if p.PRUNE_LAYERS not in job.config:  # density 1: dense FedAvg
            return
        s = job.runtime.config.sections["sparsyfed"]
        names = list(job.config[p.PRUNE_LAYERS])
        params = dict(job.model.named_parameters())
        keep = layer_keep({n: params[n] for n in names}) if s.activation_pruning else {}
        job.local_masks = {}  # no mask: pruned weights are held at zero by the reparameterisation
        stack = ExitStack()
        stack.enter_context(powerpropagate(job.model, names, s.beta))
        stack.enter_context(prune_activations(job.model, keep))
        job.scratch[STACK] = stack

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        if STACK not in job.scratch:
            return {}
        job.scratch.pop(STACK).close()
        params = dict(job.model.named_parameters())
        names = list(job.config[p.PRUNE_LAYERS])
        masks = global_magnitude_masks({n: params[n] for n in names}, job.runtime.config.pruning.density,
                                       list(job.config[p.DENSE_LAYERS]))
        apply_masks(job.model, masks)
        job.upload_masks = masks
        return {}


@register("sparsyfed")
class SparsyFed(Method):
    Settings = SparsyFedSettings
    client = SparsyFedClient()

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        model = ctx.new_model()
        self.dense = ctx.dense_layers(model)
        self.names = self.dense + ctx.prunable(model)
        shapes = dict(model.named_parameters())
        self.kept = budget({n: shapes[n] for n in self.names}, ctx.config.pruning.density, self.dense)[0]
        self.summary["aggregate_density"] = []

    def round_config(self, ctx: MethodContext, gm: GlobalModel, t: int) -> dict:
        if ctx.config.pruning.density >= 1.0:
            return {}
        return {p.PRUNE_LAYERS: self.names, p.DENSE_LAYERS: self.dense}

    def check_update_masks(self, gm: GlobalModel, masks: Tensors) -> str | None:
        if self.ctx.config.pruning.density >= 1.0:
            return super().check_update_masks(gm, masks)
        return check_client_masks(masks, self.names, self.dense, self.kept)

    def aggregate(self, ctx: MethodContext, gm: GlobalModel, replies: list[Reply]) -> Tensors:
        """Every position averaged over all clients, zeros included (FedAvg of the zero-filled models):
        a weight a client regrew (beta = 1) counts even where the global mask had pruned it."""
        f = ctx.config.fl
        return combine([r.decoded for r in replies], ctx.weights(replies), None, f.aggregator, f.trim_fraction,
                       ctx.config.trusted)

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        """Prune the aggregate to exactly the target density by global magnitude."""
        if ctx.config.pruning.density >= 1.0:
            return
        weights = {n: gm.state[n] for n in self.names}
        nonzero = sum(int((w != 0).sum()) for w in weights.values())
        self.summary["aggregate_density"].append(nonzero / sum(w.numel() for w in weights.values()))
        gm.set_masks(global_magnitude_masks(weights, ctx.config.pruning.density, self.dense))


def check_client_masks(masks: Tensors, names: list[str], dense: list[str], kept: int) -> str | None:
    """Why a client's own masks are not a pruning of every prunable layer to the target count, or None."""
    if set(masks) != set(names):
        return f"masks of {sorted(set(masks) ^ set(names))[:3]} do not match the prunable layers"
    for n in dense:
        if not bool(masks[n].all()):
            return f"{n} must stay dense"
    total = sum(int(m.sum()) for m in masks.values())
    if total != kept:
        return f"masks keep {total} weights, the target density keeps {kept}"
    return None
