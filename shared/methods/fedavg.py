"""Dense FedAvg, the reference for accuracy and bytes.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, https://arxiv.org/abs/1602.05629
"""

from shared.methods.api import Method
from shared.methods.registry import register


@register("fedavg")
class FedAvg(Method):
    """No masks: every client trains and sends the whole model."""
