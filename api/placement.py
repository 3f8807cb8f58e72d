"""Where a pool-wide load goes, decided from the nodes' catalogs. Pure functions: no I/O, no clock.

The rules, for a model that is not pinned to a node by the caller:
1. Loaded (or loading) somewhere: that node. It answers "already loaded" (or joins the load, or reloads in
   place with `force_reload`), so the pool never holds a second copy it did not ask for.
2. Otherwise, among the nodes that have the file and a backend that runs it (all that have it if none does):
   those where its estimate fits the free budget, most free first; then, with `evict`, those where it fits
   once unpinned models are evicted, most room first.
3. Nowhere: InsufficientMemory naming the best candidate (the most room) and the bytes it lacks.

The node re-checks admission under its own lock, so a stale catalog can only make a load fail, never
overcommit a node; the caller then tries the next candidate.
"""

from dataclasses import dataclass

from broker.errors import InsufficientMemory, ModelFileNotFound
from broker.schemas import ModelFile, ModelInfo, ModelState, NodeCatalog

ACTIVE = (ModelState.LOADED, ModelState.LOADING)


@dataclass(frozen=True)
class NodeView:
    """One online node as placement sees it."""

    fingerprint: str
    name: str
    catalog: NodeCatalog

    def file(self, model_id: str) -> ModelFile | None:
        return next((f for f in self.catalog.files if f.id == model_id), None)

    def model(self, model_id: str) -> ModelInfo | None:
        return next((m for m in self.catalog.models if m.id == model_id), None)

    def room(self, *, evict: bool) -> float:
        """Bytes a new load may take here: free budget, plus what eviction may reclaim if allowed."""
        memory = self.catalog.memory
        if memory.free_bytes is None:
            return float("inf")
        return memory.free_bytes + (memory.evictable_bytes if evict else 0)


@dataclass(frozen=True)
class Candidate:
    """A node to send the load to, and the path that makes it load the right file."""

    node: NodeView
    model_path: str | None
    """Set when the model is already there, so the node finds it whatever path it was loaded from."""


def plan_load(model_id: str, views: list[NodeView], *, evict: bool) -> list[Candidate]:
    """The nodes to try, best first. Raises ModelFileNotFound (no node has it) or InsufficientMemory."""
    holders = [(v, m) for v in views if (m := v.model(model_id)) is not None and m.state in ACTIVE]
    if holders:
        # Loaded beats loading; among equals, the node with the most room.
        holders.sort(key=lambda vm: (vm[1].state is not ModelState.LOADED, -vm[0].room(evict=False)))
        return [Candidate(v, m.path) for v, m in holders]
    having = [(v, f) for v in views if (f := v.file(model_id)) is not None]
    if not having:
        hint = (
            f"model ids leave out the .gguf: try {model_id.removesuffix('.gguf')!r}"
            if model_id.endswith(".gguf")
            else f"{model_id}.gguf in its models directory"
        )
        raise ModelFileNotFound(f"No online node has a model file for {model_id} ({hint}).", model=model_id)
    # Nodes with a backend for the file first; if none has one, a load still goes out and fails with the reason.
    having = [(v, f) for v, f in having if f.backend is not None] or having
    fits = [(v, f) for v, f in having if _need(f) <= v.room(evict=False)]
    fits.sort(key=lambda vf: -vf[0].room(evict=False))
    if evict:
        placed = {v.fingerprint for v, _ in fits}
        squeezed = [(v, f) for v, f in having if v.fingerprint not in placed and _need(f) <= v.room(evict=True)]
        fits += sorted(squeezed, key=lambda vf: -vf[0].room(evict=True))
    if fits:
        return [Candidate(v, None) for v, _ in fits]
    best, file = max(having, key=lambda vf: (vf[0].room(evict=evict) - _need(vf[1]), vf[0].fingerprint))
    raise shortfall(model_id, best, _need(file), evict=evict)


def _need(file: ModelFile) -> int:
    """The memory a load of `file` reserves. An unreadable file needs none: its node refuses it with the reason
    (and lists it `failed`), which is the answer the caller should get, not a 404 or a 409."""
    return file.estimate_bytes or 0


def shortfall(model_id: str, node: NodeView, needed: int, *, evict: bool) -> InsufficientMemory:
    """The 409 for a load that does not fit on `node`, the best candidate, with the figures."""
    memory = node.catalog.memory
    free = memory.free_bytes or 0
    room = free + (memory.evictable_bytes if evict else 0)
    short = max(needed - room, 0)
    after = " even after evicting its unpinned models" if evict else ""
    hint = "" if evict else " Unload a model, or pass evict: true to unload the least recently used ones."
    details: dict[str, object] = {
        "model": model_id,
        "node": node.fingerprint,
        "node_name": node.name,
        "needed_bytes": needed,
        "free_bytes": free,
        "budget_bytes": memory.budget_bytes,
        "shortfall_bytes": short,
    }
    if evict:
        details["evictable_bytes"] = memory.evictable_bytes
    return InsufficientMemory(
        f"Model {model_id} needs about {needed} bytes and fits on no node{after}; the best candidate, "
        f"node {node.name} ({node.fingerprint}), is {short} bytes short.{hint}",
        **details,
    )


def refused(model_id: str, fingerprint: str, name: str, error: InsufficientMemory) -> InsufficientMemory:
    """A node's own 409 (it filled up since its catalog, or it was named), with the pool's figures added."""
    needed, free = error.details.get("needed_bytes"), error.details.get("free_bytes")
    reclaimable = error.details.get("evictable_bytes", 0)
    short = needed - free - reclaimable if isinstance(needed, int) and isinstance(free, int) else None
    details = {**error.details, "model": model_id, "node": fingerprint, "node_name": name, "shortfall_bytes": short}
    return InsufficientMemory(f"Node {name} ({fingerprint}): {error.message}", **details)


def pool_state(states: list[ModelState]) -> ModelState:
    """One state for a model across nodes, in the contract's four values: loaded anywhere wins, then
    loading, then failed; a model that is unloading is on its way to unloaded."""
    for state in (ModelState.LOADED, ModelState.LOADING, ModelState.FAILED):
        if state in states:
            return state
    return ModelState.UNLOADED
