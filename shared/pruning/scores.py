"""Importance scores for pruning: higher = more important.

Every score is ``fn(model, names, batches=None, seed=0) -> dict[str, Tensor]`` with one float
tensor per named weight, shaped like it. Scores never change the model: weights, buffers
(batch-norm running statistics), training mode and ``.grad`` are all left as they were.
Data-driven scores (``snip``, ``grad``, ``grasp``) can be computed by each client on its own data and
averaged by the server with :func:`average_scores`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.registry import Registry

Batches = Sequence[tuple[Tensor, Tensor]]
Scores = dict[str, Tensor]
ScoreFn = Callable[..., Scores]

SCORES: Registry[ScoreFn] = Registry("score", allow_import=True)


def _parameters(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown}; the model has e.g. {list(params)[:5]}")
    return [params[n] for n in names]


@contextmanager
def _untouched(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Restore buffers, training mode and requires_grad after the block."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    requires = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for m, mode in modes.items():
            m.train(mode)
        for p, r in zip(params, requires):
            p.requires_grad_(r)


def accumulate_gradients(
    model: nn.Module, names: Sequence[str], batches: Iterable[tuple[Tensor, Tensor]], square: bool = False
) -> tuple[list[Tensor], int]:
    """The cross-entropy gradients of `names`, one per batch, summed (their squares if `square`),
    and the number of batches summed. Train mode; buffers, modes and requires_grad are restored.
    Single-example batches are skipped: batch norm cannot train on them."""
    params = _parameters(model, names)
    device = params[0].device if params else torch.device("cpu")
    total = [torch.zeros_like(p) for p in params]
    count = 0
    with _untouched(model, params):
        model.train()
        for inputs, labels in batches:
            if len(labels) < 2:
                continue
            loss = F.cross_entropy(model(inputs.to(device)), labels.to(device))
            for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g.detach() ** 2 if square else g.detach())
            count += 1
    return total, count


def _summed_loss_grads(model: nn.Module, names: Sequence[str], batches: Batches | None, score: str) -> list[Tensor]:
    """Gradients of the cross-entropy, summed over `batches` (train mode, nothing left behind)."""
    if not batches:
        raise ValueError(f"score {score!r} is data-driven: pass batches=[(inputs, labels), ...]")
    return accumulate_gradients(model, names, batches)[0]


@SCORES.register("magnitude")
def magnitude(model: nn.Module, names: list[str], batches: Batches | None = None, seed: int = 0) -> Scores:
    """|w|: magnitude pruning (Han et al., "Learning both Weights and Connections", arXiv 1506.02626)."""
    return {n: p.detach().abs().clone() for n, p in zip(names, _parameters(model, names))}


@SCORES.register("random")
def random(model: nn.Module, names: list[str], batches: Batches | None = None, seed: int = 0) -> Scores:
    """Uniform noise from a generator seeded with `seed`: random pruning, a baseline."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g).to(p.device) for n, p in zip(names, _parameters(model, names))}


@SCORES.register("snip")
def snip(model: nn.Module, names: list[str], batches: Batches | None = None, seed: int = 0) -> Scores:
    """|w * dL/dw|, with dL/dw the cross-entropy gradient summed over `batches`.

    SNIP: Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
    arXiv 1810.02340. Computed in train mode (batch statistics), as the reference code does.
    """
    grads = _summed_loss_grads(model, names, batches, "snip")
    return {n: (p.detach() * g).abs() for n, p, g in zip(names, _parameters(model, names), grads)}


@SCORES.register("grad")
def grad(model: nn.Module, names: list[str], batches: Batches | None = None, seed: int = 0) -> Scores:
    """|dL/dw|, the cross-entropy gradient summed over `batches`: the growth criterion of RigL
    (Evci et al., "Rigging the Lottery: Making All Tickets Winners", arXiv 1911.11134)."""
    grads = _summed_loss_grads(model, names, batches, "grad")
    return {n: g.abs() for n, g in zip(names, grads)}


GRASP_TEMPERATURE = 200.0  # the authors' default T: logits are divided by T in both passes


