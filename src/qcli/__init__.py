"""qcli: quantize PyTorch vision models to ONNX QDQ that onnxruntime runs with integer kernels."""

__version__ = "0.1.0"
