"""Bytes the simulation process keeps per virtual node, by structure: Flower's engine and fedtiny's server.

`flwr-simulation` (ServerApp + Flower's simulation engine) is the one process whose memory grows
with the fleet (docs/fleet-scale.md). This rebuilds, for N nodes, what Flower 1.42's engine
(`flwr.server.superlink.fleet.vce.vce_api.start_vce`) builds before the first round, with this
project's pyproject.toml and the run config fedtiny submits, and what `server.fleet.Fleet.register`
keeps for a virtual fleet; tracemalloc counts what stays allocated (and slows the milliseconds per
node it reports, which only compare runs of this tool). Run as
`python -m simulations.node_memory N`: one JSON line. It calls two private helpers of Flower's engine
(`_register_nodes`, `_register_node_info_stores`), so it measures exactly what that version does.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path

from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager

from server.fleet import Fleet
from shared.config import load_config, to_flat
from shared.data import load_for
from shared.partition import partition_sizes

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "synthetic.yaml"


def _kept(fn):
    """(result of fn(), bytes it left allocated, seconds)."""
    gc.collect()
    before = tracemalloc.take_snapshot()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    gc.collect()
    diff = tracemalloc.take_snapshot().compare_to(before, "filename")
    return result, sum(d.size_diff for d in diff), seconds


def _own_bytes(objects: list, shared: set[int]) -> int:
    """Bytes of those objects no other node shares (sys.getsizeof, each object once)."""
    return sum(sys.getsizeof(o) for o in {id(o): o for o in objects}.values() if id(o) not in shared)


def run_config_structures(stores: dict) -> dict:
    """Average bytes per node of each node's run config, split by structure; an object two nodes
    share (a value of the submitted run config, a small int, True) counts for neither."""
    infos = [s.run_infos[next(iter(s.run_infos))] for s in stores.values()]

    def ids(config: dict) -> set[int]:
        return {id(o) for o in (*config, *config.values())}

    shared = ids(infos[0].initial_run_config) & ids(infos[-1].initial_run_config)
    n = len(infos)
    keys = sum(_own_bytes(list(i.initial_run_config), shared) for i in infos)
    values = sum(_own_bytes(list(i.initial_run_config.values()), shared) for i in infos)
    dicts = sum(sys.getsizeof(i.initial_run_config) + sys.getsizeof(i.context.run_config) for i in infos)
    return {"run_config_keys": len(infos[0].initial_run_config), "key_strings_b": round(keys / n),
            "value_objects_b": round(values / n), "two_dicts_b": round(dicts / n)}


def flower_per_node(n: int, override: dict) -> dict:
    """What Flower's engine keeps per node: link state entries, then one DeprecatedRunInfoStore each."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping, linkstate, _ = _kept(lambda: vce_api._register_nodes(n, factory))
    run = Run.create_empty(1)
    run.override_config = override
    stores, kept, seconds = _kept(lambda: vce_api._register_node_info_stores(mapping, run, app_dir=str(ROOT)))
    return {"linkstate_b": round(linkstate / n), "run_info_stores_b": round(kept / n),
            "run_info_stores_ms": round(seconds / n * 1e3, 2), **run_config_structures(stores)}


class _Grid:
    """The node ids a grid returns: fresh ints on every call, as decoded from Flower's replies."""

    def __init__(self, n: int) -> None:
        rng = random.Random(0)
        self.ids = [rng.getrandbits(62) | 1 << 62 for _ in range(n)]

    def get_node_ids(self) -> list[int]:
        return [int(str(i)) for i in self.ids]


def server_per_node(n: int) -> int:
    """What fedtiny's Fleet keeps per node of a virtual fleet (node list, partition map, sizes)."""
    config = load_config(CONFIG, [f"fl.num_clients={n}"])
    bundle, d = load_for(config), config.dataset
    fleet = Fleet(_Grid(n), n, config.fl.min_replies, 1.0, virtual=True)
    _, kept, _ = _kept(lambda: fleet.register(lambda: partition_sizes(bundle, n, d.partition, d.alpha, d.holdout, 0)))
    return round(kept / n)


def main(argv: list[str]) -> int:
    n = int(argv[0])
    override = to_flat(load_config(CONFIG, [f"fl.num_clients={n}"]))  # every key, as fedtiny submits it
    tracemalloc.start()
    row = {"nodes": n, "flower": flower_per_node(n, override),
           "flower_without_overrides": flower_per_node(n, {}), "fedtiny_server_b": server_per_node(n)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