@SCORES.register("grasp")
def grasp(
    model: nn.Module,
    names: list[str],
    batches: Batches | None = None,
    seed: int = 0,
    *,
    temperature: float = GRASP_TEMPERATURE,
) -> Scores:
    """θ ⊙ Hg: the gradient flow lost by removing each weight, with L the cross-entropy of
    logits / `temperature` summed over `batches`, g = dL/dθ and H = d²L/dθ² (θ: the named weights).

    GraSP: Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving Gradient
    Flow", ICLR 2020, arXiv 2002.07376. As the reference code (github.com/alecwangcq/GraSP,
    ``pruner/GraSP.py``): a first pass sums g over the batches without keeping the graph; a second
    pass takes, batch by batch, z_b = sum(g.detach() * dL_b/dθ) with the graph kept and adds up
    dz_b/dθ, so Hg = sum_b H_b g; both passes in train mode (batch statistics), logits divided by
    T = 200.

    Sign: with f(θ) = ½ gᵀg, df/dθ = Hg, so setting θ_q to zero changes f by about -θ_q (Hg)_q.
    The authors score S = -θ ⊙ Hg and remove the weights with the *highest* S, i.e. they keep
    those whose removal would shrink the gradient norm most. Here higher = kept, so the score is
    -S = θ ⊙ Hg and ``keep_top`` keeps exactly what GraSP keeps. Scores are signed: an allocation
    that reads them as magnitudes (LAMP treats negative scores as already pruned) does not fit.

    Not done: the authors' normalisation by |sum(S)| (a positive constant, so rankings are the
    same; raw scores let the server average clients as for ``snip``) and their re-initialisation
    of linear layers (scores never change the model). One-example batches are skipped, as by
    ``snip`` (train-mode batch norm cannot normalize them). `seed` is unused: nothing random is drawn.
    """
    if not batches:
        raise ValueError("score 'grasp' is data-driven: pass batches=[(inputs, labels), ...]")
    params = _parameters(model, names)
    device = params[0].device if params else torch.device("cpu")
    usable = [(x.to(device), y.to(device)) for x, y in batches if len(y) >= 2]
    g = [torch.zeros_like(p) for p in params]
    hg = [torch.zeros_like(p) for p in params]
    with _untouched(model, params):
        model.train()
        for inputs, labels in usable:  # first pass: g, no graph kept
            loss = F.cross_entropy(model(inputs) / temperature, labels)
            for acc, d in zip(g, torch.autograd.grad(loss, params, allow_unused=True)):
                if d is not None:
                    acc.add_(d.detach())
        for inputs, labels in usable:  # second pass: Hg = sum_b d(g . dL_b/dθ)/dθ
            loss = F.cross_entropy(model(inputs) / temperature, labels)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            z = sum((gi * d).sum() for gi, d in zip(g, grads) if d is not None)
            if not (isinstance(z, Tensor) and z.requires_grad):
                continue  # z does not depend on θ (e.g. no named weight reaches the loss): Hg adds 0
            for acc, h in zip(hg, torch.autograd.grad(z, params, allow_unused=True)):
                if h is not None:
                    acc.add_(h.detach())
    return {n: p.detach() * h for n, p, h in zip(names, params, hg)}


def input_shape(model: nn.Module, batches: Batches | None) -> tuple[int, ...]:
    """Shape of one input (without batch dimension): from `batches`, else `model.input_shape`."""
    if batches:
        return tuple(batches[0][0].shape[1:])
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(
            "synflow needs the input shape: pass batches or give the model an `input_shape` attribute (C, H, W)"
        )
    return tuple(int(s) for s in shape)


def linearize(model: nn.Module) -> nn.Module:
    """SynFlow's linearized copy of `model`: double precision, eval mode, |x| for every float
    tensor of the state (weights, biases, BN parameters and running statistics)."""
    linear = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in linear.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    for p in linear.parameters():
        p.requires_grad_(True)
    return linear


def synaptic_flow(linear: nn.Module, names: Sequence[str], shape: Sequence[int]) -> Scores:
    """|θ * dR/dθ| with R the sum of the outputs of the linearized net on an all-ones input."""
    wanted = _parameters(linear, names)
    device = wanted[0].device if wanted else torch.device("cpu")
    flow = linear(torch.ones((1, *shape), dtype=torch.float64, device=device)).sum()
    grads = torch.autograd.grad(flow, wanted, allow_unused=True)
    return {
        n: (p.detach() * g).abs() if g is not None else torch.zeros_like(p.detach())
        for n, p, g in zip(names, wanted, grads)
    }


@SCORES.register("synflow")
def synflow(model: nn.Module, names: list[str], batches: Batches | None = None, seed: int = 0) -> Scores:
    """One-shot SynFlow score |θ * dR/dθ| with R = sum(f(1; |θ|)), data-free.

    Tanaka et al., "Pruning neural networks without any data by iteratively conserving synaptic
    flow", arXiv 2006.05467. As in the paper's code, every float tensor of the state (weights,
    biases, BN parameters and statistics) is replaced by its absolute value, BN runs in eval mode
    and everything is in double precision (to avoid overflow); the input is all ones. Work is
    done on a copy, so the model is untouched; scores stay float64. The iterative schedule
    (100 rounds of re-scoring the masked model) lives in :func:`shared.pruning.compute_masks`.
    Data is used only for its input shape.
    """
    _parameters(model, names)
    return synaptic_flow(linearize(model), names, input_shape(model, batches))


def average_scores(scores: Sequence[Scores], weights: Sequence[float] | None = None) -> Scores:
    """Weighted mean of per-client scores (e.g. weighted by sample count), key by key."""
    if not scores:
        raise ValueError("average_scores needs at least one score dict")
    keys = list(scores[0])
    for s in scores[1:]:
        if set(s) != set(keys):
            raise ValueError(f"score dicts have different keys: {sorted(keys)} vs {sorted(s)}")
    w = [1.0] * len(scores) if weights is None else [float(x) for x in weights]
    if len(w) != len(scores):
        raise ValueError(f"got {len(w)} weights for {len(scores)} score dicts")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be nonnegative with a positive sum, got {w}")
    total = sum(w)
    out = {}
    for k in keys:
        acc = sum(x * s[k].double() for x, s in zip(w, scores))
        out[k] = (acc / total).to(scores[0][k].dtype)
    return out


# Scores computed from data: in federated pruning, clients compute them locally and the server averages them.
DATA_SCORES = frozenset({"snip", "grad", "grasp"})


def needs_data(score: str, trusted: Sequence[str] = ()) -> bool:
    """Whether `score` is computed from data: a data score above, or a user's `package.module:fn`
    whose function sets `needs_data = True`."""
    return score in DATA_SCORES or bool(getattr(SCORES.get(score, trusted), "needs_data", False))
