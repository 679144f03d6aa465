"""Graph capture: trace a float model into the quantized simulation that export writes out.

Steps, each a small pass over a torch.fx graph:
1. rewrite modules fx or ONNX cannot take as they are (timm's dynamic 'same' padding conv,
   BatchNorm fused with its activation) into plain equivalents;
2. trace, with conv/linear/BN/activations/pools as leaves; a submodule fx cannot trace (Python
   control flow on values) becomes a float leaf, named in `QuantGraph.float_leaves`;
3. fold what depends on parameters only (Swin's relative position bias) into constants, and
   split scaled-dot-product attention into two MatMuls around a float softmax;
4. fold every BatchNorm that follows a conv into that conv;
5. mark an activation quantizer site wherever an integer deployment has one (ops.py says
   where): after every compute op, integer or float, so float ops run between
   DequantizeLinear and QuantizeLinear and data movement passes quantized values through;
6. resolve every quantizer's spec from the plan and the graph (`grid.resolve_specs`: which
   site feeds which layer decides its ±64 narrowing), then swap conv/linear for
   QConv2d/QLinear and each site for its Quantizer, built with that spec.
The result is the simulation: running it is running the quantized model.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import operator
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qcli.errors import QcliError, first_line
from qcli.quant import ops
from qcli.quant.grid import GraphFacts, LayerFacts, pairs_products, resolve_specs
from qcli.quant.modules import PaddedConv2d, QConv2d, QLinear
from qcli.quant.plan import WEIGHT_SUFFIX, QuantPlan
from qcli.quant.quantizer import Quantizer, QuantMode, quant_mode, set_mode
from qcli.quant.spec import BitConfig, QuantSpec

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Tracer(fx.Tracer):
    def __init__(self, float_leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.float_leaves = float_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if ops.module_op(m) is not None or qualname in self.float_leaves:
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class QuantGraph:
    """A traced, quantizer-equipped model plus the plan it was built from."""

    module: fx.GraphModule
    base_plan: QuantPlan
    input_shape: tuple[int, ...]  # (C, H, W)
    # Paths of Sequential/ModuleList/ModuleDict in the original model: fx flattens the module
    # tree into plain modules, and the partition needs to tell blocks from containers.
    containers: frozenset[str] = frozenset()
    # Submodules fx could not trace: they run in float as one op each (named for reports).
    float_leaves: tuple[str, ...] = ()
    # BatchNorm layers of the float model: BN tuning has running statistics to match only
    # where there were some (LayerNorm keeps none).
    batchnorm_layers: int = 0
    # What the grid resolver reads of the graph (`apply_plan` resolves a new plan with it).
    facts: GraphFacts = dataclasses.field(default_factory=lambda: GraphFacts((), ()))

    def op_report(self) -> dict[str, object]:
        """What runs where: compute ops in integer kernels against ops left in float, by name
        (passthrough data movement and quantizers are not compute)."""
        mods = dict(self.module.named_modules())
        integer, floating, where = 0, Counter(), []
        for n in self.module.graph.nodes:
            op = ops.classify(n, mods)
            if op is None or op.kind in (ops.PASSTHROUGH, ops.QUANT) or not _produces_tensor(n):
                continue
            if n.target is operator.getitem:
                continue  # one output of a float op counted already
            if op.name in ("relu", "relu6") or _kind(n, mods) == ops.FUSABLE:
                continue  # clips fused into the integer kernel before them
            if _runs_integer(n, op, mods, self.keep_fp):
                integer += 1
            else:
                floating[ops.op_label(n, mods)] += 1
                where.append(f"{ops.describe(n, mods)}: {ops.op_label(n, mods)}")
        total = integer + sum(floating.values())
        return {
            "compute_ops": total,
            "integer_ops": integer,
            "float_ops": dict(floating.most_common()),
            "float_nodes": where,
            "float_leaves": list(self.float_leaves),
        }

    @property
    def plan(self) -> QuantPlan:
        """The plan with every quantizer's current spec: capturing it again rebuilds this
        graph's quantizers exactly, including what calibration changed (widened grids)."""
        return dataclasses.replace(
            self.base_plan, specs={name: q.spec for name, q in self.quantizers()}
        )

    @property
    def bits(self) -> BitConfig:
        return self.base_plan.bits

    @property
    def keep_fp(self) -> tuple[str, ...]:
        return self.base_plan.keep_fp

    @property
    def int8_range(self) -> str:
        return self.base_plan.int8_range

    def min_act_bits(self) -> int:
        return min((q.spec.bits for _, q in self.act_quantizers()), default=self.bits.activation)

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)

    def layers(self) -> Iterator[tuple[str, QConv2d | QLinear]]:
        """Conv/linear layers in execution order, by module path."""
        mods = dict(self.module.named_modules())
        for n in self.module.graph.nodes:
            if n.op == "call_module" and isinstance(mods[n.target], QConv2d | QLinear):
                yield n.target, mods[n.target]

    @torch.no_grad()
    def layer_macs(self, x: Tensor) -> dict[str, int]:
        """Multiply-adds per image of every conv/linear layer (output elements x fan-in), from
        one forward pass of the first image of `x`."""
        macs: dict[str, int] = {}
        hooks = [
            layer.register_forward_hook(
                lambda m, a, y, n=name: macs.__setitem__(
                    n, (y.numel() // y.shape[0]) * m.weight[0].numel()
                )
            )
            for name, layer in self.layers()
        ]
        try:
            self.module(x[:1])
        finally:
            for h in hooks:
                h.remove()
        return macs

    def act_quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        mods = dict(self.module.named_modules())
        for n in self.module.graph.nodes:
            if n.op == "call_module" and isinstance(mods[n.target], Quantizer):
                yield n.target, mods[n.target]

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        for name, layer in self.layers():
            if layer.weight_quantizer is not None:
                yield f"{name}.weight_quantizer", layer.weight_quantizer
        yield from self.act_quantizers()

    def select(self, weights: bool = True, activations: bool = True) -> list[Quantizer]:
        """Weight and/or activation quantizers, for `quant_mode` and `set_mode`."""
        return [
            q
            for name, q in self.quantizers()
            if (weights if name.endswith(WEIGHT_SUFFIX) else activations)
        ]

    def to(self, device: torch.device | str) -> QuantGraph:
        self.module.to(device)
        return self


def capture(model: nn.Module, input_shape: tuple[int, ...], plan: QuantPlan) -> QuantGraph:
    """Build the quantized simulation of `model` (which is not modified) as `plan` says
    (`QuantPlan.uniform(BitConfig(w, a))` for one width everywhere).

    Layers in `plan.keep_fp` stay float with a float output; every quantizer gets the spec
    `grid.resolve_specs` gives it from the plan and the graph (which activation quantizer
    feeds which layer). A plan naming a layer or quantizer the model does not have is an
    error, not silently ignored.
    """
    keep = plan.keep_fp
    model = copy.deepcopy(model).float().eval()
    example = torch.zeros(1, *input_shape)
    _rewrite_modules(model, example)
    model.eval()  # rewritten modules are created in training mode
    containers = frozenset(
        name for name, m in model.named_modules() if isinstance(m, _CONTAINERS) and name
    )
    gm, float_leaves = _trace(model)
    values = _propagate_shapes(gm, example, keep_values=True)
    _fold_constants(gm, values)
    _bake_static_values(gm)
    _split_attention(gm)
    _propagate_shapes(gm, example)
    _check_layers(gm)
    _fold_batchnorm(gm)
    _check_names(gm, keep, "--keep-fp")
    _check_names(gm, tuple(dict(plan.weights)), "bit allocation")
    weight_specs = {
        k.removesuffix(WEIGHT_SUFFIX): s for k, s in plan.specs if k.endswith(WEIGHT_SUFFIX)
    }
    _check_names(gm, tuple(weight_specs), "plan")
    sites = _insert_act_sites(gm, plan)
    facts = _graph_facts(gm, sites)
    specs = resolve_specs(plan, facts)
    _quantize_layers(gm, specs)
    for name in sites:
        _set_module(gm, name, Quantizer(specs[name]))
    _link_input_quantizers(gm)
    gm.graph.lint()
    gm.recompile()
    _propagate_shapes(gm, example)
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return QuantGraph(gm, plan, tuple(input_shape), containers, float_leaves, batchnorms, facts)


def apply_plan(qg: QuantGraph, plan: QuantPlan) -> list[str]:
    """Give a captured graph's quantizers the specs `plan` resolves to (the int8 range's
    widened layers), through the same resolver as `capture`; returns the quantizers whose
    spec changed, whose ranges are then stale. The plan cannot change the graph's structure
    (which layers stay float): that takes a new capture."""
    if plan.keep_fp != qg.base_plan.keep_fp:
        raise ValueError("a new plan cannot change which layers stay float: capture again")
    specs = resolve_specs(plan, qg.facts)
    changed = []
    for name, q in qg.quantizers():
        if specs[name] != q.spec:
            if specs[name].per_channel != q.spec.per_channel:
                raise ValueError(f"{name}: a new plan cannot change a quantizer's granularity")
            q.spec = specs[name]
            changed.append(name)
    qg.base_plan = plan
    return changed


# -- 1. module rewrites ---------------------------------------------------------------------


def _rewrite_modules(model: nn.Module, example: Tensor) -> None:
    """Replace dynamic-'same' convs by convs with fixed pads, and BN+act by BN then act."""
    same_pads = _same_padding(model, example)
    for name, m in list(model.named_modules()):
        cls = type(m).__name__
        if cls == "Conv2dSame":
            conv = PaddedConv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                stride=m.stride,
                padding=0,
                dilation=m.dilation,
                groups=m.groups,
                bias=m.bias is not None,
            )
            conv.load_state_dict(m.state_dict())
            conv.pads = same_pads.get(name)
            _set_module(model, name, conv)
        elif cls == "BatchNormAct2d":
            bn = nn.BatchNorm2d(m.num_features, eps=m.eps, affine=m.affine)
            bn.load_state_dict(m.state_dict(), strict=False)
            act = m.act if isinstance(m.act, nn.Module) else nn.Identity()
            _set_module(model, name, nn.Sequential(bn, act))


