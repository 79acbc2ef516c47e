"""One acceptance point: a training reply whose update is valid but whose method payload is not
(FedTiny's and FedMef's top-k gradients, FedRTS's top-k indices, FedDST's mask changes, PruneFL's
squared gradients) is rejected once, before aggregation, and leaves the global model exactly as if
its client had not replied."""

from __future__ import annotations

import pytest
import torch

from fake_grid import FakeGrid
from helpers import run_context, tiny_config
from server.rounds import training_round
from shared import codec, protocol as p
from shared.methods import METHODS


def negated(blob: bytes) -> bytes:
    """Valid codec bytes, every value negated (squared gradients below zero)."""
    return codec.encode({n: -t for n, t in codec.decode(blob)[0].items()})


CASES = {
    "fedtiny": (["fedtiny.scores=[magnitude]"], p.TOPK, lambda blob: b"FTS\x01garbage", "undecodable top-k"),
    "feddst": ([], p.MASK_CHANGES, lambda blob: b"FTS\x01garbage", "feddst mask changes: undecodable"),
    "prunefl": (["prunefl.interval=1"], p.SQ_GRADS, negated, "must be finite, >= 0"),
    "fedmef": (["fedmef.interval=1", "fedmef.end_fraction=1.0"], p.TOPK, lambda blob: b"FTS\x01garbage", "undecodable top-k"),
    "fedrts": (["fedrts.interval=1", "fedrts.end_fraction=1.0"], p.TOPK_INDEX, lambda blob: b"FTC\x01garbage",
               "undecodable top-k gradient indices"),
}


class TamperingGrid(FakeGrid):
    """The first training reply's method payload `key` is replaced by `tamper(bytes)`; its update is untouched."""

    def __init__(self, config, key: str, tamper) -> None:
        super().__init__(config)
        self.key, self.tamper, self.victim = key, tamper, None

    def _call(self, msg, node):
        reply = super()._call(msg, node)
        if msg.metadata.message_type == p.TRAIN and self.victim is None:
            assert self.key in reply.content[p.PAYLOAD], "the honest reply carries the payload"
            reply.content[p.PAYLOAD][self.key] = self.tamper(reply.content[p.PAYLOAD][self.key])
            self.victim = node
        return reply


def first_round(config, grid, tmp_path):
    """Round 1 of the method (start, round config, training round, after_round): the global model and the context."""
    ctx = run_context(config, grid, tmp_path)
    method = METHODS.get(config.method)(ctx)
    gm = method.start(ctx)
    extra = method.round_config(ctx, gm, 1)
    assert extra, "round 1 asks for the method's payload"
    replies = training_round(ctx, method, gm, 1, extra)
    method.after_round(ctx, gm, 1, replies)
    return gm, ctx, replies


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_bad_method_payload_leaves_the_model_as_if_its_client_had_not_replied(tmp_path, method):
    overrides, key, tamper, reason = CASES[method]
    config = tiny_config(tmp_path, f"method={method}", "fl.rounds=3", *overrides)
    tampering = TamperingGrid(config, key, tamper)
    attacked, ctx, replies = first_round(config, tampering, tmp_path / "attacked")
    victim = tampering.victim
    silent, ctx_silent, _ = first_round(config, FakeGrid(config, drop=lambda n, t: n == victim and t == p.TRAIN),
                                        tmp_path / "silent")
    honest, _, _ = first_round(config, FakeGrid(config), tmp_path / "honest")

    assert len(ctx.fleet.traffic.rejected) == 1 and reason in ctx.fleet.traffic.rejected[0]  # counted once
    assert victim not in [r.node_id for r in replies] and not ctx_silent.fleet.traffic.rejected
    for name in attacked.state:
        assert torch.equal(attacked.state[name], silent.state[name]), name
    assert attacked.masks.keys() == silent.masks.keys()
    assert all(torch.equal(attacked.masks[n], silent.masks[n]) for n in attacked.masks)
    assert any(not torch.equal(attacked.state[n], honest.state[n]) for n in attacked.state)  # its update would have counted



def test_a_method_check_that_raises_rejects_the_reply_instead_of_stopping_the_server(tmp_path):
    from server.fleet import NotEnoughReplies
    from shared.methods import Method

    class Fragile(Method):
        def check_reply(self, ctx, gm, reply):
            return reply.extras["never-set"]  # raises KeyError on every reply

    config = tiny_config(tmp_path, "method=fedavg", "fl.min_replies=0.5")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = Fragile(ctx)
    gm = method.start(ctx)
    with pytest.raises(NotEnoughReplies):  # every reply rejected, fresh clients tried: the round fails cleanly
        training_round(ctx, method, gm, 1, {})
    rejected = ctx.fleet.traffic.rejected
    assert len(rejected) == config.fl.num_clients
    assert all("Fragile: unusable payload (" in r and "never-set" in r for r in rejected)
