"""Batch-norm statistics for adaptive batch-norm selection (ABNS).

FedTiny phase 1 (H. Huang et al., "Distributed Pruning Towards Tiny Neural Networks in
Federated Learning", ICDCS 2023, https://arxiv.org/abs/2212.01977): every client recomputes
the BN running statistics of a coarse-pruned candidate on its own data, the server pools them
exactly (within- plus between-client variance, weighted by counts) and installs the pooled
statistics before the candidates are evaluated. Running statistics, not gamma/beta, are what
is exchanged: uploading BN weights (as some public code does) leaves the statistics stale.

Conventions
-----------
* ``BNStats`` maps a BN module name (``"features.1"``) to ``(mean, var, count)``: per-channel
  mean and population (biased) variance of the layer's *input* in float64, and ``count``, the
  number of values per channel (samples times spatial positions), so that pooling and the
  unbiased correction are exact.
* A model's ``running_var`` holds the **unbiased** variance ``count / (count - 1) * var``, the
  same convention torch uses when it updates running statistics, so a recalibrated model is
  indistinguishable from one whose statistics torch computed over all the data in one batch.
  ``recalibrate`` and ``load_stats`` both write this convention; ``BNStats`` is always biased.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

BNStats = dict[str, tuple[Tensor, Tensor, int]]

_FIELDS = ("mean", "var", "count")
RUNNING_VAR = "running_var"
RUNNING_BUFFERS = ("running_mean", RUNNING_VAR, "num_batches_tracked")  # torch's BN buffer names


def bn_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    """BN modules of `model` that keep running statistics, by module name."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    }


def running_stat_names(state: Mapping[str, Tensor]) -> list[str]:
    """Names of BN running-statistics buffers in a state dict."""
    return [n for n in state if n.rsplit(".", 1)[-1] in RUNNING_BUFFERS]


UPLOAD_STATS_DTYPE = torch.float16
_HALF_MAX = torch.finfo(UPLOAD_STATS_DTYPE).max


