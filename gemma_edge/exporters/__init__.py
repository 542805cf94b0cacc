"""Exporters: the model traced and lowered to ExecuTorch (.pte) and ONNX."""
