"""The server's view of the clients: registration, seeded sampling, and message rounds.

Every exchange counts the payload bytes it sends and receives, logs client errors
with the node id and reason, and never waits forever: a round whose replies fall
below `fl.min_replies` is retried with fresh clients a bounded number of times.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.replies import check_count, check_hello
from shared import protocol as p
from shared.methods.api import Reply

log = logging.getLogger("fedtiny")
MAX_RETRIES = 3
# What a node's count may weigh, in multiples of the fleet's median claim (`Fleet.admit`): digits'
# Dirichlet(0.5) partitions of 3 to 100 clients span up to 2.4 x the median, so honest nodes are untouched.
COUNT_CAP_MULTIPLE = 4
REGISTRATION_TIMEOUT_S = 600.0
PROGRESS_EVERY_S = 30.0


class NotEnoughReplies(RuntimeError):
    """A round did not get `fl.min_replies` of its sampled clients even after retries."""


@dataclass
class Traffic:
    """Payload bytes on the wire, both ways, and client failures, since the last `take()`."""

    up: int = 0
    down: int = 0
    failures: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    clients: set[int] = field(default_factory=set)  # nodes that replied (registration aside): a round's clients=

    def take(self) -> "Traffic":
        out = Traffic(self.up, self.down, self.failures, self.rejected, self.clients)
        self.up, self.down, self.failures, self.rejected, self.clients = 0, 0, [], [], set()
        return out


def payload_blobs(content: RecordDict) -> list[bytes]:
    """Every codec payload in a message's content (the `payload` record's bytes and lists of bytes)."""
    if p.PAYLOAD not in content:
        return []
    blobs: list[bytes] = []
    for value in content[p.PAYLOAD].values():
        blobs += list(value) if isinstance(value, list) else [value]
    return blobs


def payload_bytes(content: RecordDict) -> int:
    """Bytes of codec payloads in a message (the only large content we send)."""
    return sum(len(b) for b in payload_blobs(content))


class Fleet:
    def __init__(self, grid: Grid, num_clients: int, min_replies: float, timeout: float, virtual: bool = False) -> None:
        self.grid = grid
        self.virtual = virtual
        self.num_clients = num_clients
        self.min_replies = min_replies
        self.timeout = timeout
        self.traffic = Traffic()
        self.partition_of: dict[int, int] = {}
        self.examples_of: dict[int, tuple[int, int]] = {}  # node -> (train, held-out) examples it holds
        self.caps: dict[int, tuple[int, int]] = {}  # node -> what its (train, held-out) counts may weigh
        self.nodes: list[int] = []  # node ids in partition order: sampling is reproducible by seed

    def register(self, sizes: Callable[[], list[tuple[int, int]]] | None = None) -> None:
        """Wait for all nodes, then learn each node's partition so sampling is reproducible by seed.

        With virtual partitions (simulation only) node i of the sorted ids is told it holds
        partition i in every message, so a fleet of thousands needs no registration round; `sizes()`
        gives each partition's (train, held-out) example counts, the bound on what a node may report.
        Otherwise each node's hello says it (checked by `server.replies.check_hello`; a bad hello
        leaves that node out, logged), and `admit` registers the others.
        """
        deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
        next_note = time.monotonic() + PROGRESS_EVERY_S
        while len(nodes := sorted(self.grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise NotEnoughReplies(f"only {len(nodes)} of fl.num_clients={self.num_clients} nodes connected")
            if time.monotonic() > next_note:  # a large fleet takes minutes to connect: say how far it got
                log.info("%d of %d nodes connected", len(nodes), self.num_clients)
                next_note += PROGRESS_EVERY_S
            time.sleep(0.2)
        if self.virtual:
            self.partition_of = {n: i for i, n in enumerate(nodes[: self.num_clients])}
            self.nodes = list(self.partition_of)
            if sizes is not None:
                self.examples_of = dict(zip(self.nodes, sizes()))
            log.info("assigned %d partitions to virtual clients", len(self.nodes))
            return
        # Not a round: the first message also starts every client (cold start), so it gets the
        # registration timeout rather than fl.round_timeout.
        claims = {}
        for r in self.exchange({n: RecordDict() for n in nodes}, p.HELLO, max(self.timeout, REGISTRATION_TIMEOUT_S)):
            hello, reason = check_hello(r, self.num_clients)
            if reason is not None:
                self.reject(r.node_id, p.HELLO, reason)
            else:
                claims[r.node_id] = hello
        self.admit(claims)
        log.info("registered %d nodes", len(self.nodes))

    def admit(self, claims: dict[int, tuple[int, int, int]]) -> None:
        """Register every node's checked hello (partition, train examples, held-out examples).

        A partition id is what a node says of itself, not its identity (its Flower node id is, which
        a deployment authenticates by the node's key). So a partition claimed by several nodes keeps
        them all, logged: excluding the later claimants (or all of them) would let one node that
        copies another's id shut the honest one out of the whole run. Each claimant is sampled as a
        client of its own, in (partition, node id) order, and weighs no more than the fleet allows.

        The counts a node claims bound what its replies may report; what they weigh is bounded
        by the fleet (`weight_cap`): at most `COUNT_CAP_MULTIPLE` times the median claim of all
        nodes, so a node claiming 10^9 examples weighs no more than a few typical nodes.
        """
        by_partition: dict[int, list[int]] = {}
        for node, (part, train, holdout) in sorted(claims.items()):
            by_partition.setdefault(part, []).append(node)
            self.partition_of[node] = part
            self.examples_of[node] = (train, holdout)
        for part, owners in by_partition.items():
            if len(owners) > 1:
                log.warning("partition %d is claimed by nodes %s: all are kept, each as a client of its own", part, owners)
        self.nodes = sorted(self.partition_of, key=lambda n: (self.partition_of[n], n))
        if claims:
            medians = [statistics.median_low(sizes) for sizes in zip(*self.examples_of.values())]
            caps = tuple(COUNT_CAP_MULTIPLE * m for m in medians)
            for node, sizes in self.examples_of.items():
                self.caps[node] = tuple(min(s, c) for s, c in zip(sizes, caps))
                if self.caps[node] != sizes:
                    self._log(node, p.HELLO, f"claims {sizes} (train, held-out) examples, more than {COUNT_CAP_MULTIPLE} "
                                             f"x the fleet's median {tuple(medians)}: it weighs as {self.caps[node]}")

    def weight_cap(self, node: int, message_type: str) -> int | None:
        """The most a count of `node` may weigh for a message type (None: what it holds, as with
        virtual partitions, whose sizes the server knows)."""
        caps = self.caps.get(node)
        if caps is None:
            return None
        return caps[0] if message_type in (p.TRAIN, p.SCORES) else caps[1]

    def sample(self, k: int, rng: np.random.Generator, exclude: set[int] = frozenset()) -> list[int]:
        pool = [n for n in self.nodes if n not in exclude]
        if not pool:
            return []
        picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        return [pool[i] for i in sorted(picks)]

    def exchange(self, requests: dict[int, RecordDict], message_type: str, timeout: float | None = None) -> list[Reply]:
        """Send one message per node and collect the replies that arrive within `timeout` (default
        fl.round_timeout); errors and missing replies are logged."""
        timeout = self.timeout if timeout is None else timeout
        messages = []
        for node_id, content in requests.items():
            if self.virtual:
                content = self._with_partition(content, node_id)
            self.traffic.down += payload_bytes(content)
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type))
        replies = []
        answered = set()
        for msg in self.grid.send_and_receive(messages, timeout=timeout):
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                self._fail(node, message_type, _last_line(msg.error.reason))
                continue
            size = payload_bytes(msg.content)
            self.traffic.up += size
            if message_type != p.HELLO:
                self.traffic.clients.add(node)
            replies.append(Reply(node, msg.content, size))
        for node in set(requests) - answered:
            self._fail(node, message_type, f"no reply within {timeout:g}s (fl.round_timeout={self.timeout:g})")
        return sorted(replies, key=lambda r: self.partition_of.get(r.node_id, r.node_id))

    def round(
        self,
        k: int,
        message_type: str,
        build: Callable[[int], RecordDict],
        rng: np.random.Generator,
        check: Callable[[Reply], tuple[Any, str | None]] = lambda r: (None, None),
    ) -> tuple[list[int], list[Reply]]:
        """Sample k clients, exchange, and retry with fresh clients until min_replies of k answered.

        `check` returns (what it decoded, None) for a usable reply, which keeps it as `Reply.decoded`,
        or (None, reason) to reject it (logged, counted, not used).
        Returns the sampled node ids and the accepted replies.
        """
        needed = max(1, math.ceil(self.min_replies * k))
        sampled: list[int] = []
        accepted: list[Reply] = []
        for attempt in range(MAX_RETRIES + 1):
            nodes = self.sample(k - len(accepted), rng, exclude=set(sampled))
            if not nodes:
                break
            sampled += nodes
            accepted += self.accepted(self.exchange({n: build(n) for n in nodes}, message_type), message_type, check)
            if len(accepted) >= needed:
                return sampled, accepted
            log.warning("%s: %d of %d replies (need %d); retrying with fresh clients", message_type, len(accepted), k, needed)
        raise NotEnoughReplies(
            f"{message_type}: only {len(accepted)} usable replies from {len(sampled)} clients, need {needed} "
            "(check client errors above; lower fl.min_replies or raise fl.round_timeout)"
        )

    def accepted(self, replies: list[Reply], message_type: str,
                 check: Callable[[Reply], tuple[Any, str | None]] = lambda r: (None, None)) -> list[Reply]:
        """The replies whose example count (a positive integer, at most what the node holds) and
        `check` pass, each keeping what `check` decoded as `Reply.decoded`; the others are rejected."""
        out = []
        for reply in replies:
            metrics = reply.content[p.METRICS] if p.METRICS in reply.content else {}
            _, reason = check_count(metrics.get(p.NUM_EXAMPLES), self.holds(reply.node_id, message_type))
            reply.weight_cap = self.weight_cap(reply.node_id, message_type)
            if reason is None:
                reply.decoded, reason = check(reply)
            if reason is None:
                out.append(reply)
            else:
                self.reject(reply.node_id, message_type, reason)
        return out

    def holds(self, node: int, message_type: str) -> int | None:
        """The examples `node` holds for a message type (training or held-out split); None when unknown."""
        sizes = self.examples_of.get(node)
        if sizes is None:
            return None
        return sizes[0] if message_type in (p.TRAIN, p.SCORES) else sizes[1]

    def _with_partition(self, content: RecordDict, node_id: int) -> RecordDict:
        """A copy of `content` whose config tells a virtual client which partition it holds."""
        out = RecordDict()
        for key, record in content.items():
            out[key] = record
        config = ConfigRecord(dict(content[p.CONFIG])) if p.CONFIG in content else ConfigRecord()
        config[p.ACTING_PARTITION] = self.partition_of[node_id]
        out[p.CONFIG] = config
        return out

    def _fail(self, node: int, message_type: str, reason: str) -> None:
        self.traffic.failures.append(self._log(node, message_type, reason))

    def reject(self, node: int, message_type: str, reason: str) -> None:
        """A reply that arrived but is not used (bad update): logged with the node and reason, counted."""
        self.traffic.rejected.append(self._log(node, message_type, f"rejected: {reason}"))

    def _log(self, node: int, message_type: str, reason: str) -> str:
        line = f"node {node} (partition {self.partition_of.get(node, '?')}) {message_type}: {reason}"
        log.warning(line)
        return line


def config_record(values: dict) -> ConfigRecord:
    """A message's config record; None values are left out."""
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "client error"
