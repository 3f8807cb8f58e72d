"""The fleet as one pool: every `/v1/models` operation asks all the nodes it needs at once.

Fan-outs run in parallel (`asyncio.gather` over `JobClient.run`), so a pool call takes about one node's round
trip. An offline node is never sent a job: `JobClient.run` refuses it at once with NodeOffline, which the pool
reports next to the answers of the others instead of waiting.

Fleet status sends no job to a node that has published its catalog to the registry (`broker.registry`: its
files, models and memory, kept current by the node itself and written before a job that changed them replies):
it is one registry read whatever the number of nodes. Only a node that has not published them yet (still
reading its directory, or an older version) is asked with a catalog job.
"""

import asyncio
from dataclasses import dataclass
from typing import Any

from api.jobs import JobClient
from api.placement import NodeView, plan_load, pool_state, refused
from api.schemas import PoolLoadRequest
from broker.answers import (
    NodeFailure,
    PoolLoadResult,
    PoolModel,
    PoolModelList,
    PoolNodeStatus,
    PoolStatus,
    PoolUnloadAllResult,
    PoolUnloadResult,
    SnakeMemoryInfo,
    SnakeModelInfo,
    StatusError,
)
from broker.errors import (
    InsufficientMemory,
    ModelFileNotFound,
    ModelfleetError,
    ModelNotLoaded,
    NodeOffline,
    NodeUnavailable,
)
from broker.operations import CATALOG, LIST, LOAD, UNLOAD, UNLOAD_ALL, J, Op, R
from broker.registry import NodeDirectory
from broker.schemas import LoadResult, ModelList, ModelState, NodeCatalog, NodeInfo

OWNER = "modelfleet"
"""OpenAI's `owned_by` of every model the pool lists."""


@dataclass
class Survey:
    """Every registered node with its catalog, or the reason it has none."""

    nodes: list[NodeInfo]
    catalogs: dict[str, NodeCatalog]
    failures: dict[str, ModelfleetError]

    def views(self) -> list[NodeView]:
        return [
            NodeView(n.fingerprint, n.name, self.catalogs[n.fingerprint])
            for n in self.nodes
            if n.online and n.fingerprint in self.catalogs
        ]

    def unreachable(self) -> list[NodeFailure]:
        """Online nodes that did not answer (offline ones are expected not to)."""
        return [
            failure(node, error.code, error.message)
            for node in self.nodes
            if (error := self.failures.get(node.fingerprint)) is not None and not isinstance(error, NodeOffline)
        ]


def failure(node: NodeInfo, code: str, message: str, model: str | None = None) -> NodeFailure:
    """One entry of an `errors` list: which node (and model) failed, and how."""
    return NodeFailure(node=node.fingerprint, node_name=node.name, model=model, code=code, error=message)


