"""Graph capture: trace a float model into the quantized simulation that export writes out.

Steps, each a small pass over a torch.fx graph:
1. rewrite modules fx or ONNX cannot take as they are (timm's dynamic 'same' padding conv,
   BatchNorm fused with its activation) into plain equivalents;
2. trace, with conv/linear/BN/activations/pools as leaves;
3. fold every BatchNorm that follows a conv into that conv;
4. swap conv/linear for QConv2d/QLinear (weight quantizers);
5. insert an activation quantizer wherever an integer deployment has one (ops.py says where).
The result is the simulation: running it is running the quantized model.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qcli.errors import QcliError
from qcli.quant import ops
from qcli.quant.modules import PaddedConv2d, QConv2d, QLinear
from qcli.quant.plan import WEIGHT_SUFFIX, QuantPlan
from qcli.quant.quantizer import Quantizer, QuantMode, quant_mode, set_mode
from qcli.quant.spec import (
    SAFE_INT8_LIMIT,
    BitConfig,
    QuantSpec,
    activation_spec,
    weight_spec,
)

_LEAVES = tuple(cls for cls, _ in ops._MODULES)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _LEAVES):
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


def capture(
    model: nn.Module, input_shape: tuple[int, ...], plan: QuantPlan | BitConfig
) -> QuantGraph:
    """Build the quantized simulation of `model` (which is not modified) as `plan` says.

    A `BitConfig` means the uniform plan of those widths. Layers in `plan.keep_fp` stay float
    with a float output; a quantizer named in `plan.specs` gets exactly that spec (a reloaded
    .qcli); otherwise weights get `plan.layer_weight_bits` on the grid `safe_weight_spec`
    picks for their input, activations `plan.act_quantizer_bits`. A plan naming a layer or
    quantizer the model does not have is an error, not silently ignored.
    """
    if isinstance(plan, BitConfig):
        plan = QuantPlan.uniform(plan)
    keep = plan.keep_fp
    model = copy.deepcopy(model).float().eval()
    example = torch.zeros(1, *input_shape)
    _rewrite_modules(model, example)
    model.eval()  # rewritten modules are created in training mode
    containers = frozenset(
        name for name, m in model.named_modules() if isinstance(m, _CONTAINERS) and name
    )
    gm = _trace(model)
    _check_supported(gm, example)
    _fold_batchnorm(gm)
    _check_names(gm, keep, "--keep-fp")
    _check_names(gm, tuple(dict(plan.weights)), "bit allocation")
    weight_specs = {
        k.removesuffix(WEIGHT_SUFFIX): s for k, s in plan.specs if k.endswith(WEIGHT_SUFFIX)
    }
    _check_names(gm, tuple(weight_specs), "plan")
    specs = {
        name: weight_specs.get(name) or weight_spec(plan.layer_weight_bits(name))
        for name, m in gm.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and name not in keep
    }
    _quantize_layers(gm, specs)
    _insert_act_quantizers(gm, plan)
    _link_input_quantizers(gm)
    _narrow_weights(gm, plan, set(weight_specs))
    gm.graph.lint()
    gm.recompile()
    _propagate_shapes(gm, example)
    return QuantGraph(gm, plan, tuple(input_shape), containers)


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


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types; the user needs the first line only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QcliError(
            f"cannot trace model {type(model).__name__} into a graph ({first}); models with "
            "data-dependent control flow are not supported"
        ) from e
    return fx.GraphModule(model, graph)


def _check_supported(gm: fx.GraphModule, example: Tensor) -> None:
    """Refuse, by layer name, any tensor op the quantizer and exporter do not know."""
    _propagate_shapes(gm, example)
    mods = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if not _is_tensor(n) and n.op != "call_module":  # layers returning tuples: refused
            continue
        op = ops.classify(n, mods)
        if op is None:
            raise QcliError(f"{ops.describe(n, mods)} is not supported by qcli's quantizer")
        if op.name == "conv" and mods[n.target].padding_mode != "zeros":
            raise QcliError(f"{ops.describe(n, mods)} uses padding_mode other than zeros")


def _propagate_shapes(gm: fx.GraphModule, example: Tensor) -> None:
    quantizers = [m for m in gm.modules() if isinstance(m, Quantizer)]
    try:
        with torch.no_grad(), quant_mode(quantizers, QuantMode.OFF):
            ShapeProp(gm).propagate(example)
    except Exception as e:
        raise QcliError(
            f"the model does not run on an input of shape {tuple(example.shape[1:])} "
            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
            "check --image-size"
        ) from e


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
    layers = {n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    for name in names:
        if name not in layers:
            raise QcliError(
                f"{flag}: the model has no conv/linear layer named '{name}' "
                f"(layers are e.g. {', '.join(sorted(layers)[:3])})"
            )


def pairs_products(m: nn.Module) -> bool:
    """Whether onnxruntime's u8×s8 kernel for this layer adds products in int16 pairs.

    Every conv and linear does, except depthwise convs (one input and one output channel per
    group), which onnxruntime runs through a kernel that accumulates each product in int32.
    """
    if isinstance(m, nn.Conv2d):
        return not (m.in_channels == m.groups == m.out_channels and m.groups > 1)
    return isinstance(m, nn.Linear)


def safe_weight_spec(m: nn.Module, bits: int, act_bits: int, int8_range: str) -> QuantSpec:
    """The weight grid of a layer: 8-bit weights fed by 8-bit activations that onnxruntime
    pairs in int16 stay within ±SAFE_INT8_LIMIT under 'safe' (below 8 activation bits the
    uint8 codes stay under 128, and 127 · (127 + 127) already fits int16)."""
    narrow = int8_range == "safe" and bits == 8 and act_bits == 8 and pairs_products(m)
    return weight_spec(bits, limit=SAFE_INT8_LIMIT if narrow else None)


def _narrow_weights(gm: fx.GraphModule, plan: QuantPlan, exact: set[str]) -> None:
    """Give each weight quantizer without an exact spec the grid its input allows: the
    narrowing depends on the bits of the activation quantizer feeding the layer."""
    for name, m in gm.named_modules():
        if (
            isinstance(m, QConv2d | QLinear)
            and m.weight_quantizer is not None
            and name not in exact
        ):
            iq = m.input_quantizer
            act_bits = iq.spec.bits if iq is not None else plan.act_bits
            spec = m.weight_quantizer.spec
            m.weight_quantizer.spec = safe_weight_spec(m, spec.bits, act_bits, plan.int8_range)


def _quantize_layers(gm: fx.GraphModule, specs: dict[str, QuantSpec]) -> None:
    for name, m in list(gm.named_modules()):
        if isinstance(m, QConv2d | QLinear):
            continue
        if isinstance(m, nn.Conv2d | nn.Linear):
            cls = QConv2d if isinstance(m, nn.Conv2d) else QLinear
            _set_module(gm, name, cls.from_float(m, specs.get(name)))


# -- 5. activation quantizers ---------------------------------------------------------------


def _insert_act_quantizers(gm: fx.GraphModule, plan: QuantPlan) -> None:
    mods = dict(gm.named_modules())
    kinds = {n: _kind(n, mods) for n in gm.graph.nodes}
    named = {k: s for k, s in plan.specs if not k.endswith(WEIGHT_SUFFIX)}
    inserted = set()
    for n in list(gm.graph.nodes):
        if _needs_quantizer(n, kinds, plan.keep_fp):
            name = f"act_quant.{n.name}"
            bits = plan.act_quantizer_bits(name)
            spec = named.get(name) or activation_spec(bits, plan.signed_activations)
            _insert_after(gm, n, Quantizer(spec), name)
            inserted.add(name)
    unknown = sorted((set(dict(plan.activations)) | set(named)) - inserted)
    if unknown:
        raise QcliError(
            f"plan: the model has no activation quantizer named '{unknown[0]}' "
            f"(they are e.g. {', '.join(sorted(inserted)[:3])})"
        )


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


def _needs_quantizer(n: fx.Node, kinds: dict, keep: tuple[str, ...]) -> bool:
    kind = kinds[n]
    if kind not in ("input", ops.WEIGHTED, ops.COMPUTE, ops.FUSABLE):
        return False
    if kind == ops.WEIGHTED and n.target in keep:
        return False
    if _feeds_only_output(n, kinds):
        return False  # logits stay float: no integer kernel consumes them
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
    while isinstance(n, fx.Node):
        if n.op == "call_module" and isinstance(mods.get(n.target), Quantizer):
            return mods[n.target]
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
