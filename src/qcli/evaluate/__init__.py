"""Accuracy, agreement, latency and size, measured the same way for torch and onnxruntime.

`ort_baseline` (onnxruntime's own `quantize_static`) is imported on demand by benchmarks.
"""

from qcli.evaluate.accuracy import Accuracy, accuracy
from qcli.evaluate.latency import LatencyStats, file_size, latency
from qcli.evaluate.ort import KernelCheck, OrtModel

__all__ = [
    "Accuracy",
    "KernelCheck",
    "LatencyStats",
    "OrtModel",
    "accuracy",
    "file_size",
    "latency",
]
