"""Training-time mechanisms of the 2024-2025 federated sparse-training methods, in plain torch.

- `powerprop`: Powerpropagation, w = sign(v)|v|^beta (SparsyFed's clients).
- `activations`: activation pruning for the weight gradient only (SparsyFed; FedMef's SAP).
- `bae`: FedMef's budget-aware extrusion, a penalty on the weights about to be pruned.
- `thompson`: FedRTS's Beta posterior per weight position and its Thompson-sampled masks.

Masks, top-k, ERK allocation, prune/grow and the cosine schedule are `shared.pruning`'s.
"""
