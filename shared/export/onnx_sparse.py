"""Pruned ONNX initializers stored as their kept values, rebuilt in the graph, so file size follows density.

Why: `torch.onnx.export` writes every weight densely, so a 1%-dense model's ONNX file is as big as
the dense one. Here each mostly-zero float initializer W becomes two initializers, its nonzero
values (float32) and the gaps between their flat positions (uint16), plus five nodes that rebuild
W once: ConstantOfShape (zeros) -> ScatterElements at CumSum(Cast(gaps)) -> Reshape (`W.v` and
`W.g` name the two initializers; W keeps its name, so the nodes reading it are unchanged). The nodes read
initializers only, so onnxruntime constant-folds them when it loads the model; inference runs
the same dense graph as before. A gap over 65,535 is bridged by explicit zero entries.

(ONNX's own `sparse_initializer` needs int64 indices, 8 bytes per kept weight; this needs 2.)
"""

from __future__ import annotations

import numpy as np

MAX_GAP = 2**16 - 1
_NODE_OVERHEAD = 200  # bytes of the five nodes and two small initializers, roughly
_AXIS = "_axis0"  # the int64 scalar 0 that every CumSum reads


def gaps_of(flat_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions with bridging zeros inserted, uint16 gaps) so that cumsum(gaps) == positions.

    Positions are sorted; a bridged gap gets extra positions every MAX_GAP steps (their value is 0).
    """
    positions = np.asarray(flat_positions, dtype=np.int64)
    previous = np.concatenate(([0], positions[:-1]))
    steps = positions - previous
    extra = [np.arange(p + MAX_GAP, q, MAX_GAP) for p, q, s in zip(previous, positions, steps) if s > MAX_GAP]
    if extra:
        positions = np.union1d(positions, np.concatenate(extra))
    gaps = np.diff(np.concatenate(([0], positions)))
    return positions, gaps.astype(np.uint16)


def _rebuild_nodes(onnx, name: str, k: int, shape: tuple[int, ...], numel: int) -> tuple[list, list]:
    """The initializers and nodes that rebuild tensor `name` from `name`.v (values) and `name`.g (gaps).

    Intermediate names are short (`_k.z`, ...): they are repeated in the file and weigh on a tiny model.
    """
    helper, T = onnx.helper, onnx.TensorProto
    p = f"_{k}."
    inits = [helper.make_tensor(p + "n", T.INT64, [1], [numel]),
             helper.make_tensor(p + "s", T.INT64, [len(shape)], list(shape))]
    zero = helper.make_tensor("value", T.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("ConstantOfShape", [p + "n"], [p + "z"], value=zero),
        helper.make_node("Cast", [name + ".g"], [p + "c"], to=T.INT64),
        helper.make_node("CumSum", [p + "c", _AXIS], [p + "i"]),
        helper.make_node("ScatterElements", [p + "z", p + "i", name + ".v"], [p + "f"], axis=0),
        helper.make_node("Reshape", [p + "f", p + "s"], [name]),
    ]
    return inits, nodes


def sparsify(model, min_numel: int = 64):
    """Rewrite, in place, each float32 initializer whose compact form is smaller; returns the model."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    keep, new_inits, new_nodes = [], [], []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.data_type != onnx.TensorProto.FLOAT or array.size < min_numel or init.name in graph_inputs:
            keep.append(init)
            continue
        flat = array.reshape(-1)
        positions, gaps = gaps_of(np.flatnonzero(flat))
        if positions.size == 0:
            positions, gaps = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.uint16)
        if 6 * positions.size + _NODE_OVERHEAD >= 4 * flat.size:
            keep.append(init)
            continue
        new_inits += [numpy_helper.from_array(flat[positions].astype(np.float32), f"{init.name}.v"),
                      numpy_helper.from_array(gaps, f"{init.name}.g")]
        inits, nodes = _rebuild_nodes(onnx, init.name, len(new_nodes) // 5, tuple(array.shape), int(flat.size))
        new_inits += inits
        new_nodes += nodes
    if new_nodes:
        new_inits.append(onnx.helper.make_tensor(_AXIS, onnx.TensorProto.INT64, [], [0]))
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)
    return model
