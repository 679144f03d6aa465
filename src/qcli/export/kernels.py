"""What onnxruntime's integer kernels compute on each CPU, and which files are exact on all.

onnxruntime runs a QDQ conv / matmul with uint8 activations and int8 weights (u8×s8) through
MLAS. Where the CPU has a dot-product instruction that accumulates in int32 (AVX-512 VNNI,
AVX-VNNI, AMX, ARM's dot product) the result is exact. On x86 without one (AVX2; AVX-512
without VNNI) MLAS multiplies with VPMADDUBSW, which adds *adjacent pairs* of u8×s8 products
into a saturating int16: 255·(127 + 127) = 64,770 clips at 32,767, and the layer computes
something else than the QDQ reference. Two products never overflow when

    a_max · (|w_i| + |w_j|) <= 32,767      for every pair of weights of an output channel,

with a_max the largest uint8 code the input can hold (255, less below 8-bit activations).
Which weights MLAS pairs depends on its packing, so the check uses the two largest |w| of
each output channel: safe for any pairing. Depthwise convs (one input and one output channel
per group) go to a kernel that does not pair products (measured on AVX2: exact); uint8 weights
(u8×u8) are widened to int16 and multiplied with VPMADDWD, which never saturates.

qcli keeps every file inside that bound (see `quant.spec.SAFE_INT8_LIMIT`), so one file is
exact on every CPU; `pair_sum_violations` checks a file statically, whatever CPU runs it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# The pair-sum rule is the grid resolver's (it narrows and stores grids by it); this module
# applies it to files and CPUs.
from qcli.quant.grid import INT16_MAX, U8_MAX, max_pair_sum

# CPU integer-kernel classes, as `cpu_kernel_class` names them.
AVX2 = "avx2"
AVX512 = "avx512"  # AVX-512 BW without VNNI: MLAS still uses VPMADDUBSW
AVX512_VNNI = "avx512-vnni"
AVX_VNNI = "avx-vnni"
AMX = "amx"
ARM_DOT = "arm-dotprod"
ARM = "arm"
OTHER = "unknown"

# Classes whose u8×s8 kernels accumulate in int32: a file exact there may saturate elsewhere.
INT32_ACCUMULATING = (AVX512_VNNI, AVX_VNNI, AMX, ARM_DOT, ARM)
SATURATING = (AVX2, AVX512)
ALL_CLASSES = (AVX2, AVX512, AVX512_VNNI, AVX_VNNI, AMX, ARM_DOT, ARM)


def kernel_class_from_flags(flags: set[str], machine: str) -> str:
    """The integer-kernel class of a CPU from its feature flags (as /proc/cpuinfo spells them)."""
    if machine.lower() in ("aarch64", "arm64"):
        return ARM_DOT if {"asimddp", "dotprod"} & flags else ARM
    if "amx_int8" in flags:
        return AMX
    if "avx512_vnni" in flags:
        return AVX512_VNNI
    if "avx_vnni" in flags:
        return AVX_VNNI
    if "avx512bw" in flags:
        return AVX512
    if "avx2" in flags:
        return AVX2
    return OTHER


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_kernel_class() -> str:
    """This machine's class; Apple silicon (no /proc/cpuinfo) always has the dot product.

    QCLI_CPU_CLASS overrides the detection where /proc/cpuinfo does not describe the CPU
    that onnxruntime sees (an emulator such as `qemu-x86_64 -cpu Haswell`).
    """
    forced = os.environ.get("QCLI_CPU_CLASS")
    if forced:
        return forced
    machine = platform.machine()
    flags = _cpu_flags()
    if not flags and platform.system() == "Darwin" and machine == "arm64":
        return ARM_DOT
    return kernel_class_from_flags(flags, machine)


def saturates(kernel_class: str) -> bool:
    """Whether u8×s8 kernels on this class can saturate (unknown CPUs: assume they can)."""
    return kernel_class not in INT32_ACCUMULATING


@dataclass(frozen=True)
class PairSumViolation:
    """A u8×s8 layer of an ONNX file whose int16 pair sums can saturate."""

    node: str
    worst_pair_sum: int
    act_max: int


def pair_sum_violations(model: onnx.ModelProto | str | Path) -> list[PairSumViolation]:
    """Every u8×s8 Conv/Gemm/MatMul whose worst pair sum exceeds int16 (a static property),
    and every activation × activation MatMul with a signed input.

    Looks at the integers stored in the file: the weight DequantizeLinear's int8 initializer
    and the uint8 QuantizeLinear (behind an optional Clip) that feeds the input.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        if n.op_type == "MatMul" and _int_weight(producer, inits, n.input[1]) is None:
            v = _activation_product(n, producer, inits)
            if v is not None:
                out.append(v)
            continue
        w = _int_weight(producer, inits, n.input[1])
        a_max = _uint8_input_max(producer, inits, n.input[0])
        if w is None or w.dtype != np.int8 or a_max is None:
            continue
        if _weight_is_in_by_out(n, producer):
            w = w.T  # output channels on axis 0, as max_pair_sum wants
        if n.op_type == "Conv" and _is_depthwise(n, w):
            continue
        worst = max_pair_sum(w, a_max)
        if worst > INT16_MAX:
            out.append(PairSumViolation(n.name or n.output[0], worst, a_max))
    return out


