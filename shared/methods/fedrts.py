"""FedRTS: the mask as a combinatorial bandit, adjusted by Thompson sampling of Beta posteriors.

Huang, Yang, Chen, Ye and Wu, "FedRTS: Federated Robust Pruning via Combinatorial Thompson
Sampling", NeurIPS 2025, https://arxiv.org/abs/2501.19122 (the linked code is not available; the
FedPruning/FedPruning `api/distributed/fedrts` version of 2025-11, read as in BASELINES-2024.md
section 4, is the reference). Here:
- start: a random mask at `pruning.density` with ERK layer densities, as FedMef's;
- clients train masked (pruned weights exactly 0) and upload their weights on the global mask;
- the server keeps Beta(alpha, beta) per position of every prunable layer, both starting at 1
  (`shared.sparse_training.thompson`). After aggregating round t <= T_end = `fedrts.end_fraction`
  x rounds it updates the active positions: reward (1 - gamma) G + gamma sum_i p_i C_i, G and C_i
  membership in the top-kappa |w| among active positions of the aggregate and of client i's
  upload, kappa = K_l - k_l, k_l = ceil(alpha_t x K_l), alpha_t = `fedrts.alpha`/2 x (1 + cos(pi t
  / T_end)); gamma = `fedrts.gamma` weights the clients as in the reference code (its README says
  the opposite; equal at 0.5), the increments are scaled by `fedrts.c`. The reference also updates
  after T_end, with a fraction that rises again there; that is not copied;
- adjustment rounds (t % `fedrts.interval` == 0, t <= T_end): clients also send, per sparse layer,
  only the int32 flat indices of their top-k_l summed last-epoch gradients at pruned positions
  (payload ``topk-index``; the reference's client never computes them, and its sampling step never
  runs because of a key-prefix mismatch). The server updates the inactive positions with reward
  (1 - gamma) 0.5 + gamma sum_i p_i 1[position in I_i], then draws theta ~ Beta(alpha, beta) per
  position (seeded by run and round: a resumed run draws the same) and keeps the K_l largest per
  layer: the density is exact, the number of links that change is random. Grown weights start at 0.
The posteriors are saved in checkpoints (`state_dict`), so a resumed run continues exactly.
Client config keys: ``adjust-names`` and ``adjust-k`` (as FedTiny's).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np
import torch

from shared import codec, protocol as p
from shared.draws import Draw, seed_sequence
from shared.global_model import GlobalModel
from shared.methods.api import Method, MethodContext, Reply, TrainJob
from shared.methods.fedmef import nonzero_counts
from shared.methods.registry import register
from shared.methods.topk_gradients import TopkGradientClient
from shared.pruning.schedule import adjust_counts, cosine_fraction, is_adjust_round
from shared.sparse_training.thompson import active_reward, inactive_reward, observe, sample_mask
from shared.training import TrainResult

Tensors = dict[str, torch.Tensor]


@dataclass
class FedRTSSettings:
    interval: int = 10  # dT: rounds between adjustments
    end_fraction: float = 0.6  # T_end = end_fraction x rounds (the reference's 300 of 500)
    alpha: float = 0.2  # initial adjustment fraction, cosine-decayed (k_l; kappa = K_l - k_l core links)
    gamma: float = 0.5  # weight of the clients' votes against the aggregate's
    c: float = 10.0  # posterior increment per observation (the reference's initial_distribution_ratio)

    def validate(self, c, check) -> None:
        check(self.interval >= 1, "fedrts.interval", "must be >= 1")
        check(0.0 <= self.end_fraction <= 1.0, "fedrts.end_fraction", "must be in [0, 1]")
        check(0.0 <= self.alpha <= 1.0, "fedrts.alpha", "must be in [0, 1]")
        check(0.0 <= self.gamma <= 1.0, "fedrts.gamma", "must be in [0, 1]")
        check(self.c > 0.0, "fedrts.c", "must be > 0")


class FedRTSClient(TopkGradientClient):
    """FedTiny's top-k gradients of pruned positions, sent as indices only."""

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        if not result.topk:
            return {}
        return {p.TOPK_INDEX: codec.encode({n: idx.to(device="cpu", dtype=torch.int32) for n, (idx, _) in result.topk.items()})}


