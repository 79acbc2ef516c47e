"""The global sparse model and what each node already knows of its masks.

The mask of a layer is sent to a node only when it changed since that node last
received it; otherwise only the values of active weights travel.
"""

from __future__ import annotations

import torch

from shared import codec
from shared.batchnorm import UPLOAD_STATS_DTYPE, running_stat_names
from shared.pruning import density

Tensors = dict[str, torch.Tensor]


class GlobalModel:
    def __init__(self, state: Tensors, masks: Tensors | None = None) -> None:
        self.state = {k: v.detach().clone() for k, v in state.items()}
        self.masks: Tensors = {}
        self.version = 0
        self.layer_version: dict[str, int] = {}
        self.node_version: dict[int, int] = {}
        self._dense_bytes = len(codec.encode(self.state, compress=False))
        self._running = set(running_stat_names(self.state))
        if masks:
            self.set_masks(masks)

    def set_masks(self, masks: Tensors) -> list[str]:
        """Install new masks (pruned weights zeroed); returns the names whose mask changed."""
        changed = [n for n, m in masks.items() if n not in self.masks or not torch.equal(m, self.masks[n])]
        changed += [n for n in self.masks if n not in masks]
        if changed:
            self.version += 1
            for name in changed:
                self.layer_version[name] = self.version
        self.masks = {n: m.clone() for n, m in masks.items()}
        for name, mask in self.masks.items():
            self.state[name] = self.state[name] * mask
        return changed

    @property
    def density(self) -> float:
        return density(self.masks) if self.masks else 1.0

    def upload_dtypes(self, name: str) -> tuple[torch.dtype, ...]:
        """Dtypes a client may send `name` in: its own, or float16 for BN running statistics
        (`shared.batchnorm.running_stats_for_upload`)."""
        own = self.state[name].dtype
        return (own, UPLOAD_STATS_DTYPE) if name in self._running and own.is_floating_point else (own,)

    def payload_for(self, node_id: int | None, running_stats: bool = True) -> bytes:
        """Values of active weights, plus the masks this node does not have yet.

        Training does not need BN running statistics (clients restart them, see
        `shared.batchnorm.restart_running_stats`), so `running_stats=False` leaves them out.
        """
        known = self.node_version.get(node_id) if node_id is not None else None
        if known is None:
            send = True
        else:
            send = [n for n in self.masks if self.layer_version.get(n, 0) > known]
        state = self.state if running_stats else {n: v for n, v in self.state.items() if n not in self._running}
        return codec.encode(state, self.masks or None, send_masks=send)

    def delivered(self, node_id: int) -> None:
        """The node replied successfully, so it holds the current masks."""
        self.node_version[node_id] = self.version

    def forget(self, node_id: int) -> None:
        self.node_version.pop(node_id, None)

    def max_update_bytes(self) -> int:
        """Largest update payload accepted: a dense model with every mask, plus header slack."""
        return 2 * self.dense_bytes() + 65536

    def dense_bytes(self) -> int:
        """What dense float32 FedAvg sends for this model, each way, per client (uncompressed)."""
        return self._dense_bytes
