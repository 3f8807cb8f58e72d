"""The modelfleet head: a FastAPI app that validates, authenticates and sends jobs to node queues."""
