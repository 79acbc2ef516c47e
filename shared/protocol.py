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
TOPK = "topk"  # codec sparse: top-k gradients of pruned positions (FedTiny)
MASK_CHANGES = "mask-changes"  # codec sparse: flipped mask positions and their values (FedDST)
TOPK_INDEX = "topk-index"  # codec: per layer, int32 flat indices of the top-k gradients of pruned positions (FedRTS)
SQ_GRADS = "sq-grads"  # codec: per-batch mean squared gradients of every prunable weight (PruneFL)
SCORE_TENSORS = "scores"  # codec: dense local importance scores (query.scores)
CANDIDATE_BASE = "candidate-base"  # codec: the warm-up state on the union of the candidates' masks
CANDIDATE_MASKS = "candidates"  # list of codec payloads, each candidate's mask within the union
BN_STATS = "bn"  # list of codec payloads of BN statistics, one per candidate

# Metric keys
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
ACCURACY = "accuracy"
LOSS_SUMS = "loss-sums"
PARTITION = "partition-id"
HOLDOUT_EXAMPLES = "holdout-examples"  # query.hello: the held-out split's size (num-examples: the training split's)

# Config keys: every message
ACTING_PARTITION = "partition"  # simulation.virtual_partitions: the partition a virtual client holds
SEED = "seed"  # seed of the client's local work (shuffling, random scores)
# train
ROUND = "round"
EPOCHS = "epochs"
LR = "lr"  # this round's client learning rate
FAIL = "fail"  # fault drill: how this client must fail (simulation.fail_mode)
ADJUST_NAMES = "adjust-names"  # FedTiny: the adjusted block's layers ...
ADJUST_K = "adjust-k"  # ... and k_l, the top-k gradients each uploads
DST_FRACTION = "dst-fraction"  # FedDST: readjust this fraction of each sparse layer ...
DST_BATCHES = "dst-batches"  # ... with growth gradients from this many local batches
SEND_SQ_GRADS = "sq-grads"  # PruneFL: also send squared gradients
PRUNE_LAYERS = "prune-layers"  # SparsyFed: the weights a client reparameterises and prunes by global magnitude ...
DENSE_LAYERS = "dense-layers"  # ... of which these stay dense
BAE_NAMES = "bae-names"  # FedMef: the layers whose weights about to be pruned are extruded ...
BAE_K = "bae-k"  # ... and how many of each (the count the next adjustment prunes)
# query.scores
SCORE = "score"  # a shared.pruning.scores name
BATCHES = "batches"  # local batches to score on
