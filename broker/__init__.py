"""The contract between the API head and the worker nodes.

Everything that crosses Redis is defined here: the Celery app, key/queue/channel names, message schemas,
the error tree, the node registry and settings. This package imports neither `api` nor `workers`.
"""

__version__ = "0.1.0"
