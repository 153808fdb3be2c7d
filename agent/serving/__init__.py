"""The socket server: HTTP/1.1 framing, the Open Inference Protocol v2 codec and routes."""
