"""Turns a fitted scikit-learn pipeline into an Outpost model package (int8 ONNX + manifest)."""
