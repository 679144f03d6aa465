"""An onnxruntime session that behaves like a torch model: tensor in, logits tensor out.

Wrapping the session this way lets `accuracy` and `latency` measure the deployed file with
exactly the code that measures the PyTorch simulation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from qcli.errors import QcliError, UsageError, first_line

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_DEVICES = ("cpu", "cuda", "auto")


def _providers(device: str) -> list[str]:
    """CPU unless CUDA is asked for; 'auto' takes CUDA only when this onnxruntime has it."""
    if device not in _DEVICES:
        raise UsageError(f"device '{device}' is not one of {', '.join(_DEVICES)}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise QcliError(
            "device 'cuda' was asked for but this onnxruntime only has " + ", ".join(available)
        )
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session_options(threads: int | None, optimize: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def _check_file(path: Path) -> None:
    if not path.exists():
        raise QcliError(f"ONNX model file '{path}' does not exist")
    if not path.is_file():
        raise QcliError(f"ONNX model path '{path}' is not a file")


class OrtModel:
    """Callable onnxruntime model: `OrtModel("m.onnx")(x) -> logits`.

    Graph optimizations are on (that is what a deployment runs: QDQ fused into integer
    kernels); `optimize=False` runs the QDQ reference arithmetic instead (float ops on
    dequantized values), the same on every CPU. A model exported with a fixed batch size still
    accepts any batch: the input is run in chunks of that size.
    """

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        device: str = "cpu",
        optimize: bool = True,
    ):
        self.path = Path(path)
        _check_file(self.path)
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                _session_options(threads, optimize),
                providers=_providers(device),
            )
        except QcliError:
            raise
        except Exception as exc:  # onnxruntime raises its own untyped pybind errors
            reason = first_line(exc)
            raise QcliError(
                f"file '{self.path}' is not a valid ONNX model onnxruntime can load ({reason})"
            ) from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise QcliError(
                f"ONNX model '{self.path}' has {len(inputs)} inputs; expected one image"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = self.session.get_outputs()[0].name
        self.input_shape: list[int | str | None] = list(inputs[0].shape)
        self.providers: list[str] = self.session.get_providers()
        self._dtype = _DTYPES.get(inputs[0].type, np.float32)
        batch = self.input_shape[0] if self.input_shape else None
        self.fixed_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self._dtype)
        if self.fixed_batch is None or arr.shape[0] == self.fixed_batch:
            out = self._run(arr)
        else:
            out = self._run_chunked(arr, self.fixed_batch)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _run(self, arr: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: arr})[0]

    def _run_chunked(self, arr: np.ndarray, size: int) -> np.ndarray:
        """Run a fixed-batch model over any batch, zero-padding the last chunk."""
        outs = []
        for start in range(0, arr.shape[0], size):
            chunk = arr[start : start + size]
            n = chunk.shape[0]
            if n < size:
                pad = np.zeros((size - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(self._run(chunk)[:n])
        return np.concatenate(outs)

    def __repr__(self) -> str:
        return f"OrtModel('{self.path}', providers={self.providers})"


def run_with_tensors(
    path: Path, x: torch.Tensor, names: list[str], threads: int | None = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Logits and the named intermediate tensors of an ONNX file under onnxruntime's integer
    kernels (graph optimizations on), as float32 tensors. A name no node of the file
    produces (a quantizer the file lost) comes back as None."""
    model = onnx.load(str(path))
    produced = {o for n in model.graph.node for o in n.output}
    present = [n for n in names if n in produced]
    for name in present:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(
        model.SerializeToString(), _session_options(threads), providers=["CPUExecutionProvider"]
    )
    arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    outs = session.run(None, {session.get_inputs()[0].name: arr})
    tensors = dict.fromkeys(names)
    for name, out in zip(present, outs[1:], strict=True):
        tensors[name] = torch.from_numpy(np.asarray(out).astype(np.float32))
    return torch.from_numpy(np.asarray(outs[0], dtype=np.float32)), tensors


class KernelCheck:
    """Runs an ONNX file with onnxruntime's integer kernels (returned, as deployed) and with
    its reference arithmetic (graph optimizations off), counting images whose top-1 differs.

    A share near 0 means this CPU's integer arithmetic is the simulated one. The reference
    path convolves dequantized values in float, so values within float error of a rounding
    boundary can land one step apart: a few flips (well under 1-2%) remain even where nothing
    saturates; a CPU whose int16 pair sums saturate changes many more.
    """

    def __init__(self, fused: OrtModel, threads: int | None = None) -> None:
        self.fused = fused
        self.reference = OrtModel(fused.path, threads=threads, optimize=False)
        self.images = 0
        self.changed = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out, ref = self.fused(x), self.reference(x)
        self.images += int(x.shape[0])
        self.changed += int((out.argmax(1) != ref.argmax(1)).sum())
        return out

    def to_dict(self) -> dict[str, Any]:
        pct = 100.0 * self.changed / self.images if self.images else None
        return {"images": self.images, "changed": self.changed, "changed_pct": pct}
