"""GraSP: prune once at initialization, keeping the weights that preserve gradient flow; then masked FedAvg.

Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving Gradient Flow",
ICLR 2020, https://arxiv.org/abs/2002.07376 (a baseline of FedTiny's authors). Federated as SNIP
is (`shared/methods/snip.py`): `grasp.clients` sampled clients compute the score
(`shared.pruning.scores.grasp`, Hessian-gradient products on `grasp.batches` local batches), the
server averages them by sample count and keeps the top `pruning.density` globally.
"""

from __future__ import annotations

from shared.methods.registry import register
from shared.methods.snip import Snip


@register("grasp")
class GraSP(Snip):
    section = "grasp"
    score = "grasp"
