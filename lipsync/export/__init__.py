"""Exported models: ONNX export, the ONNX Runtime engine, TensorRT engine builds."""