def _same_padding(model: nn.Module, example: Tensor) -> dict[str, tuple[int, int, int, int]]:
    """Record the pads each TF-'same' conv computes for the model's fixed input size."""
    pads: dict[str, tuple[int, int, int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if type(m).__name__ == "Conv2dSame":

            def hook(mod, args, name=name):
                ih, iw = args[0].shape[-2:]
                (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
                ph = max((-(ih // -sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
                pw = max((-(iw // -sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
                pads[name] = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)

            hooks.append(m.register_forward_pre_hook(hook))
    if hooks:
        with torch.no_grad():
            model(example)
        for h in hooks:
            h.remove()
    return pads


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


# -- 2. trace -------------------------------------------------------------------------------


def _trace(model: nn.Module) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """Trace with fx; each submodule fx cannot follow becomes a float leaf (the deepest one
    that fails on its own), so only the model's own top-level control flow is refused."""
    for m in model.modules():
        ops.module_op(m)  # checks a conv/linear subclass's forward now, not while tracing
    leaves: set[str] = set()
    while True:
        try:
            graph = _Tracer(frozenset(leaves)).trace(model, concrete_args=_defaults(model))
            _drop_guards(graph)
            return fx.GraphModule(model, graph), tuple(sorted(leaves))
        except Exception as e:  # fx raises many types; the user needs the first line only
            culprit = _untraceable(model, "", leaves)
            if culprit is None:
                raise QcliError(
                    f"cannot trace model {type(model).__name__} into a graph "
                    f"({first_line(e)}); its top-level forward has data-dependent control "
                    "flow, which torch.fx cannot follow"
                ) from e
            leaves.add(culprit)


def _defaults(model: nn.Module) -> dict[str, object]:
    """Optional forward arguments after the image (timm's `attn_mask=None`) at their
    defaults: the deployed model takes one input."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    }


def _drop_guards(graph: fx.Graph) -> None:
    """Remove the placeholders of arguments fixed at their defaults with the checks fx adds
    on them: only the image is an input."""
    extra = [n for n in graph.nodes if n.op == "placeholder"][1:]
    closure = set(extra)
    for n in graph.nodes:
        if any(a in closure for a in n.all_input_nodes):
            closure.add(n)
    for n in reversed(list(graph.nodes)):  # users before what they use
        if n in closure:
            graph.erase_node(n)


def _untraceable(module: nn.Module, prefix: str, leaves: set[str]) -> str | None:
    """The path of a submodule that fx cannot trace alone, as deep as it goes."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if path in leaves or ops.module_op(child) is not None or _traces(child, path, leaves):
            continue
        return _untraceable(child, path, leaves) or path
    return None


def _traces(module: nn.Module, path: str, leaves: set[str]) -> bool:
    inner = frozenset(p.removeprefix(path + ".") for p in leaves if p.startswith(path + "."))
    try:
        _Tracer(inner).trace(module, concrete_args=_defaults(module))
    except Exception:
        return False
    return True


def _called_modules(gm: fx.GraphModule) -> Iterator[tuple[str, nn.Module]]:
    """Modules the graph calls (not the insides of float leaves)."""
    mods = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op == "call_module":
            yield n.target, mods[n.target]


def _check_layers(gm: fx.GraphModule) -> None:
    for name, m in _called_modules(gm):
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise QcliError(
                f"layer '{name}' ({type(m).__name__}) uses padding_mode other than zeros"
            )


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _fold_constants(gm: fx.GraphModule, values: dict[fx.Node, object]) -> None:
    """Replace tensors computed from parameters alone (an index into a bias table) by buffers:
    they are constants of the deployed model, and the exporter writes them as such."""
    dep = _input_dependent(gm)
    folded = 0
    for n in list(gm.graph.nodes):
        value = values.get(n)
        if n in dep or n.op == "get_attr" or not isinstance(value, Tensor):
            continue
        if not any(u in dep for u in n.users):
            continue
        name = f"_qcli_const_{folded}"
        folded += 1
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(n):
            const = gm.graph.get_attr(name)
        const.meta = dict(n.meta)
        n.replace_all_uses_with(const)
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()


_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _literal(v) -> bool:
    return isinstance(v, _LITERALS) or (isinstance(v, list | tuple) and all(_literal(x) for x in v))


def _bake_static_values(gm: fx.GraphModule) -> None:
    """Write shape arithmetic that does not depend on the batch (Swin's window padding, a
    head's dims) into its users as literals: the traced input size is fixed. Values that
    grow with the batch stay nodes; the exporter computes them at run time."""
    for n in list(gm.graph.nodes):
        if "value" not in n.meta or n.op == "placeholder":
            continue
        value = n.meta["value"]
        value = tuple(value) if isinstance(value, torch.Size) else value
        if not _literal(value) or n.meta["value"] != n.meta.get("value2"):
            continue
        for u in list(n.users):
            u.args = fx.node.map_arg(u.args, lambda a, n=n, v=value: v if a is n else a)
            u.kwargs = fx.node.map_arg(u.kwargs, lambda a, n=n, v=value: v if a is n else a)
    _local_reshapes(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()


_RESHAPES = {("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)}


def _local_reshapes(gm: fx.GraphModule) -> None:
    """A reshape to (B, N, C) with B read off another tensor's shape becomes (-1, N, C):
    the same op, without an argument from elsewhere in the graph, so a reconstruction unit
    holding the reshape runs on its own."""
    for n in gm.graph.nodes:
        if (n.op, n.target) not in _RESHAPES or "tensor_meta" not in n.meta:
            continue
        if not any(isinstance(a, fx.Node) for a in fx.node.map_aggregate(n.args[1:], lambda a: a)):
            continue
        one, two = tuple(n.meta["tensor_meta"].shape), n.meta["shape2"]
        dynamic = [i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b]
        if len(dynamic) == 1:
            shape = [-1 if i in dynamic else d for i, d in enumerate(one)]
            n.args = (n.args[0], tuple(shape))
            n.kwargs = {}


def _split_attention(gm: fx.GraphModule) -> None:
    """scaled_dot_product_attention(q, k, v) -> matmul(q, kᵀ), attention_softmax, matmul(·, v):
    the two products run in integer MatMul kernels, the softmax in float between them.
    Causal, dropout, GQA and boolean masks stay one float op."""
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not F.scaled_dot_product_attention:
            continue
        q, k, v = n.args[:3]
        kw = {**dict(zip(names, n.args[3:], strict=False)), **n.kwargs}
        mask = kw.get("attn_mask")
        if kw.get("dropout_p") or kw.get("is_causal") or kw.get("enable_gqa"):
            continue
        if isinstance(mask, fx.Node) and mask.meta["tensor_meta"].dtype == torch.bool:
            continue
        scale = kw.get("scale") or 1.0 / math.sqrt(q.meta["tensor_meta"].shape[-1])
        g = gm.graph
        with g.inserting_before(n):
            kt = g.call_method("transpose", (k, -2, -1))
            scores = g.call_function(torch.matmul, (q, kt))
            probs = g.call_function(ops.attention_softmax, (scores, float(scale), mask))
            out = g.call_function(torch.matmul, (probs, v))
        n.replace_all_uses_with(out)
        g.erase_node(n)
    gm.recompile()


class _Recorder(ShapeProp):
    """ShapeProp that also keeps the values of non-tensor nodes (shape arithmetic) in
    `meta[key]` and, given the input-`dependent` nodes, the tensors of all the others."""

    def __init__(self, gm: fx.GraphModule, key: str, dependent: set[fx.Node] | None) -> None:
        super().__init__(gm)
        self.key, self.dependent, self.values = key, dependent, {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, Tensor):
            if self.dependent is not None and n not in self.dependent:
                self.values[n] = result
        elif not _holds_tensor(result):
            n.meta[self.key] = result
        return result


def _holds_tensor(v) -> bool:
    return isinstance(v, Tensor) or (
        isinstance(v, list | tuple) and any(_holds_tensor(x) for x in v)
    )


def _propagate_shapes(
    gm: fx.GraphModule, example: Tensor, keep_values: bool = False
) -> dict[fx.Node, object]:
    """Shapes and non-tensor values of every node at batch 1, and the same at batch 2
    (`meta["shape2"]`, `meta["value2"]`), from which the exporter tells the batch axis."""
    quantizers = [m for m in gm.modules() if isinstance(m, Quantizer)]
    try:
        with torch.no_grad(), quant_mode(quantizers, QuantMode.OFF):
            rec = _Recorder(gm, "value", _input_dependent(gm) if keep_values else None)
            rec.propagate(example)
            shapes = {n: n.meta.get("tensor_meta") for n in gm.graph.nodes}
            _Recorder(gm, "value2", None).propagate(example.repeat(2, *[1] * (example.dim() - 1)))
            for n, meta in shapes.items():
                if meta is not None:
                    n.meta["shape2"] = _shapes(n.meta["tensor_meta"])
                    n.meta["tensor_meta"] = meta
    except Exception as e:
        raise QcliError(
            f"the model does not run on an input of shape {tuple(example.shape[1:])} "
            f"({first_line(e)}); check --image-size"
        ) from e
    return rec.values


def _shapes(meta):
    if hasattr(meta, "shape"):
        return tuple(meta.shape)
    return tuple(_shapes(m) for m in meta) if isinstance(meta, list | tuple) else None


def _produces_tensor(n: fx.Node) -> bool:
    return "tensor_meta" in n.meta


def _is_tensor(n: fx.Node) -> bool:
    return "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape")


# -- 3. BN folding --------------------------------------------------------------------------


def _fold_batchnorm(gm: fx.GraphModule) -> None:
    mods = dict(gm.named_modules())
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(mods[n.target], nn.BatchNorm2d):
            continue
        prev = n.args[0]
        if (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and isinstance(mods[prev.target], nn.Conv2d)
            and len(prev.users) == 1
        ):
            conv = mods[prev.target]
            fused = fuse_conv_bn_eval(conv, mods[n.target])  # a copy: keeps class and pads
            _set_module(gm, prev.target, fused)
            n.replace_all_uses_with(prev)
            gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()


# -- 4. weight quantizers -------------------------------------------------------------------


def _check_names(gm: fx.GraphModule, names: tuple[str, ...], flag: str) -> None:
    layers = {n for n, m in _called_modules(gm) if isinstance(m, nn.Conv2d | nn.Linear)}
    for name in names:
        if name not in layers:
            raise QcliError(
                f"{flag}: the model has no conv/linear layer named '{name}' "
                f"(layers are e.g. {', '.join(sorted(layers)[:3])})"
            )


def _quantize_layers(gm: fx.GraphModule, specs: dict[str, QuantSpec]) -> None:
    for name, m in list(_called_modules(gm)):
        if isinstance(m, QConv2d | QLinear):
            continue
        if isinstance(m, nn.Conv2d | nn.Linear):
            cls = QConv2d if isinstance(m, nn.Conv2d) else QLinear
            _set_module(gm, name, cls.from_float(m, specs.get(name + WEIGHT_SUFFIX)))


# -- 5. activation quantizers ---------------------------------------------------------------


class _Site(nn.Identity):
    """Where an activation quantizer goes, until the resolver has given it a spec."""


def _insert_act_sites(gm: fx.GraphModule, plan: QuantPlan) -> tuple[str, ...]:
    """Place an activation quantizer site after every value an integer kernel reads."""
    mods = dict(gm.named_modules())
    kinds = {n: _kind(n, mods) for n in gm.graph.nodes}
    floats = {n for n in gm.graph.nodes if kinds[n] == ops.COMPUTE and not _integer(n, mods)}
    named = {k for k, _ in plan.specs if not k.endswith(WEIGHT_SUFFIX)}
    inserted = []
    for n in list(gm.graph.nodes):
        if _needs_quantizer(n, kinds, plan.keep_fp, floats):
            name = f"act_quant.{n.name}"
            _insert_after(gm, n, _Site(), name)
            inserted.append(name)
    unknown = sorted((set(dict(plan.activations)) | named) - set(inserted))
    if unknown:
        raise QcliError(
            f"plan: the model has no activation quantizer named '{unknown[0]}' "
            f"(they are e.g. {', '.join(sorted(inserted)[:3])})"
        )
    return tuple(inserted)


def _graph_facts(gm: fx.GraphModule, sites: tuple[str, ...]) -> GraphFacts:
    """What the resolver needs of the graph: each conv/linear layer, whether its kernel pairs
    products, and the activation quantizer site feeding it (its last call's, as linked); the
    sites that quantize a model input."""
    mods = dict(gm.named_modules())
    layers, inputs = {}, []
    for n in gm.graph.nodes:
        m = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Conv2d | nn.Linear):
            source = _source_name(n.args[0], mods, _Site)
            layers[n.target] = LayerFacts(n.target, pairs_products(m), source)
        elif isinstance(m, _Site) and n.args[0].op == "placeholder":
            inputs.append(n.target)
    return GraphFacts(tuple(layers.values()), sites, tuple(inputs))


def _kind(n: fx.Node, mods: dict[str, nn.Module]) -> str | None:
    if n.op == "placeholder":
        return "input"
    if n.op == "output":
        return "output"
    if n.op == "get_attr" or not _is_tensor(n):
        return None
    op = ops.classify(n, mods)
    if op is not None and op.name == "hardtanh" and hardtanh_bounds(n, mods)[0] == 0:
        return ops.FUSABLE  # ReLU6 written as hardtanh(0, 6) clips like ReLU6
    return op.kind if op else None


def hardtanh_bounds(n: fx.Node, mods: dict[str, nn.Module]) -> tuple[float, float]:
    if n.op == "call_module":
        m = mods[n.target]
        return float(m.min_val), float(m.max_val)
    args = [*list(n.args[1:]), None, None]
    lo = args[0] if args[0] is not None else n.kwargs.get("min_val", -1.0)
    hi = args[1] if args[1] is not None else n.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


def _runs_integer(n: fx.Node, op: ops.Op, mods: dict[str, nn.Module], keep: tuple) -> bool:
    """Whether onnxruntime runs this compute op in an integer kernel: it has one, its layer
    is not kept float, and (but for MatMul, which onnxruntime also runs from integers to a
    float output) its output is requantized, directly or after a fused clip."""
    if not op.integer or (op.kind == ops.WEIGHTED and n.target in keep):
        return False
    if op.kind == ops.WEIGHTED or op.name == "matmul":
        return True
    while len(n.users) == 1 and _kind(next(iter(n.users)), mods) == ops.FUSABLE:
        (n,) = n.users
    return any(u.op == "call_module" and isinstance(mods[u.target], Quantizer) for u in n.users)


def _integer(n: fx.Node, mods: dict[str, nn.Module]) -> bool:
    op = ops.classify(n, mods)
    return op is not None and op.integer


def _needs_quantizer(n: fx.Node, kinds: dict, keep: tuple[str, ...], floats: set) -> bool:
    kind = kinds[n]
    if kind not in ("input", ops.WEIGHTED, ops.COMPUTE, ops.FUSABLE):
        return False
    if kind == ops.WEIGHTED and n.target in keep:
        return False
    if _feeds_only_output(n, kinds):
        return False  # logits stay float: no integer kernel consumes them
    if kind == ops.COMPUTE and _feeds_only(n, kinds, floats):
        # Only float ops read it (Swin's bias + mask adds before softmax): requantizing
        # would add error for no integer kernel, and DQ -> Softmax -> Q would become
        # onnxruntime's table-based QLinearSoftmax, which computes something else.
        return False
    fused = _sole_consumer_kind(n, kinds) == ops.FUSABLE
    return not (kind in (ops.WEIGHTED, ops.COMPUTE) and fused)


def _sole_consumer_kind(n: fx.Node, kinds: dict) -> str | None:
    """The kind of the one op consuming n, looking through no-op passthroughs (timm's
    conv -> bn -> drop_block (Identity) -> ReLU): an integer kernel still fuses the ReLU."""
    while len(n.users) == 1:
        (n,) = n.users
        if kinds.get(n) != ops.PASSTHROUGH:
            return kinds.get(n)
    return None


def _feeds_only(n: fx.Node, kinds: dict, consumers: set) -> bool:
    """Whether every op reading n, through passthroughs, is in `consumers`."""
    return bool(n.users) and all(
        u in consumers or (kinds.get(u) == ops.PASSTHROUGH and _feeds_only(u, kinds, consumers))
        for u in n.users
    )


def _feeds_only_output(n: fx.Node, kinds: dict) -> bool:
    return all(
        kinds.get(u) == "output"
        or (kinds.get(u) == ops.PASSTHROUGH and _feeds_only_output(u, kinds))
        for u in n.users
    )


def _insert_after(gm: fx.GraphModule, n: fx.Node, module: nn.Module, name: str) -> fx.Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(n):
        q = gm.graph.call_module(name, (n,))
    n.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
    return q


def source_quantizer(n: fx.Node, mods: dict[str, nn.Module]) -> Quantizer | None:
    """The activation quantizer whose grid a node's input is on (through passthrough ops)."""
    name = _source_name(n, mods, Quantizer)
    return None if name is None else mods[name]


def _source_name(n: fx.Node, mods: dict[str, nn.Module], kind: type[nn.Module]) -> str | None:
    """The module of type `kind` (a quantizer or its site) a node's input comes from."""
    while isinstance(n, fx.Node):
        if n.op == "call_module" and isinstance(mods.get(n.target), kind):
            return n.target
        op = ops.classify(n, mods) if n.op != "placeholder" else None
        if op is None or op.kind != ops.PASSTHROUGH:
            return None
        n = n.args[0]
    return None


def _link_input_quantizers(gm: fx.GraphModule) -> None:
    mods = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(mods[n.target], QConv2d | QLinear):
            mods[n.target].link_input_quantizer(source_quantizer(n.args[0], mods))


def set_float(qg: QuantGraph) -> None:
    """Every quantizer off for good: the float model inside the quantized graph."""
    set_mode(qg.select(), QuantMode.OFF)
