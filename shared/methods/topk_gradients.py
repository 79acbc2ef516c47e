"""Clients' top-k gradients at pruned positions, the grow signal of FedTiny's progressive pruning
(Huang et al., ICDCS 2023, arXiv 2212.01977) and of FedMef's prune/grow (Huang et al., CVPR 2024):
the client half that uploads them sparse, and the server's check of that payload.
"""

from __future__ import annotations

import torch

from shared import codec, protocol as p
from shared.global_model import GlobalModel
from shared.methods.api import ClientHalf, Reply, TrainJob
from shared.training import TrainResult


class TopkGradientClient(ClientHalf):
    """Top-k gradients of the adjusted layers' pruned positions, summed over the last local epoch
    (FedTiny's and FedMef's grow signal; the round config names the layers and their k)."""

    def grad_layers(self, job: TrainJob) -> dict[str, int] | None:
        names = list(job.config.get(p.ADJUST_NAMES, []))
        return dict(zip(names, (int(k) for k in job.config.get(p.ADJUST_K, [])), strict=True)) or None

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        if not result.topk:
            return {}
        params = dict(job.model.named_parameters())
        parts = {n: (idx, val, tuple(params[n].shape)) for n, (idx, val) in result.topk.items()}
        return {p.TOPK: codec.encode_sparse(parts)}


def check_topk(reply: Reply, gm: GlobalModel, pending: dict[str, int]) -> tuple[dict, str | None]:
    """A client's top-k gradients, or the reason they are rejected (not merged)."""
    blob = reply.payload(p.TOPK)
    if blob is None:
        return {}, "no top-k gradients for the adjusted block"
    try:
        sparse = codec.decode_sparse(blob, max_bytes=16 * sum(pending.values()) + 65536,
                                     expected={n: tuple(gm.masks[n].shape) for n in pending})
    except ValueError as exc:
        return {}, f"undecodable top-k gradients ({exc})"
    if set(sparse) != set(pending):
        return {}, f"top-k layers {sorted(sparse)} are not the adjusted block {sorted(pending)}"
    for name, (idx, val, shape) in sparse.items():
        if tuple(shape) != tuple(gm.masks[name].shape):
            return {}, f"top-k shape of {name} is {tuple(shape)}, expected {tuple(gm.masks[name].shape)}"
        if len(idx) > pending[name]:
            return {}, f"{len(idx)} top-k entries for {name}, more than k={pending[name]}"
        if gm.masks[name].flatten()[idx].any():
            return {}, f"top-k indices of {name} include active positions"
        if not torch.isfinite(val).all():
            return {}, f"non-finite top-k values in {name}"
    return sparse, None


def accept_topk(reply: Reply, gm: GlobalModel, pending: dict[str, int]) -> str | None:
    """A method's `check_reply` for rounds that adjust `pending` ({layer: k}): the reason to reject the
    reply, or None with the decoded gradients in `reply.extras[p.TOPK]`. Outside such rounds, None."""
    if not pending:
        return None
    sparse, reason = check_topk(reply, gm, pending)
    if reason is None:
        reply.extras[p.TOPK] = sparse
    return reason
