"""Export of optimized models (ONNX / ONNX Runtime, TensorRT)."""
