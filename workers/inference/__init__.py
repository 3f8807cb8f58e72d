"""Inference on a node: the backend-neutral model interface, the text layer above it, and the HTTP endpoint."""
