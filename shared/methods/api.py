"""What a method's code may touch: a client's reply, the server's context, a client's training job.

A method's server hooks (`shared.methods.base.Method`) reach the server only through the
`MethodContext` they are given; the server's `server.services.RunContext` implements it. Things a
hook needs that are pure live in `shared/` (`shared.global_model`, `shared.aggregate`); things that
talk to clients (a training round, querying clients for scores or losses) are services of the
context. A method's client half (`ClientHalf`) sees one `TrainJob`. So `server/` and `client/`
each find their half of a method in `shared/`, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

import torch

from shared import protocol as p
from shared.aggregate import combine
from shared.data import batches
from shared.draws import Draw
from shared.global_model import GlobalModel
from shared.partition import server_warmup_set
from shared.pruning import compute_masks
from shared.training import TrainResult, warmup

if TYPE_CHECKING:
    from shared.batchnorm import BNStats
    from shared.config import Config
    from shared.data import DataBundle
    from shared.training import EvalResult

Tensors = dict[str, torch.Tensor]


@dataclass
class Reply:
    """A client's reply as the server received it: hostile until checked.

    `decoded` is what the round's check decoded (for a training reply, the checked update), so it is
    decoded once; `extras` holds what a method's `check_reply` decoded from its own payload entries
    (e.g. FedTiny's top-k gradients), for its `aggregate` and `after_round`.
    """

    node_id: int
    content: Any  # the message's record dict (flwr.app.RecordDict): payload, metrics
    bytes_up: int
    decoded: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    weight_cap: int | None = None  # the most this node's count may weigh (`server.fleet.Fleet.weight_cap`)

    @property
    def num_examples(self) -> int:
        """The example count the client reported (checked: at most what its node holds)."""
        return int(self.content[p.METRICS][p.NUM_EXAMPLES])

    @property
    def weight(self) -> int:
        """The count as a weight (FedAvg, pooled losses and statistics, federated accuracy): the
        reported count bounded by `weight_cap`, a bound that does not come from this client alone."""
        return self.num_examples if self.weight_cap is None else min(self.num_examples, self.weight_cap)

    def payload(self, key: str) -> Any:
        """A payload entry of the reply (codec bytes), or None when it sent none."""
        return self.content[p.PAYLOAD].get(key) if p.PAYLOAD in self.content else None


class MethodContext(Protocol):
    """The server as a method's hooks see it: the run's config and data, model helpers, and the
    services that talk to clients (each checks what clients reply, so hooks get checked values)."""

    config: Config
    bundle: DataBundle  # the dataset (the server's warm-up set and the centralized ceiling use it)
    device: torch.device  # where the server's own torch work runs (`config.device`)

    def note(self, line: str) -> None:
        """A line in the run's log and metrics (`notes`)."""

    def new_model(self) -> torch.nn.Module:
        """A fresh seeded model of the run (on the host)."""

    def prunable(self, model: torch.nn.Module) -> list[str]:
        """Weights that may be pruned (the first layer left out when `pruning.keep_first_dense`)."""

    def dense_layers(self, model: torch.nn.Module) -> list[str]:
        """Prunable weights that stay dense."""

    def blocks(self, model: torch.nn.Module) -> list[list[str]]:
        """The prunable weights grouped in blocks, input side first."""

    def weights(self, replies: list[Reply]) -> list[float]:
        """The replies' sample weights (`Reply.weight`), normalised, none above `fl.max_weight_share`."""

    def evaluate_central(self, state: Tensors) -> EvalResult:
        """Loss and accuracy of a state on the central test set."""

    def training_round(self, method: Method, gm: GlobalModel, t: int, extra: dict, stream: Draw = Draw.TRAIN,
                       reference: bool = True) -> list[Reply]:
        """One round of masked training on the clients `stream` draws for round t, through `method`'s
        `check_reply` and `aggregate` (gm.state is replaced); returns the accepted replies.
        `reference=False` leaves it out of the dense FedAvg reference's bytes (a search's rounds)."""

    def client_scores(self, model: torch.nn.Module, score: str, clients: int, batches: int) -> Tensors:
        """A data-driven score (`shared.pruning.scores`) of `model`'s prunable weights, computed by
        `clients` sampled clients on `batches` local batches each, robustly averaged by sample count."""

    def pooled_bn(self, model: torch.nn.Module, masks: list[Tensors], clients: int,
                  t: int = 0) -> tuple[list[BNStats], dict[int, int]]:
        """`clients` clients drawn for round t recalibrate `model`'s BN statistics under each mask on
        their held-out splits; the exact pool per mask, and the held-out size of each client used."""

    def candidate_losses(self, pooled: list[BNStats], examples: dict[int, int]) -> list[float]:
        """The clients of `examples` (as `pooled_bn` returned them) evaluate each candidate they hold
        with its pooled statistics; each candidate's robust per-example held-out loss."""

    def sample_clients(self, k: int, stream: Draw, *key: int) -> list[int]:
        """k clients drawn from `stream` at `key` (e.g. a held-out panel)."""

    def held_out_loss(self, gm: GlobalModel, nodes: list[int]) -> float:
        """Sample-weighted loss of `gm` on the held-out splits of `nodes` (NaN when none replied)."""


class Runtime(Protocol):
    """The client process's side of a training job (`client.runtime.ClientRuntime` implements it)."""

    config: Config
    device: torch.device
    partition_id: int


@dataclass(kw_only=True)
class TrainJob:
    """One client's training round, as a method's client half sees it."""

    runtime: Runtime
    config: Mapping[str, Any]  # the round's config record (the method's keys from `round_config` included)
    model: torch.nn.Module  # the downloaded global model, trained in place
    masks: Tensors  # the global masks of the download
    local_masks: Tensors  # the masks training keeps (a client half may change them)
    batches: Callable[[int], Iterable]  # epoch -> the shuffled local batches of that epoch
    seed: int
    scratch: dict = field(default_factory=dict)  # the client half's own notes between its calls
    # The masks the update travels on, sent with it (None: the global masks, which the server holds).
    # Set by a client half whose clients prune their own model (SparsyFed); see `Method.check_update_masks`.
    upload_masks: Tensors | None = None


class ClientHalf:
    """What a client computes for a method beyond masked training; the shared train task calls,
    in order, `before_training`, `grad_layers` (during training) and `after_training`."""

    def before_training(self, job: TrainJob) -> None:
        """Runs before local training, e.g. to readjust `job.local_masks` (FedDST)."""

    def grad_layers(self, job: TrainJob) -> dict[str, int] | None:
        """Layers whose top-k gradients at pruned positions training returns (`TrainResult.topk`)."""
        return None

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        """Extra payload entries of the reply (codec bytes), beside the update."""
        return {}


class Method:
    """Server hooks with do-nothing defaults: a method overrides only what defines it.

    The round's order: `round_config` (extra keys for the round's clients); every reply through the
    shared checks (example count, update, screening) and `check_reply` (the method's payload), so a
    rejected reply is counted once and never used; `aggregate` and `after_round` over the accepted
    replies only.
    """

    name = ""  # set by `register`
    section: str | None = None  # config section of `Settings` (default: the method's name)
    Settings: type | None = None
    client: ClientHalf = ClientHalf()
    federated = True  # False: `prepare` does all the work and no federated rounds run (a ceiling)

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.summary: dict = {}

    @property
    def settings(self) -> Any:
        return self.ctx.config.sections[self.section]

    def start(self, ctx: MethodContext) -> GlobalModel:
        """The starting global model: at `pruning.density` >= 1 a federated method trains the dense
        model (FedAvg's start, `prepare` is not called), otherwise `prepare`'s."""
        if ctx.config.pruning.density >= 1.0 and self.federated:
            return GlobalModel(self.initial_model(ctx).state_dict())
        return self.prepare(ctx)

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        """The starting global model and masks at `pruning.density` < 1 (may talk to clients, e.g. a
        policy search); by default the dense model."""
        return GlobalModel(self.initial_model(ctx).state_dict())

    def pruned_at_start(self, ctx: MethodContext, score: str, allocation: str) -> GlobalModel:
        """The starting model pruned once by a server-side score and allocation."""
        model = self.initial_model(ctx)
        c = ctx.config
        masks = compute_masks(model, c.pruning.density, score, allocation, seed=c.seed, keep_dense=ctx.dense_layers(model))
        return GlobalModel(model.state_dict(), masks)

    def initial_model(self, ctx: MethodContext) -> torch.nn.Module:
        """The seeded model, warmed up on the server when configured (the same start for every method)."""
        model = ctx.new_model()
        server_warmup(ctx, model)
        return model

    def round_config(self, ctx: MethodContext, gm: GlobalModel, t: int) -> dict:
        """Extra per-round config sent to the training clients (wire names in shared.protocol)."""
        return {}

    def check_reply(self, ctx: MethodContext, gm: GlobalModel, reply: Reply) -> str | None:
        """Why a training reply whose update passed the shared checks (`reply.decoded`) is unusable
        for this method, or None. Checks the method's own payload entries of this round, and may
        keep what it decoded in `reply.extras` for `aggregate` and `after_round`. A rejected reply is
        counted once and used nowhere, as if the client had not replied."""
        return None

    def check_update_masks(self, gm: GlobalModel, masks: Tensors) -> str | None:
        """Why the masks a client's update arrived on are unacceptable, or None. By default they must be
        the global masks; a method whose clients choose their own (`TrainJob.upload_masks`) overrides it."""
        return same_masks(gm, masks)

    def aggregate(self, ctx: MethodContext, gm: GlobalModel, replies: list[Reply]) -> Tensors:
        """The round's new global state from the accepted replies: by default sample-weighted FedAvg over
        kept positions, robust as configured (`fl.aggregator`, `fl.max_weight_share`; shared.aggregate)."""
        f = ctx.config.fl
        return combine([r.decoded for r in replies], ctx.weights(replies), gm.masks or None,
                       f.aggregator, f.trim_fraction, ctx.config.trusted)

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        """Runs after aggregation of round t over its accepted replies (e.g. prune/grow)."""

    def phase(self, t: int) -> str:
        return "train"

    def state_dict(self) -> dict:
        """JSON-serializable state a checkpoint needs to resume this method exactly."""
        return {"summary": self.summary}

    def load_state_dict(self, state: dict) -> None:
        self.summary = state["summary"]


def same_masks(gm: GlobalModel, masks: Tensors) -> str | None:
    """Why an update's masks are not the global masks (what every client trains on), or None."""
    for name, mask in gm.masks.items():
        if name not in masks:
            return f"{name} arrived dense, without the global mask (density {mask.float().mean():.4f})"
        if not torch.equal(masks[name], mask):
            return f"mask of {name} differs from the global mask (density {masks[name].float().mean():.4f}, expected {mask.float().mean():.4f})"
    return None


def server_warmup(ctx: MethodContext, model: torch.nn.Module) -> None:
    """Optional dense pre-training on a tiny labelled server set drawn from the train split (never test),
    on the run's device; the model comes back to the host, where the server keeps its state."""
    c = ctx.config
    if c.warmup.epochs <= 0:
        return
    x, y = server_warmup_set(ctx.bundle, c.warmup.shots, c.seed)
    model.to(ctx.device)
    warmup(model, lambda e: batches(ctx.bundle, x, y, c.fl.batch_size, True, c.seed + e), c.warmup.epochs, c.fl.lr)
    model.to("cpu")
    ctx.note(f"server warm-up: {c.warmup.epochs} epochs on {len(y)} examples")
