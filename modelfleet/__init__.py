"""The `modelfleet` command: runs the head, a node, or both with an embedded Redis (`modelfleet up`)."""
