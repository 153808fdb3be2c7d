"""outpost-agent: serves ONNX model packages to local apps over a Unix socket.

The agent must stay small: it never imports `hub`, scikit-learn or skl2onnx.
"""

__version__ = "0.1.0"
