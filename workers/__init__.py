"""A modelfleet node: a Celery worker that holds GGUF models in its own process memory."""
