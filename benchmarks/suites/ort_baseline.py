"""onnxruntime's own `quantize_static`, run as a peer baseline on the same FP32 ONNX and images.

Benchmarks put it beside qcli's export, so it uses the settings onnxruntime's fast x86 kernels
want (QDQ, uint8 activations, int8 per-channel weights) and quantizes every op it supports.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from qcli.errors import QcliError, UsageError

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class ArrayReader(CalibrationDataReader):
    """Feeds the given calibration batches to onnxruntime's calibrator, one batch per call."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name = input_name
        self.batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def input_name(path: Path) -> str:
    """The model's one graph input that is not an initializer."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise QcliError(f"file '{path}' is not a valid ONNX model ({exc})") from exc
    initializers = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    if len(names) != 1:
        raise QcliError(f"ONNX model '{path}' has {len(names)} inputs; expected one image")
    return names[0]


def _preprocess(src: Path, tmp: Path) -> Path:
    """onnxruntime's recommended pre-pass (shape inference, folding); the original on failure."""
    out = tmp / "preprocessed.onnx"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(out))
    except Exception as exc:  # it is an optimization only; quantizing without it still works
        warnings.warn(f"quant_pre_process failed on '{src}' ({exc}); using it as is", stacklevel=3)
        return src
    return out


def ort_quantize_static(
    fp32_onnx_path: str | Path,
    out_path: str | Path,
    calibration_batches: Sequence[np.ndarray],
    method: str = "minmax",
    per_channel: bool = True,
) -> Path:
    """Quantize an FP32 ONNX model with onnxruntime's `quantize_static`; returns `out_path`.

    QDQ format, QUInt8 activations, QInt8 weights, calibrated on `calibration_batches`
    (float32 NCHW arrays, already normalized) with `method` = minmax | entropy | percentile.
    """
    if method not in METHODS:
        raise UsageError(f"calibration method '{method}' is not one of {', '.join(METHODS)}")
    if not calibration_batches:
        raise UsageError("ort_quantize_static needs at least one calibration batch")
    src, out = Path(fp32_onnx_path), Path(out_path)
    if not src.is_file():
        raise QcliError(f"ONNX model file '{src}' does not exist")
    reader = ArrayReader(input_name(src), calibration_batches)
    with tempfile.TemporaryDirectory(prefix="qcli-ortq-") as tmp:
        model = _preprocess(src, Path(tmp))
        quantize_static(
            str(model),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=METHODS[method],
        )
    return out