class Pool:
    """The `/v1/models` operations over the node directory and the job client."""

    def __init__(self, directory: NodeDirectory, jobs: JobClient) -> None:
        self._directory = directory
        self._jobs = jobs

    async def fan_out(self, nodes: list[NodeInfo], op: Op[J, R], **fields: Any) -> "dict[str, R | ModelfleetError]":
        """Run one job on each node in parallel; each node's result or its ModelfleetError."""
        outcomes = await asyncio.gather(*(self._jobs.run(node, op, **fields) for node in nodes), return_exceptions=True)
        found: dict[str, R | ModelfleetError] = {}
        for node, outcome in zip(nodes, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, ModelfleetError):
                raise outcome  # a bug, not a node's answer: let the API's handler log it
            found[node.fingerprint] = outcome
        return found

    async def survey(self) -> Survey:
        """Every node's catalog, asked with a job: what placement decides on."""
        return await self._ask(await self._directory.all(), {})

    async def published_survey(self) -> Survey:
        """Every node's catalog as it published it; a job only to the online nodes that have not."""
        found = await self._directory.with_catalogs()
        published = {node.fingerprint: catalog for node, catalog in found if node.online and catalog is not None}
        return await self._ask([node for node, _ in found], published)

    async def _ask(self, nodes: list[NodeInfo], known: dict[str, NodeCatalog]) -> Survey:
        outcomes = await self.fan_out([n for n in nodes if n.fingerprint not in known], CATALOG)
        catalogs: dict[str, NodeCatalog] = dict(known)
        failures: dict[str, ModelfleetError] = {}
        for fp, outcome in outcomes.items():
            if isinstance(outcome, ModelfleetError):
                failures[fp] = outcome
            else:
                catalogs[fp] = outcome
        return Survey(nodes, catalogs, failures)

    async def models(self) -> PoolModelList:
        survey = await self.survey()
        return PoolModelList(data=model_entries(survey.views()), errors=survey.unreachable())

    async def load(self, body: PoolLoadRequest, *, serving: bool = False) -> PoolLoadResult:
        """Place and load `body.model_name`. With `serving`, only nodes that serve an inference endpoint are
        candidates: a model loaded on demand for a prompt is no use on a node nobody can send the prompt to."""
        model = body.model_name
        fields: dict[str, Any] = {
            "model_id": model,
            "force_reload": body.force_reload,
            "evict": body.evict,
            "pin": body.pin,
            "keep_alive": body.keep_alive,
            "backend": body.backend,
        }
        if body.node is not None:
            node = await self._directory.get(body.node)
            try:
                result = await self._jobs.run(node, LOAD, **fields)
            except InsufficientMemory as exc:
                raise refused(model, node.fingerprint, node.name, exc) from None
            return load_reply(body, node.name, result)
        survey = await self.survey()
        views = survey.views()
        if not views:
            raise NodeUnavailable(f"No node is online to load {model} on.", unreachable=survey.unreachable())
        if serving:
            endpoints = {n.fingerprint for n in survey.nodes if n.endpoint}
            views = [view for view in views if view.fingerprint in endpoints]
            if not views:
                raise NodeUnavailable(
                    "No online node serves an inference endpoint (each was started with --no-serve or without "
                    "MODELFLEET_NODE_TOKEN / API keys), so no prompt could reach a model loaded there.",
                    model=model,
                )
        try:
            candidates = plan_load(model, views, evict=body.evict)
        except ModelFileNotFound as exc:
            if survey.unreachable():
                exc.details["unreachable"] = survey.unreachable()
            raise
        by_fp = {n.fingerprint: n for n in survey.nodes}
        last: InsufficientMemory | None = None
        for candidate in candidates:
            node = by_fp[candidate.node.fingerprint]
            try:
                result = await self._jobs.run(node, LOAD, **fields, model_path=candidate.model_path)
            except InsufficientMemory as exc:  # the node filled up since its catalog: try the next one
                last = refused(model, node.fingerprint, node.name, exc)
                continue
            return load_reply(body, node.name, result)
        assert last is not None
        raise last

    async def unload(self, model: str) -> PoolUnloadResult:
        nodes = [n for n in await self._directory.all() if n.online]
        lists = await self.fan_out(nodes, LIST)
        holders = [n for n in nodes if _holds(lists[n.fingerprint], model)]
        outcomes = await self.fan_out(holders, UNLOAD, model_id=model)
        done = [n for n in holders if not isinstance(outcomes[n.fingerprint], ModelfleetError)]
        # A node whose list failed may hold the model too: report it rather than leave it out silently.
        unlisted = [(n, e) for n in nodes if isinstance(e := lists[n.fingerprint], ModelfleetError)]
        errors: list[tuple[NodeInfo, ModelfleetError]] = unlisted + [
            (n, error)
            for n in holders
            if isinstance(error := outcomes[n.fingerprint], ModelfleetError) and not isinstance(error, ModelNotLoaded)
        ]
        if not done:
            if errors:
                raise errors[0][1]
            raise ModelNotLoaded(f"Model {model} is not loaded on any online node.", model=model)
        names = ", ".join(n.name for n in done)
        return PoolUnloadResult(
            status="partial" if errors else "success",
            model=model,
            message=f"Model {model} unloaded successfully (node{'s' if len(done) > 1 else ''} {names})",
            nodes=[n.fingerprint for n in done],
            errors=[failure(n, e.code, e.message, model) for n, e in errors],
        )

    async def unload_all(self) -> PoolUnloadAllResult:
        nodes = await self._directory.all()
        outcomes = await self.fan_out(nodes, UNLOAD_ALL)
        per_node: dict[str, list[str]] = {}
        errors: list[NodeFailure] = []
        for node in nodes:
            outcome = outcomes[node.fingerprint]
            if isinstance(outcome, ModelfleetError):
                errors.append(failure(node, outcome.code, outcome.message))
                continue
            per_node[node.fingerprint] = outcome.unloaded
            errors += [failure(node, e.code, e.error, e.model_id) for e in outcome.errors]
        unloaded = sorted({model for models in per_node.values() for model in models})
        # Offline nodes hold nothing in memory; only a live node's failure leaves models loaded.
        clean = all(e.code == NodeOffline.code for e in errors)
        return PoolUnloadAllResult(
            status="success" if clean else "partial",
            unloaded_models=unloaded,
            errors=errors,
            total_unloaded=len(unloaded),
            nodes=per_node,
        )

    async def status(self) -> PoolStatus:
        survey = await self.published_survey()
        views = survey.views()
        states = fleet_states(views)
        dirs = sorted({n.models_dir for n in survey.nodes if n.online})
        nodes: dict[str, PoolNodeStatus] = {}
        for node in survey.nodes:
            entry = PoolNodeStatus(name=node.name, online=node.online, models_dir=node.models_dir)
            catalog = survey.catalogs.get(node.fingerprint)
            if catalog is not None:
                models = [SnakeModelInfo.model_validate(m.model_dump()) for m in catalog.models]
                memory = SnakeMemoryInfo.model_validate(catalog.memory.model_dump())
                entry = entry.model_copy(update={"models": models, "memory": memory})
            else:
                error = survey.failures[node.fingerprint]
                entry = entry.model_copy(update={"error": StatusError(code=error.code, error=error.message)})
            nodes[node.fingerprint] = entry
        return PoolStatus(
            loaded=sorted(m for m, s in states.items() if s is ModelState.LOADED),
            loading_status=dict(sorted(states.items())),
            # The document's `repository` is one string: the directory every node shares, else the first of
            # them; `repositories` lists them all.
            repository=dirs[0] if dirs else None,
            repositories=dirs,
            nodes=nodes,
        )


