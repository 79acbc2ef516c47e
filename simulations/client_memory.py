"""Peak memory of one client's local training round, measured alone in this process.

Run as `python -m simulations.client_memory --model cnn --shape 1,28,28 --density 0.01`;
prints one JSON line. The peak is the kernel's high-water mark (VmHWM) after it is reset
to the current RSS just before training, so imports, data and the model itself do not
count in `train_delta_mb` (nor torch's code, paged in by a throwaway step first). Beside it, the bytes of the tensors `shared.training.train_masked`
keeps for the whole round (weights, gradients, momentum, the summed-gradient buffer of the
adjusted layers) and the least a sparse client must keep at that density.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from pathlib import Path

import torch

from shared.models import build_model, prunable_blocks
from shared.pruning.params import prunable_names
from shared.pruning import compute_masks
from shared.training import train_masked

MB = 1024 * 1024
SELF = Path("/proc/self")


def _status_kb(key: str) -> int:
    for line in (SELF / "status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    (SELF / "clear_refs").write_text("5")


def random_batches(shape: tuple[int, ...], batch_size: int, count: int, seed: int):
    """`count` batches generated one at a time, so the data never sits in memory as a whole."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn((batch_size, *shape), generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def measure(model_name: str, shape: tuple[int, ...], density: float, batch_size: int, num_batches: int, alpha: float) -> dict:
    torch.set_num_threads(1)
    model = build_model(model_name, 10, shape, 1.0, 0)
    names = prunable_names(model)
    masks = None
    grad_layers = None
    if density < 1.0:
        masks = compute_masks(model, density, "magnitude", "uniform", keep_dense=names[:1])
        block = [n for n in prunable_blocks(model)[-1] if n in masks]
        grad_layers = {n: math.ceil(alpha * int(masks[n].sum())) for n in block}
    # One throwaway step first: the first backward pages in hundreds of MB of torch's code,
    # which would otherwise count as training memory.
    warm = build_model(model_name, 10, shape, 1.0, 1)
    train_masked(warm, None, lambda e: random_batches(shape, 2, 1, e), 1, 0.05)
    del warm
    gc.collect()
    before = _status_kb("VmRSS:") / 1024
    reset_peak()
    train_masked(model, masks, lambda e: random_batches(shape, batch_size, num_batches, e), 1, 0.05, 0.9, 0.0, grad_layers)
    peak = _status_kb("VmHWM:") / 1024
    params = dict(model.named_parameters())
    weights = sum(p.numel() * p.element_size() for p in params.values())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    topk_buffer = sum(params[n].numel() * 4 for n in (grad_layers or {}))
    kept = {n: int(m.sum()) for n, m in (masks or {}).items()}
    active = sum(p.numel() if n not in kept else kept[n] for n, p in params.items())
    mask_bytes = sum(m.numel() for m in (masks or {}).values()) / 8
    k_total = sum((grad_layers or {}).values())
    return {
        "model": model_name,
        "density": density,
        "parameters": sum(p.numel() for p in params.values()),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "train_delta_mb": round(peak - before, 1),
        "tensors_mb": {
            "weights": round(weights / MB, 3),
            "grads": round(grads / MB, 3),
            "momentum": round(active * 4 / MB, 3),  # MaskedSGD: kept positions of masked layers, all of the rest
            "topk_buffer": round(topk_buffer / MB, 3),
        },
        "sparse_minimum_mb": {
            "weights": round((active * 4 + mask_bytes) / MB, 3),
            "grads": round(active * 4 / MB, 3),
            "momentum": round(active * 4 / MB, 3),
            "topk_buffer": round(k_total * 12 / MB, 3),  # (int64 index, float32 value) per kept gradient
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--shape", default="1,28,28", help="input shape C,H,W")
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.2, help="fraction of active weights regrown (k = alpha * nnz)")
    a = parser.parse_args()
    shape = tuple(int(s) for s in a.shape.split(","))
    print(json.dumps(measure(a.model, shape, a.density, a.batch_size, a.batches, a.alpha)))


if __name__ == "__main__":
    main()