def running_stats_for_upload(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` with BN running means and variances as float16 wherever every value fits.

    Why: a client's statistics are estimates from a few local batches, their sampling error far
    above float16's 5e-4 relative precision, and the server averages them per buffer (never
    E[x^2] - E[x]^2, which would cancel); half the bytes of what is, at density 0.01, a quarter
    of an update. Out-of-range buffers stay float32 rather than becoming inf.
    """
    out = dict(state)
    for name in running_stat_names(state):
        t = state[name]
        if t.is_floating_point() and torch.isfinite(t).all() and t.abs().max() <= _HALF_MAX:
            out[name] = t.to(UPLOAD_STATS_DTYPE)
    return out


@torch.no_grad()
def restart_running_stats(model: nn.Module) -> None:
    """Make every BN layer forget its running statistics and average the batches it sees next exactly.

    Local training sees only a few batches; torch's default moving average (momentum 0.1) would
    leave most of the weight on whatever statistics the model started with. With momentum None
    the client's statistics are the plain average over its own batches, so the server needs
    no running statistics in the training download and its sample-weighted average is fresh.
    """
    for m in bn_modules(model).values():
        m.reset_running_stats()
        m.momentum = None


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel (mean, biased var, count) of a BN input (N, C, *), in float64."""
    values = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    mean = values.mean(dim=1)
    var = ((values - mean[:, None]) ** 2).mean(dim=1)
    return mean, var, values.shape[1]


def _merge(parts: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor, int]:
    """Exact pooling of (mean, biased var, count) parts (Chan et al.'s parallel variance).

    With N = sum n_i: mean = sum n_i mu_i / N and var = sum n_i (var_i + (mu_i - mean)^2) / N.
    """
    total = sum(n for _, _, n in parts)
    if total == 0:
        raise ValueError("cannot pool BN statistics with a total count of 0")
    mean = sum(n * mu for mu, _, n in parts) / total
    var = sum(n * (v + (mu - mean) ** 2) for mu, v, n in parts) / total
    return mean, var, total


def _inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _no_single_examples(inputs: Iterable[Tensor]) -> Iterator[Tensor]:
    """The input batches with each batch of one example joined to the batch before it (or after it,
    when it comes first); a lone example with nothing to join is dropped."""
    held: Tensor | None = None
    for x in inputs:
        if held is not None and (len(x) < 2 or len(held) < 2):
            held = torch.cat([held, x])
            continue
        if held is not None:
            yield held
        held = x
    if held is not None and len(held) >= 2:
        yield held


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any]) -> BNStats:
    """Reset and recompute every BN layer's statistics on `batches`; return them exactly.

    Forward passes run in train mode without gradients (as in FedTiny's ABNS), with a cumulative
    average (momentum=None). Forward pre-hooks record the exact per-channel mean and variance of
    each BN input over all samples and positions; these then replace the running statistics
    (unbiased variance, see the module docstring). Weights are untouched and each module's
    train/eval mode is restored. `batches` yields ``(x, y)`` pairs or input tensors; a batch of
    one example (a split's last, when its size leaves one over) joins the batch before it, since
    train-mode batch norm cannot normalize a single example, so the counts cover every example.
    """
    modules = bn_modules(model)
    parts: dict[str, list[tuple[Tensor, Tensor, int]]] = {name: [] for name in modules}
    modes = {m: m.training for m in model.modules()}
    momenta = {name: m.momentum for name, m in modules.items()}

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            parts[name].append(_batch_stats(args[0]))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    device = next(model.parameters()).device
    try:
        for m in modules.values():
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for x in _no_single_examples(_inputs(b) for b in batches):
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        for name, m in modules.items():
            m.momentum = momenta[name]
        for m, training in modes.items():
            m.training = training

    missing = [name for name, p in parts.items() if not p]
    if missing:
        raise ValueError(f"BN layers {missing} saw no input; pass at least one batch that reaches them")
    stats = {name: _merge(p) for name, p in parts.items()}
    load_stats(model, stats)
    return stats


def pool_stats(stats: list[BNStats]) -> BNStats:
    """Pool clients' BN statistics exactly, weighted by counts (within- plus between-client variance)."""
    if not stats:
        raise ValueError("pool_stats needs the statistics of at least one client")
    names = set(stats[0])
    for i, s in enumerate(stats[1:], start=1):
        if set(s) != names:
            raise ValueError(
                f"client {i} has BN layers {sorted(s)} but client 0 has {sorted(names)}; all must match"
            )
    return {name: _merge([s[name] for s in stats]) for name in stats[0]}


@torch.no_grad()
def load_stats(model: nn.Module, stats: Mapping[str, tuple[Tensor, Tensor, int]]) -> None:
    """Install `stats` as the BN running statistics of `model` (running_var unbiased)."""
    modules = bn_modules(model)
    if set(stats) != set(modules):
        unknown = sorted(set(stats) - set(modules))
        missing = sorted(set(modules) - set(stats))
        raise ValueError(f"BN statistics do not match the model: unknown layers {unknown}, missing {missing}")
    for name, (mean, var, count) in stats.items():
        m = modules[name]
        if mean.shape != m.running_mean.shape or var.shape != m.running_var.shape:
            raise ValueError(
                f"BN statistics for {name!r} have shape {tuple(mean.shape)}, "
                f"the layer has {tuple(m.running_mean.shape)}"
            )
        if count < 2:
            raise ValueError(f"BN statistics for {name!r} have count {count}; at least 2 values are needed")
        m.running_mean.copy_(mean)
        m.running_var.copy_(var * (count / (count - 1)))


def bn_stats_to_tensors(stats: BNStats) -> dict[str, Tensor]:
    """Flatten to ``{"<layer>.mean", "<layer>.var", "<layer>.count"}`` tensors for the codec.

    Mean and variance travel as float32 (half the bytes; the running statistics they become
    are float32 anyway); pooling upcasts them to float64 again and stays exact in the counts.
    """
    out: dict[str, Tensor] = {}
    for name, (mean, var, count) in stats.items():
        out[f"{name}.mean"] = mean.to(torch.float32)
        out[f"{name}.var"] = var.to(torch.float32)
        out[f"{name}.count"] = torch.tensor([count], dtype=torch.int64)
    return out


def bn_stats_layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What `bn_stats_to_tensors` makes of `model`'s statistics, as name -> (shape, dtype): the
    layout a receiver passes to `codec.decode(expected=...)` so a BN blob decodes only to that."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, m in bn_modules(model).items():
        channels = tuple(m.running_mean.shape)
        out[f"{name}.mean"], out[f"{name}.var"] = (channels, torch.float32), (channels, torch.float32)
        out[f"{name}.count"] = ((1,), torch.int64)
    return out


def bn_stats_from_tensors(tensors: Mapping[str, Tensor]) -> BNStats:
    """Inverse of `bn_stats_to_tensors`; a layer lacking any of mean/var/count raises ValueError."""
    fields: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        if not name or field not in _FIELDS:
            raise ValueError(f"BN statistics key {key!r} must end in .mean, .var or .count")
        fields.setdefault(name, {})[field] = value
    stats: BNStats = {}
    for name, f in fields.items():
        if set(f) != set(_FIELDS):
            raise ValueError(f"BN statistics for {name!r} lack {sorted(set(_FIELDS) - set(f))}")
        if f["count"].numel() != 1:
            raise ValueError(f"BN statistics count for {name!r} must hold one value, got {f['count'].numel()}")
        stats[name] = (f["mean"].to(torch.float64), f["var"].to(torch.float64), int(f["count"].item()))
    return stats
