"""Run a fedtiny job in this process, through the real ClientApp, and keep every message.

Bytes do not depend on the transport, so the bytes benchmark needs no Ray: each message
goes through the real ClientApp handlers and the real records, one node at a time, and the
grid keeps the payloads of both directions for `simulations.wire_bound`.
"""

from __future__ import annotations

import traceback
import uuid
from pathlib import Path
from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.fleet import payload_blobs
from shared import rundir
from shared.config import Config, to_flat


class InProcessGrid:
    """A stand-in for Flower's Grid: nodes 1000+i hold partition i, messages run the real ClientApp here.

    Every payload sent or received is kept in `down` / `up` (message type, bytes), every message
    in `sent`; `drop(node, message_type)` decides which messages never get a reply (a dead or
    straggling client).
    """

    def __init__(self, config: Config, drop: Callable[[int, str], bool] = lambda node, kind: False) -> None:
        from client.app import app as client_app  # the ClientApp imports Flower's client side

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.client_app = client_app
        self.run_config = to_flat(config)
        self.nodes = {1000 + i: i for i in range(config.fl.num_clients)}
        self.states = {node: RecordDict() for node in self.nodes}
        self.drop = drop
        self.sent: list[Message] = []
        self.down: list[tuple[str, bytes]] = []
        self.up: list[tuple[str, bytes]] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            kind, node = msg.metadata.message_type, msg.metadata.dst_node_id
            self.sent.append(msg)
            self.down += [(kind, b) for b in payload_blobs(msg.content)]
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if node not in self.nodes or self.drop(node, kind):
                continue
            reply = self._call(msg, node)
            if not reply.has_error():
                self.up += [(kind, b) for b in payload_blobs(reply.content)]
            replies.append(reply)
        return replies

    def _call(self, msg: Message, node: int) -> Message:
        context = Context(
            run_id=1, node_id=node, node_config={"partition-id": self.nodes[node], "num-partitions": len(self.nodes)},
            state=self.states[node], run_config=dict(self.run_config),
        )
        try:
            return self.client_app(msg, context)
        except Exception as exc:  # the simulation engine turns a raising ClientApp into an error reply
            return Message(Error(code=2, reason="".join(traceback.format_exception(exc))), reply_to=msg)


def run_in_process(config: Config, out: Path) -> tuple[dict, InProcessGrid]:
    """Run `config` with the real ServerApp logic on an `InProcessGrid`; returns metrics.json and the grid."""
    import json

    import torch

    from server.app import run

    torch.set_num_threads(1)
    config.output_dir = str(out)
    grid = InProcessGrid(config)
    run(grid, config)
    return json.loads((out / rundir.METRICS).read_text()), grid
