"""Names on the wire between the ServerApp and the ClientApp (one place, no magic strings).

A message's content is a RecordDict with a ConfigRecord ``config`` (scalars), a
ConfigRecord ``payload`` (codec bytes only: nothing pickled, every byte counted)
and, in replies, a MetricRecord ``metrics``.
"""

from __future__ import annotations

# Message types
HELLO = "query.hello"
SCORES = "query.scores"
BN = "query.bn"
CANDIDATES = "query.candidates"
TRAIN = "train"
EVALUATE = "evaluate"

# Records
CONFIG = "config"
PAYLOAD = "payload"
METRICS = "metrics"

# Payload keys (bytes or lists of bytes)
MODEL = "model"  # codec: state dict, values of active weights, masks that changed
UPDATE = "update"  # codec: trained state dict, values of active weights only
TOPK = "topk"  # codec sparse: top-k gradients of pruned positions
SCORE_TENSORS = "scores"  # codec: dense local importance scores
CANDIDATE_BASE = "candidate-base"  # codec: the warm-up state on the union of the candidates' masks
CANDIDATE_MASKS = "candidates"  # list of codec payloads, each candidate's mask within the union
BN_STATS = "bn"  # list of codec payloads of BN statistics, one per candidate

# Metric keys
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
ACCURACY = "accuracy"
LOSS_SUMS = "loss-sums"
PARTITION = "partition-id"

# Config keys
ACTING_PARTITION = "partition"  # simulation.virtual_partitions: the partition a virtual client holds
