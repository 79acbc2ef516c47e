"""An in-process stand-in for Flower's Grid: runs the real ClientApp handlers without Ray.

Server logic can then be tested as plain function calls on tiny models; every
message still goes through the real ClientApp and the real records.
"""

from __future__ import annotations

import itertools
import traceback
import uuid
from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from shared.config import Config, to_flat


class FakeGrid:
    """Nodes 1000+i hold partition i; `drop` decides which (node, message type) never replies."""

    def __init__(self, config: Config, drop: Callable[[int, str], bool] = lambda n, t: False) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        n = config.fl.num_clients
        self.run_config = to_flat(config)
        self.nodes = {1000 + i: i for i in range(n)}
        self.states = {node: RecordDict() for node in self.nodes}
        self.drop = drop
        self.sent: list[Message] = []
        self._ids = itertools.count()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if node not in self.nodes or self.drop(node, msg.metadata.message_type):
                continue
            replies.append(self._call(msg, node))
        return replies

    def _call(self, msg: Message, node: int) -> Message:
        context = Context(
            run_id=1, node_id=node, node_config={"partition-id": self.nodes[node], "num-partitions": len(self.nodes)},
            state=self.states[node], run_config=dict(self.run_config),
        )
        try:
            return client_app(msg, context)
        except Exception as exc:  # the real engine turns a raising ClientApp into an error reply
            reason = "".join(traceback.format_exception(exc))
            return Message(Error(code=2, reason=reason), reply_to=msg)