def _holds(outcome: ModelList | ModelfleetError, model: str) -> bool:
    if isinstance(outcome, ModelfleetError):
        return False
    return any(m.id == model and m.state is not ModelState.FAILED for m in outcome.data)


def load_reply(body: PoolLoadRequest, node_name: str, result: LoadResult) -> PoolLoadResult:
    model = body.model_name
    if result.already_loaded:
        message = f"Model {model} was already loaded on node {node_name}"
    else:
        message = f"Model {model} loaded successfully on node {node_name}"
    if result.evicted:
        message += f" (evicted {', '.join(result.evicted)} to make room)"
    return PoolLoadResult(
        model=model,
        force_reload=body.force_reload,
        message=message,
        node=result.node,
        node_name=node_name,
        already_loaded=result.already_loaded,
        evicted=result.evicted,
    )


def fleet_states(views: list[NodeView]) -> dict[str, ModelState]:
    """Every model the answering nodes know (files and loaded models), in one pool-wide state each."""
    seen: dict[str, list[ModelState]] = {}
    for view in views:
        for file in view.catalog.files:
            seen.setdefault(file.id, [])
        for model in view.catalog.models:
            seen.setdefault(model.id, []).append(model.state)
    return {model: pool_state(states) for model, states in seen.items()}


def model_entries(views: list[NodeView]) -> list[PoolModel]:
    """`GET /v1/models` data: each model with the nodes that have its file and those where it is loaded."""
    states = fleet_states(views)
    entries = []
    for model in sorted(states):
        files = [(v, f) for v in views if (f := v.file(model)) is not None]
        loaded = [(v, m) for v in views if (m := v.model(model)) is not None and m.state is ModelState.LOADED]
        sizes = [f.size_bytes for _, f in files] or [m.size_bytes for _, m in loaded] or [0]
        since = [m.loaded_at for _, m in loaded if m.loaded_at is not None]
        entries.append(
            PoolModel(
                id=model,
                # OpenAI's fields, for openai-python's models.list(): when it was first loaded (0: not loaded).
                created=int(min(since).timestamp()) if since else 0,
                owned_by=OWNER,
                state=states[model],
                nodes=[v.fingerprint for v, _ in files],
                loaded_on=[v.fingerprint for v, _ in loaded],
                size_bytes=max(sizes),
                estimate_bytes=max((f.estimate_bytes for _, f in files if f.estimate_bytes), default=None),
                problem=next((f.problem for _, f in files if f.problem), None),
                backends=sorted({f.backend for _, f in files if f.backend is not None}),
            )
        )
    return entries
