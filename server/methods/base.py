"""What a federated pruning method is: one module with its settings, server hooks, client half and reply checks.

A method module (see `server/methods/fedtiny.py`, or the worked example in README "Write your own
method") defines:
- optionally a settings dataclass, its own config section (`Settings`, `section`);
- a `Method` subclass registered with `@register("name")`, overriding only the hooks that define it:
  `prepare` (starting model and masks), `round_config` (extra keys for the round's clients),
  `aggregate` (the round's new global state), `after_round` (e.g. prune/grow), `state_dict`;
- optionally a `ClientHalf` subclass (the method's `client` attribute): what a client computes
  beyond masked training;
- the checks of the replies its hooks read (`check_reply`, run on every reply before `aggregate`:
  a bad reply is rejected and logged, never used), and `check_update_masks` when its clients upload
  on masks of their own (`TrainJob.upload_masks`, SparsyFed) instead of the global ones.

Discovery is automatic: every module of this package is imported (registering its method), and
`method=package.module:Class` loads a user's method from a trusted package (`trusted=[package]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from server.aggregate import combine
from server.global_model import GlobalModel
from server.loop import same_masks
from shared.config import register_method
from shared.data import batches
from shared.partition import server_warmup_set
from shared.pruning import compute_masks
from shared.registry import Registry, import_callable
from shared.training import TrainResult, warmup

if TYPE_CHECKING:
    from client.runtime import ClientRuntime
    from server.context import RunContext
    from server.fleet import Reply

METHODS: Registry = Registry("method", allow_import=True)


@dataclass
class TrainJob:
    """One client's training round, as a method's client half sees it."""

    runtime: ClientRuntime
    config: Mapping[str, Any]  # the round's config record (the method's keys from `round_config` included)
    model: torch.nn.Module  # the downloaded global model, trained in place
    masks: dict[str, torch.Tensor]  # the global masks of the download
    local_masks: dict[str, torch.Tensor]  # the masks training keeps (a client half may change them)
    batches: Callable[[int], Iterable]  # epoch -> the shuffled local batches of that epoch
    seed: int
    scratch: dict = field(default_factory=dict)  # the client half's own notes between its calls
    # The masks the update travels on, sent with it (None: the global masks, which the server holds).
    # Set by a client half whose clients prune their own model (SparsyFed); see `Method.check_update_masks`.
    upload_masks: dict[str, torch.Tensor] | None = None


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
    """Server hooks with do-nothing defaults: a method overrides only what defines it."""

    name = ""  # set by `register`
    section: str | None = None  # config section of `Settings` (default: the method's name)
    Settings: type | None = None
    client: ClientHalf = ClientHalf()
    federated = True  # False: `prepare` does all the work and no federated rounds run (a ceiling)

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.summary: dict = {}

    @property
    def settings(self) -> Any:
        return self.ctx.config.sections[self.section]

    def prepare(self, ctx: RunContext) -> GlobalModel:
        """The starting global model and masks (may talk to clients, e.g. a policy search)."""
        return GlobalModel(self.initial_model(ctx).state_dict())

    def pruned_at_start(self, ctx: RunContext, score: str, allocation: str) -> GlobalModel:
        """The starting model pruned once by a server-side score and allocation (dense at density 1)."""
        model = self.initial_model(ctx)
        c = ctx.config
        if c.pruning.density >= 1.0:
            return GlobalModel(model.state_dict())
        masks = compute_masks(model, c.pruning.density, score, allocation, seed=c.seed, keep_dense=ctx.dense_layers(model))
        return GlobalModel(model.state_dict(), masks)

    def initial_model(self, ctx: RunContext) -> torch.nn.Module:
        """The seeded model, warmed up on the server when configured (the same start for every method)."""
        model = ctx.new_model()
        server_warmup(ctx, model)
        return model

    def round_config(self, ctx: RunContext, gm: GlobalModel, t: int) -> dict:
        """Extra per-round config sent to the training clients (wire names in shared.protocol)."""
        return {}

    def aggregate(self, ctx: RunContext, gm: GlobalModel, replies: list[Reply]) -> dict[str, torch.Tensor]:
        """The round's new global state from the accepted replies: by default sample-weighted FedAvg over
        kept positions, robust as configured (`fl.aggregator`, `fl.max_weight_share`; server.aggregate)."""
        f = ctx.config.fl
        return combine([r.decoded for r in replies], ctx.weights(replies), gm.masks or None,
                       f.aggregator, f.trim_fraction)

    def check_reply(self, ctx: RunContext, gm: GlobalModel, reply: Reply) -> str | None:
        """Why a training reply's method payload is unusable, or None. Runs on every reply whose update
        passed the shared checks, before `aggregate`: a rejected reply is logged, counted and not used."""
        return None

    def check_update_masks(self, gm: GlobalModel, masks: dict[str, torch.Tensor]) -> str | None:
        """Why the masks an update arrived on are unacceptable, or None: by default they must be the
        global masks. A method whose clients choose their own masks (`TrainJob.upload_masks`) overrides it."""
        return same_masks(gm, masks)

    def after_round(self, ctx: RunContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        """Runs after aggregation of round t (e.g. prune/grow)."""

    def phase(self, t: int) -> str:
        return "train"

    def state_dict(self) -> dict:
        """JSON-serializable state a checkpoint needs to resume this method exactly."""
        return {"summary": self.summary}

    def load_state_dict(self, state: dict) -> None:
        self.summary = state["summary"]


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a method under `name`, with its settings section."""

    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.register(name)(cls)
        cls.name = name
        _register_settings(cls, name)
        return cls

    return decorator


def _register_settings(cls: type[Method], name: str) -> None:
    if cls.Settings is not None:
        cls.section = cls.section or name
    register_method(name, cls.section, cls.Settings)


def load(name: str, trusted: Iterable[str] = ()) -> type[Method]:
    """The method registered as `name`, or a `package.module:Class` Method subclass from a trusted package."""
    if name in METHODS:
        return METHODS.get(name)
    cls = import_callable(name, "method", trusted)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {name!r} is not a subclass of server.methods.base.Method")
    if not cls.name:
        cls.name = name
        _register_settings(cls, name.rpartition(":")[2].lower())
    return cls


def server_warmup(ctx: RunContext, model: torch.nn.Module) -> None:
    """Optional dense pre-training on a tiny labelled server set drawn from the train split (never test),
    on the run's device; the model comes back to the host, where the server keeps its state."""
    c = ctx.config
    if c.warmup.epochs <= 0:
        return
    x, y = server_warmup_set(ctx.bundle, c.warmup.shots, c.seed)
    model.to(ctx.device)
    warmup(model, lambda e: batches(ctx.bundle, x, y, c.fl.batch_size, True, c.seed + e), c.warmup.epochs, c.fl.lr)
    model.to("cpu")
    ctx.recorder.note(f"server warm-up: {c.warmup.epochs} epochs on {len(y)} examples")
