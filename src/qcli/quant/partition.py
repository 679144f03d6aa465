"""Partition a QuantGraph into reconstruction units: layers, blocks or stages.

A unit is a contiguous run of graph nodes with one input tensor and one output tensor, so a
reconstruction method can cache the unit's input once and replay the unit alone. Cuts come
from the graph: a cut after node n is valid when n's output is the only tensor still needed
later; a residual block therefore can never be split, whatever its code looks like. The module
tree then names blocks and stages and says which adjacent cut segments belong together.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from torch import fx

from qcli.quant import ops
from qcli.quant.capture import QuantGraph
from qcli.quant.modules import QConv2d, QLinear

GRANULARITIES = ("layer", "block", "stage")


@dataclass(frozen=True)
class Unit:
    name: str
    nodes: tuple[str, ...]  # fx node names, in execution order
    layers: tuple[str, ...]  # conv/linear module paths inside
    input: str  # the node whose output feeds the unit
    output: str  # the node whose output leaves the unit


def partition(qg: QuantGraph, granularity: str = "block") -> list[Unit]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}")
    gm = qg.module
    mods = dict(gm.named_modules())
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    segments = _single_tensor_segments(gm.graph, order)
    units = _attach_weightless(segments, mods)
    if granularity != "layer":  # layer units: the finest single-tensor cuts
        key = _block_key if granularity == "block" else _stage_key
        units = _merge_by_key(units, mods, qg.containers, key)
    return [_make_unit(u, mods) for u in units]


def _single_tensor_segments(graph: fx.Graph, order: list[fx.Node]) -> list[list[fx.Node]]:
    pos = {n: i for i, n in enumerate(order)}
    last_use = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = max(last_use.get(a, -1), pos.get(n, len(order)))
    segments, current, live = [], [], set()
    for i, n in enumerate(order):
        current.append(n)
        live.add(n)
        live = {m for m in live if last_use.get(m, -1) > i}
        if live <= {n} and batch_first(n):
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def _is_layer(n: fx.Node, mods: dict) -> bool:
    return n.op == "call_module" and isinstance(mods.get(n.target), QConv2d | QLinear)


def _attach_weightless(segments: list[list[fx.Node]], mods: dict) -> list[list[fx.Node]]:
    """Activations, quantizers and pools join the unit before them (the first: the one after)."""
    units: list[list[fx.Node]] = []
    pending: list[fx.Node] = []
    for seg in segments:
        if any(_is_layer(n, mods) for n in seg):
            units.append(pending + seg)
            pending = []
        elif units:
            units[-1].extend(seg)
        else:
            pending.extend(seg)
    if pending:
        units.append(pending)
    return units


def _module_path(n: fx.Node) -> str:
    return str(n.target)


def _block_key(path: str, containers: frozenset[str]) -> str:
    """The shallowest non-container module above a layer (a BasicBlock, an InvertedResidual)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix not in containers:
            return prefix
    return path


def _stage_key(path: str, containers: frozenset[str]) -> str:
    """The container holding a layer's block (`layer1`, `blocks.2`)."""
    block = _block_key(path, containers)
    return block.rpartition(".")[0] or block


def _merge_by_key(
    units: list[list[fx.Node]], mods: dict, containers: frozenset[str], key
) -> list[list[fx.Node]]:
    merged: list[list[fx.Node]] = []
    keys: list[str | None] = []
    for u in units:
        layers = [_module_path(n) for n in u if _is_layer(n, mods)]
        k = key(layers[0], containers) if layers else None
        if merged and k is not None and k == keys[-1] and k not in (layers[0],):
            merged[-1].extend(u)
        else:
            merged.append(list(u))
            keys.append(k)
    return merged


def _make_unit(nodes: list[fx.Node], mods: dict) -> Unit:
    names = tuple(n.name for n in nodes)
    inside = set(nodes)
    inputs = [a for n in nodes for a in n.all_input_nodes if a not in inside]
    layers = tuple(_module_path(n) for n in nodes if _is_layer(n, mods))
    return Unit(
        name=_common_prefix(layers) or names[0],
        nodes=names,
        layers=layers,
        input=inputs[0].name if inputs else "",
        output=nodes[-1].name,
    )