def _activation_product(n: onnx.NodeProto, producer: dict, inits: dict) -> PairSumViolation | None:
    """An activation × activation MatMul (attention): exact everywhere when both inputs are
    uint8 (MLAS widens u8×u8 to int16 and never saturates); a signed input makes it u8×s8 or
    s8×s8, whose pair sums can reach 2·255·128 and saturate int16 on AVX2."""
    dtypes = [_activation_dtype(producer, inits, name) for name in n.input[:2]]
    if None in dtypes or all(d == np.uint8 for d in dtypes):
        return None
    worst = 2 * U8_MAX * 128
    return PairSumViolation(n.name or n.output[0], worst, U8_MAX)


def _activation_dtype(producer: dict, inits: dict, name: str):
    """The integer type of a quantized activation input (through data movement), or None."""
    node = producer.get(name)
    while node is not None and node.op_type in ("Transpose", "Reshape", "Identity"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    zp = inits.get(node.input[2])
    return None if zp is None else numpy_helper.to_array(zp).dtype


def _weight_is_in_by_out(n: onnx.NodeProto, producer: dict) -> bool:
    """Whether the stored weight of a MatMul/Gemm is (in, out): MatMul's, unless it reaches
    the node through a Transpose (as qcli writes it); Gemm's unless transB is set."""
    if n.op_type == "MatMul":
        node = producer.get(n.input[1])
        return node is None or node.op_type != "Transpose"
    if n.op_type == "Gemm":
        return not next((a.i for a in n.attribute if a.name == "transB"), 0)
    return False


def _is_depthwise(n: onnx.NodeProto, w: np.ndarray) -> bool:
    group = next((a.i for a in n.attribute if a.name == "group"), 1)
    return group > 1 and w.shape[1] == 1 and w.shape[0] == group


def _int_weight(producer: dict, inits: dict, name: str) -> np.ndarray | None:
    """The integer tensor behind a weight input (through a Transpose, as qcli writes MatMul)."""
    node = producer.get(name)
    if node is not None and node.op_type == "Transpose":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
        return None
    return numpy_helper.to_array(inits[node.input[0]])


def _uint8_input_max(producer: dict, inits: dict, name: str) -> int | None:
    """Largest uint8 code of a QDQ activation input (smaller when a Clip narrows the grid)."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in inits:
        return None
    zp = numpy_helper.to_array(inits[q.input[2]])
    if zp.dtype != np.uint8:
        return None
    a_max = U8_MAX
    clip = producer.get(q.input[0])
    if clip is not None and clip.op_type == "Clip" and len(clip.input) >= 3:
        hi, scale = inits.get(clip.input[2]), inits.get(q.input[1])
        if hi is not None and scale is not None:
            code = float(numpy_helper.to_array(hi)) / float(numpy_helper.to_array(scale))
            a_max = min(U8_MAX, int(np.floor(code + 0.5 + 1e-6)) + int(zp.reshape(-1)[0]))
    return a_max
