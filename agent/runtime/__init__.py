"""onnxruntime sessions, micro-batching and the set of loaded model versions."""
