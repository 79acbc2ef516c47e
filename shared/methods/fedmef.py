"""FedMef: budget-aware extrusion before each server prune/grow; optional activation pruning.

Huang, Zhuang, Chen and Lyu, "FedMef: Towards Memory-efficient Federated Dynamic Pruning", CVPR
2024, https://arxiv.org/abs/2403.14737 (reference code FedPruning/FedPruning `experiments/fedmef`,
read as in BASELINES-2024.md section 3). Here:
- start: a random mask at `pruning.density` with ERK layer densities (the reference prunes the
  random initial weights by magnitude, in effect a random mask per layer);
- clients train masked (pruned weights exactly 0, no optimizer state for them);
- budget-aware extrusion (BaE), every round up to the last adjustment: clients add
  `fedmef.bae_weight` x sum_l ||w_l[P_l]||^2 (squared) to their loss, P_l the k_l active weights of
  smallest |w| in the received model and k_l the count the next adjustment prunes
  (`shared.sparse_training.bae`). The paper's exact loss is UNCERTAIN (not readable here); this
  is the reading closest to its idea, "regularise the parameters that will be pruned towards 0".
  The reference penalises the smallest entries among ALL positions (so almost only already-pruned
  zeros: a no-op), with an unsquared norm and an unused coefficient, at a fraction 2.5x the prune
  count, also after T_end; none of that is copied, nor its learning-rate rule (a clamp to `max_lr`).
  The default weight 0.01 is that unused coefficient's; with the squared norm it hardly changes
  which weights the next adjustment prunes (1.0 clearly does), so choose it on held-out data;
- every `fedmef.interval` rounds up to T_end = `fedmef.end_fraction` x rounds (round t with
  t % interval == 0), the clients also send the top-k_l gradients (summed over their last local
  epoch) of every sparse layer's pruned positions as (index, value) pairs, k_l = ceil(alpha_t x
  nnz_l), alpha_t = `fedmef.alpha`/2 x (1 + cos(pi t / T_end)) (the reference floors k_l, uploads
  dense one-batch gradients of every parameter, and indexes its top-k filter wrongly, keeping 12
  of 475 intended positions); the
  server merges them as FedTiny does, prunes the k_l smallest active weights and grows the k_l
  largest merged gradients at zero (the reference keeps the grown positions' leaked values);
- scaled activation pruning (SAP), off by default as in the reference (`fedmef.sap`): every conv
  and linear layer keeps the top 1 - `fedmef.sap_gamma` of its input |x| for its weight gradient
  (`shared.sparse_training.activations`). The paper's rescaling (NSConv) is UNCERTAIN and absent
  from the reference too; it is not provided.
Client config keys: ``bae-names`` and ``bae-k`` (BaE), ``adjust-names`` and ``adjust-k`` (top-k
gradients, as FedTiny's); the top-k gradients travel under payload ``topk``.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from shared import protocol as p
from shared.global_model import GlobalModel
from shared.methods.api import Method, MethodContext, Reply, TrainJob
from shared.methods.registry import register
from shared.methods.topk_gradients import TopkGradientClient, accept_topk
from shared.pruning.params import prunable_names
from shared.pruning.prune_grow import grow_from_client_topk
from shared.pruning.schedule import adjust_counts, cosine_fraction, is_adjust_round
from shared.sparse_training.activations import prune_activations
from shared.sparse_training.bae import extrude, penalty_masks
from shared.training import TrainResult

STACK = "fedmef-stack"  # TrainJob.scratch: BaE's gradient hooks and SAP, undone after training


@dataclass
class FedMefSettings:
    interval: int = 10  # dT: rounds between adjustments
    end_fraction: float = 0.6  # T_end = end_fraction x rounds (the reference's 300 of 500)
    alpha: float = 0.2  # initial prune/grow fraction, cosine-decayed
    bae_weight: float = 0.01  # lambda of BaE's squared-L2 penalty (0: off); the reference's lambda_l2 default
    sap: bool = False  # scaled activation pruning of the weight-gradient inputs
    sap_gamma: float = 0.5  # SAP's pruned fraction of each layer's input

    def validate(self, c, check) -> None:
        check(self.interval >= 1, "fedmef.interval", "must be >= 1")
        check(0.0 <= self.end_fraction <= 1.0, "fedmef.end_fraction", "must be in [0, 1]")
        check(0.0 <= self.alpha <= 1.0, "fedmef.alpha", "must be in [0, 1]")
        check(self.bae_weight >= 0.0, "fedmef.bae_weight", "must be >= 0 (0 turns BaE off)")
        check(0.0 <= self.sap_gamma < 1.0, "fedmef.sap_gamma", "must be in [0, 1)")


class FedMefClient(TopkGradientClient):
    """BaE's gradient on the weights about to be pruned, optional SAP, and FedTiny's top-k gradients."""

    def before_training(self, job: TrainJob) -> None:
        s = job.runtime.config.sections["fedmef"]
        stack = ExitStack()
        if p.BAE_NAMES in job.config:
            counts = dict(zip(job.config[p.BAE_NAMES], (int(k) for k in job.config[p.BAE_K]), strict=True))
            params = dict(job.model.named_parameters())
            penalised = penalty_masks({n: params[n] for n in counts}, job.masks, counts)
            stack.enter_context(extrude(job.model, penalised, s.bae_weight))
        if s.sap:
            keep = {n.rpartition(".")[0]: 1.0 - s.sap_gamma for n in prunable_names(job.model)}
            stack.enter_context(prune_activations(job.model, keep))
        job.scratch[STACK] = stack

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        job.scratch.pop(STACK).close()
        return super().after_training(job, result)


def sparse_layers(masks: dict[str, torch.Tensor]) -> list[str]:
    """Layers with pruned positions (a layer ERK keeps whole cannot prune or grow)."""
    return [n for n, m in masks.items() if not bool(m.all())]


def nonzero_counts(masks: dict[str, torch.Tensor], fraction: float) -> dict[str, int]:
    """k_l = ceil(fraction x nnz_l) of every sparse layer, layers with k_l = 0 left out."""
    return {n: k for n, k in adjust_counts(masks, sparse_layers(masks), fraction).items() if k > 0}


@register("fedmef")
class FedMef(Method):
    Settings = FedMefSettings
    client = FedMefClient()

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.t_end = math.floor(self.settings.end_fraction * ctx.config.fl.rounds)
        self.pending: dict[str, int] = {}  # this round's prune/grow counts (adjustment rounds)
        self.summary["changed"] = []  # weights grown (as many pruned) at each adjustment

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        return self.pruned_at_start(ctx, "random", "erk")

    def round_config(self, ctx: MethodContext, gm: GlobalModel, t: int) -> dict:
        self.pending = {}
        s = self.settings
        if not gm.masks or self.t_end < 1:
            return {}
        out = {}
        next_adjustment = s.interval * math.ceil(t / s.interval)
        if s.bae_weight > 0 and next_adjustment <= self.t_end:
            bae = nonzero_counts(gm.masks, cosine_fraction(s.alpha, next_adjustment, self.t_end))
            out = {p.BAE_NAMES: list(bae), p.BAE_K: list(bae.values())} if bae else {}
        if is_adjust_round(t, s.interval, self.t_end):
            self.pending = nonzero_counts(gm.masks, cosine_fraction(s.alpha, t, self.t_end))
            if self.pending:
                out.update({p.ADJUST_NAMES: list(self.pending), p.ADJUST_K: list(self.pending.values())})
        return out

    def check_reply(self, ctx: MethodContext, gm: GlobalModel, reply: Reply) -> str | None:
        """In adjustment rounds, the client's top-k gradients of every adjusted layer (`accept_topk`)."""
        return accept_topk(reply, gm, self.pending)

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        """Prune the k_l smallest active weights and grow the k_l largest merged client gradients (at 0)."""
        if not self.pending or not replies:
            return
        parts = {n: [r.extras[p.TOPK][n][:2] for r in replies] for n in self.pending}
        masks, weights = grow_from_client_topk(gm.state, gm.masks, parts, self.pending)
        self.summary["changed"].append(sum(int((masks[n] & ~gm.masks[n]).sum()) for n in self.pending))
        gm.state.update(weights)
        gm.set_masks({**gm.masks, **masks})

    def phase(self, t: int) -> str:
        return "adjust" if self.pending else "train"
