"""Accuracy, agreement, latency and size, measured the same way for torch and onnxruntime."""

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