@register("fedrts")
class FedRTS(Method):
    Settings = FedRTSSettings
    client = FedRTSClient()

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.t_end = math.floor(self.settings.end_fraction * ctx.config.fl.rounds)
        model = ctx.new_model()
        params = dict(model.named_parameters())
        self.names = ctx.prunable(model)
        self.alpha = {n: torch.ones_like(params[n].detach()) for n in self.names}
        self.beta = {n: torch.ones_like(params[n].detach()) for n in self.names}
        self.pending: dict[str, int] = {}
        self.summary["changed"] = []  # links that changed at each adjustment

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        return self.pruned_at_start(ctx, "random", "erk")

    def round_config(self, ctx: MethodContext, gm: GlobalModel, t: int) -> dict:
        self.pending = {}
        s = self.settings
        if gm.masks and self.t_end >= 1 and is_adjust_round(t, s.interval, self.t_end):
            self.pending = nonzero_counts({n: gm.masks[n] for n in self.names}, cosine_fraction(s.alpha, t, self.t_end))
        return {p.ADJUST_NAMES: list(self.pending), p.ADJUST_K: list(self.pending.values())} if self.pending else {}

    def check_reply(self, ctx: MethodContext, gm: GlobalModel, reply: Reply) -> str | None:
        if not self.pending:
            return None
        got = check_topk_indices(reply, gm, self.pending)
        if isinstance(got, str):
            return got
        reply.extras[p.TOPK_INDEX] = got
        return None

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        if not gm.masks or t > self.t_end or not replies:
            return
        s = self.settings
        weights = ctx.weights(replies)
        shares = [w / sum(weights) for w in weights]
        kappa = {n: int(gm.masks[n].sum()) - k for n, k in adjust_counts(gm.masks, self.names, cosine_fraction(s.alpha, t, self.t_end)).items()}
        for n in self.names:
            reward = active_reward(gm.state[n], [r.decoded[n] for r in replies], shares, gm.masks[n], kappa[n], s.gamma)
            observe(self.alpha[n], self.beta[n], gm.masks[n], reward, s.c)
        if self.pending:
            self.adjust(ctx, gm, t, [(share, r.extras[p.TOPK_INDEX]) for share, r in zip(shares, replies)])

    def adjust(self, ctx: MethodContext, gm: GlobalModel, t: int, voters: list[tuple[float, Tensors]]) -> None:
        """Update the inactive positions from the clients' indices, then draw the new masks."""
        s = self.settings
        for n in self.pending:
            reward = inactive_reward([idx[n] for _, idx in voters], [share for share, _ in voters], gm.masks[n].shape, s.gamma)
            observe(self.alpha[n], self.beta[n], ~gm.masks[n], reward, s.c)
        rng = np.random.default_rng(seed_sequence(ctx.config.seed, Draw.THOMPSON, t))
        new = {n: sample_mask(self.alpha[n], self.beta[n], int(gm.masks[n].sum()), rng) for n in self.names}
        changed = sum(int((new[n] & ~gm.masks[n]).sum()) for n in self.names)
        gm.set_masks({**gm.masks, **new})  # grown weights start at the aggregate's 0; dropped ones are zeroed
        self.summary["changed"].append(changed)

    def phase(self, t: int) -> str:
        return "adjust" if self.pending else "train"

    def state_dict(self) -> dict:
        tensors = {f"alpha:{n}": a for n, a in self.alpha.items()} | {f"beta:{n}": b for n, b in self.beta.items()}
        return {**super().state_dict(), "posterior": base64.b64encode(codec.encode(tensors)).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        layout = {f"{kind}:{n}": (tuple(a.shape), torch.float32) for n, a in self.alpha.items() for kind in ("alpha", "beta")}
        tensors, _ = codec.decode(base64.b64decode(state["posterior"], validate=True), expected=layout)
        if set(tensors) != set(layout):
            raise ValueError("the checkpoint's FedRTS posterior does not cover this model's prunable layers")
        if not all(bool(torch.isfinite(v).all() and (v >= 1.0).all()) for v in tensors.values()):
            raise ValueError("the checkpoint's FedRTS posterior holds values below 1 or not finite (both start at 1 and only grow)")
        self.alpha = {n: tensors[f"alpha:{n}"] for n in self.names}
        self.beta = {n: tensors[f"beta:{n}"] for n in self.names}


def check_topk_indices(reply: Reply, gm: GlobalModel, pending: dict[str, int]) -> Tensors | str:
    """A client's top-k gradient indices per adjusted layer, or why they are unusable: each layer's at
    most k_l distinct int32 flat indices, all at pruned positions."""
    blob = reply.payload(p.TOPK_INDEX)
    if blob is None:
        return "no top-k gradient indices in an adjustment round"
    try:
        got, _ = codec.decode(blob, max_bytes=4 * sum(pending.values()) + 65536, max_elements=sum(pending.values()))
    except ValueError as exc:
        return f"undecodable top-k gradient indices ({str(exc).splitlines()[0]})"
    if set(got) != set(pending):
        return f"top-k index layers {sorted(got)[:3]} are not the adjusted layers {sorted(pending)[:3]}"
    for n, idx in got.items():
        mask = gm.masks[n].reshape(-1)
        if idx.dtype != torch.int32 or idx.ndim != 1 or len(idx) > pending[n]:
            return f"top-k indices of {n} must be at most {pending[n]} int32 values"
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= mask.numel() or len(torch.unique(idx)) != len(idx)):
            return f"top-k indices of {n} are out of range or repeated"
        if bool(mask[idx.long()].any()):
            return f"top-k indices of {n} include active positions"
    return got
