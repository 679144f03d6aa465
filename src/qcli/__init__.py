"""qcli: quantize PyTorch vision models to ONNX QDQ that onnxruntime runs with integer kernels."""

import os

# OpenMP threads that spin while waiting turn small tensor ops 20x slower as soon as another
# process shares the cores (measured: MSE range search 6.4 s vs 0.4 s on a busy 2-core
# machine). Set before torch loads; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