def _common_prefix(paths: tuple[str, ...]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    if len(paths) == 1:
        return paths[0]
    return ".".join(common) or f"{paths[0]}..{paths[-1]}"


def layer_units(qg: QuantGraph, segment: Unit) -> list[Unit]:
    """Each conv/linear of a segment, with the activation and quantizer it alone feeds.

    Inside a residual block these units are not single-tensor cuts (the skip stays live), so
    their inputs come from running the segment's prefix; see `prefix_unit`.
    """
    mods = dict(qg.module.named_modules())
    nodes = {n.name: n for n in qg.module.graph.nodes}
    inside = set(segment.nodes)
    units = []
    for name in segment.nodes:
        n = nodes[name]
        if not _is_layer(n, mods):
            continue
        run = [n]
        rows = rows_per_image(n.args[0])
        while len(run[-1].users) == 1:
            (user,) = run[-1].users
            if user.name not in inside or not _is_tail(user, mods, rows):
                break
            run.append(user)
        units.append(
            Unit(
                str(n.target),
                tuple(r.name for r in run),
                (str(n.target),),
                n.args[0].name,
                run[-1].name,
            )
        )
    return units


def rows_per_image(n: fx.Node) -> int | None:
    """How many rows of axis 0 each image owns in n's output (1 for an image-first tensor,
    the window count for Swin's windows), from the shapes capture saw at batch 1 and 2;
    None when axis 0 is not the batch (attention's stacked (3, B, heads, N, d))."""
    meta = n.meta.get("tensor_meta")
    if not hasattr(meta, "shape") or "shape2" not in n.meta or not meta.shape:
        return None
    one, two = tuple(meta.shape), tuple(n.meta["shape2"])
    return one[0] if two[0] == 2 * one[0] and one[1:] == two[1:] else None


def batch_first(n: fx.Node) -> bool:
    """Whether n's output holds one row per image on axis 0: caches index images there."""
    return rows_per_image(n) == 1


def _is_tail(n: fx.Node, mods: dict, rows: int | None) -> bool:
    """An op that may end a layer unit: it clips or moves one tensor and keeps the rows of
    the layer's input on axis 0, so inputs and targets index the same samples."""
    op = ops.classify(n, mods)
    return (
        rows is not None
        and rows_per_image(n) == rows
        and op is not None
        and op.kind in (ops.FUSABLE, ops.QUANT, ops.PASSTHROUGH)
    )


def prefix_unit(qg: QuantGraph, segment: Unit, node: str) -> Unit | None:
    """The part of a segment that computes `node` from the segment's input (None: the input)."""
    if node == segment.input:
        return None
    nodes = {n.name: n for n in qg.module.graph.nodes}
    inside = set(segment.nodes)
    needed, stack = set(), [nodes[node]]
    while stack:
        n = stack.pop()
        if n.name in inside and n.name not in needed:
            needed.add(n.name)
            stack.extend(n.all_input_nodes)
    order = tuple(name for name in segment.nodes if name in needed)
    return Unit(f"{segment.name}:{node}", order, (), segment.input, node)


def unit_module(qg: QuantGraph, unit: Unit) -> fx.GraphModule:
    """The unit as a runnable module of its own: input tensor in, output tensor out.

    It shares parameters and quantizers with `qg`, so optimizing it optimizes the model.
    """
    gm = qg.module
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if unit.input:
        env[nodes[unit.input]] = graph.placeholder("x")

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # constants (get_attr) the unit reads from outside
            if a.op != "get_attr":
                raise ValueError(f"unit {unit.name} reads {a.name}, which is not its input")
            env[a] = graph.node_copy(a)
        return env[a]

    for name in unit.nodes:
        n = nodes[name]
        env[n] = graph.node_copy(n, arg)
    graph.output(env[nodes[unit.output]])
    return fx.GraphModule(gm, graph)


def join_units(units: list[Unit], name: str | None = None) -> Unit:
    """Adjacent units (each reading the previous one's output) as one unit."""
    check_chain(units)
    return Unit(
        name=name or "+".join(u.name for u in units),
        nodes=tuple(n for u in units for n in u.nodes),
        layers=tuple(layer for u in units for layer in u.layers),
        input=units[0].input,
        output=units[-1].output,
    )


def check_chain(units: list[Unit]) -> None:
    """Units must feed each other in order, so one cached tensor carries the whole state."""
    for prev, nxt in pairwise(units):
        if nxt.input != prev.output:
            raise ValueError(f"unit {nxt.name} does not read the output of unit {prev.name}")
