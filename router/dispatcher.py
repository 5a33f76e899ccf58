"""The token-level all-to-all: one MoE layer's rows → the workers holding their experts → summed partials.

Three steps per layer, each its own function: `route` (pure: which rows go to which shard, a row whose
two experts sit on one shard is sent once with both ids), the exchange (one message per shard, all shards
at once, each with a deadline, over a `ReplicaChannel`; a failed call is retried once on another replica
of the shard; when none answers, `ShardUnavailable` names the shard), and `combine` (the partial sums
added per row). Replicas are checked against the placement (their `Info`) before first use and after
every failure; one that holds the wrong model, dtype or experts is refused until it matches again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from grokserve.model.config import GrokConfig
from grokserve.router.metrics import RouterMetrics
from grokserve.router.settings import DispatchSettings
from grokserve.transport import wire
from grokserve.transport.channel import ReplicaChannel
from grokserve.transport.errors import CallFailed, DispatchError, ShardUnavailable
from grokserve.transport.grpc_channel import GrpcChannel
from grokserve.transport.loop_thread import LoopThread
from grokserve.transport.placement import PlacementPlan, Shard, info_mismatch
from grokserve.transport.shm import host_id
from grokserve.transport.shm_channel import ShmChannel, ShmUnavailable
from grokserve.transport.staging import PinnedStaging
from grokserve.transport.tls import TlsFiles

log = logging.getLogger(__name__)
INFO_TIMEOUT_S = 2.0


@dataclass
class ShardCall:
    """The rows of one layer that one shard computes: `rows` [n] index the layer's rows; `expert_ids` [n, K]
    keeps the slots this shard holds and marks the others -1."""

    shard: int
    rows: np.ndarray
    expert_ids: np.ndarray
    all_rows: bool  # every row of the layer (no gather needed)


def route(owner: np.ndarray, expert_ids: np.ndarray) -> list[ShardCall]:
    """owner [E] = the shard serving each expert of this layer, expert_ids [N, K] → one call per shard used."""
    slot_owner = owner[expert_ids]  # [N, K]
    calls = []
    for shard in np.unique(slot_owner).tolist():
        mine = slot_owner == shard  # [N, K]
        rows = np.flatnonzero(mine.any(axis=1))  # [n]
        calls.append(ShardCall(shard, rows, np.where(mine, expert_ids, -1)[rows], len(rows) == len(expert_ids)))
    return calls


def combine(calls: list[ShardCall], partials: list[torch.Tensor], n_rows: int, d_model: int) -> torch.Tensor:
    """Partial sums [n_i, D] of each call → f32 [N, D], Σ over shards per row."""
    out = torch.zeros(n_rows, d_model, dtype=torch.float32)
    for call, partial in zip(calls, partials, strict=True):
        if call.all_rows:
            out += partial.float()
        else:
            out.index_add_(0, torch.from_numpy(call.rows), partial.float())
    return out


@dataclass
class Replica:
    """One worker replica of a shard, seen from this router: its gRPC channel (control plane: Info, attach;
    and the data plane when shared memory is not used) and its data channel (that one, or shared memory)."""

    control: GrpcChannel
    channel: ReplicaChannel
    verified: bool = False  # its Info matched the placement since the last failure
    refused: str = ""  # why its Info does not match (it is not used while this is set)
    down_until: float = 0.0
    calls: int = 0
    transport_note: str = ""  # why shared memory is not used, when it was wanted

    @property
    def address(self) -> str:
        return self.control.address

    def state(self) -> str:
        if self.refused:
            return "refused"
        return "down" if self.down_until > time.monotonic() else "ok"


@dataclass
class DispatchStats:
    """Accumulated per-call counts and timings, for benchmarks and status."""

    calls: int = 0
    retries: int = 0
    failures: int = 0
    worker_compute_seconds: float = 0.0
    last_compute_seconds: float = 0.0  # the slowest shard's compute in the last forward (they run in parallel)
    per_shard_calls: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    """The ExpertBackend of a router whose experts live in workers. Runs on the engine's event loop `loop`;
    `endpoints[shard name]` = addresses of that shard's replicas."""

    def __init__(self, config: GrokConfig, plan: PlacementPlan, endpoints: dict[str, list[str]],
                 dtype: torch.dtype, loop: LoopThread, settings: DispatchSettings | None = None,
                 metrics: RouterMetrics | None = None, tls: TlsFiles | None = None):
        self.config = config
        self.plan = plan.check(config)
        self.dtype = dtype
        self.settings = settings or DispatchSettings()
        self.loop = loop
        self.max_message_bytes = wire.max_message_bytes(config.d_model, 1 << 16, config.n_experts_per_token)
        owners = plan.owners(config)
        # owner[layer, expert] = index of the shard that serves it (the first that holds it)
        self.owner = np.array([[o[0] for o in per_layer] for per_layer in owners], dtype=np.int64)  # [L, E]
        self.model_id = wire.model_id(config)
        self.replicas: dict[str, list[Replica]] = {}  # touched only on the loop (and read by endpoints())
        self._rr: dict[str, itertools.count] = {}
        self._call_ids = itertools.count(1)
        self.stats = DispatchStats()
        self.metrics = metrics or RouterMetrics(config)
        self.tls = tls
        self.staging = PinnedStaging()
        for shard in plan.shards:
            self.set_endpoints(shard.name, endpoints.get(shard.name, []))

    # ---- endpoint management (static lists, or Ray discovery updates) --------------------------

    def set_endpoints(self, shard: str, addresses: list[str]) -> None:
        """Replace a shard's replica addresses; keeps open channels to addresses that stay."""
        self.loop.run(self._set_endpoints(shard, list(addresses)), timeout=10)

    async def _set_endpoints(self, shard: str, addresses: list[str]) -> None:
        old = {r.address: r for r in self.replicas.get(shard, [])}
        self.replicas[shard] = [old.pop(a) if a in old else self._open(a) for a in addresses]
        self.metrics.shard_replicas.labels(shard).set(len(addresses))
        self._rr.setdefault(shard, itertools.count())
        for gone in old.values():
            log.info("shard %s: replica %s removed", shard, gone.address)
            await _close(gone)

    def _open(self, address: str) -> Replica:
        control = GrpcChannel(address, self.max_message_bytes, self.settings.grpc_call, self.tls)
        return Replica(control, control)

    def endpoints(self) -> dict[str, list[str]]:
        return {s: [r.address for r in reps] for s, reps in self.replicas.items()}

    def replica_states(self) -> dict[str, list[dict]]:
        """Per shard: each replica's address, transport, state (ok | down | refused) and why it is refused."""
        return {s: [{"address": r.address, "transport": r.channel.kind, "state": r.state(),
                     "reason": r.refused or r.transport_note, "calls": r.calls} for r in reps]
                for s, reps in self.replicas.items()}

    def close(self) -> None:
        async def close_all():
            for reps in self.replicas.values():
                for r in reps:
                    await _close(r)
            self.replicas.clear()

        self.loop.run(close_all(), timeout=10)

    # ---- the all-to-all ------------------------------------------------------------------------

    async def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                      expert_probs: torch.Tensor) -> torch.Tensor:
        """hidden [N, D], expert_ids [N, K], expert_probs f32 [N, K] → Σ partials [N, D] in the activation dtype.

        Runs on the engine's loop. Routing uses numpy: per-op cost matters at decode sizes (N = batch).
        """
        n_rows = hidden.shape[0]
        device = hidden.device
        if n_rows == 0:
            return torch.zeros(0, self.config.d_model, dtype=self.dtype, device=device)
        hidden = self.staging.to_host(hidden.to(self.dtype))  # GPU: pinned, non-blocking
        ids = expert_ids.cpu().numpy()  # [N, K]
        probs = expert_probs.cpu()
        calls = route(self.owner[layer], ids)
        requests = []
        for call in calls:
            call_id = next(self._call_ids)
            rows = None if call.all_rows else torch.from_numpy(call.rows)
            requests.append((call_id, wire.request_message(
                call_id, layer, hidden if rows is None else hidden[rows], torch.from_numpy(call.expert_ids),
                probs if rows is None else probs[rows])))
        started = time.perf_counter()
        responses = await self._exchange(layer, calls, requests, time.monotonic() + self.settings.deadline_s)
        self.metrics.dispatch_layer.labels(str(layer)).observe(time.perf_counter() - started)
        try:
            partials = [wire.decode_partial(r, len(c.rows), self.config.d_model, self.dtype)
                        for c, r in zip(calls, responses, strict=True)]
            self._count(calls, responses)
            if len(calls) == 1:  # one shard answered for every row: nothing to sum
                only = partials[0]  # rounded once: the worker's sum is the whole sum
                out = only.to(self.dtype, copy=True) if device.type != "cuda" else only.to(self.dtype)
            else:  # Σ partials in f32, one rounding (f32 partials of split rows keep the sum exact in bf16)
                out = combine(calls, partials, n_rows, self.config.d_model).to(self.dtype)
        finally:
            for response in responses:
                response.release()  # shared-memory slots are free again
        return self.staging.to_device(out, device) if device.type == "cuda" else out

    def _count(self, calls: list[ShardCall], responses: list[wire.ResponseView]) -> None:
        stats = self.stats
        stats.last_compute_seconds = max(r.compute_seconds for r in responses)
        for call, response in zip(calls, responses, strict=True):
            name = self.plan.shards[call.shard].name
            stats.calls += 1
            stats.worker_compute_seconds += response.compute_seconds
            stats.per_shard_calls[name] = stats.per_shard_calls.get(name, 0) + 1

    async def _exchange(self, layer: int, calls: list[ShardCall], requests: list[tuple[int, wire.WireMessage]],
                        deadline: float) -> list[wire.ResponseView]:
        """All shards at once; the first error (after its retry) is raised once every call has ended."""
        results = await asyncio.gather(*(self._call_shard(layer, self.plan.shards[c.shard], call_id, request,
                                                          deadline)
                                         for c, (call_id, request) in zip(calls, requests, strict=True)),
                                       return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for result in results:
                if isinstance(result, wire.ResponseView):
                    result.release()
            raise failure
        return results  # type: ignore[return-value]

    async def _call_shard(self, layer: int, shard: Shard, call_id: int, request: wire.WireMessage, deadline: float
                          ) -> wire.ResponseView:
        """One shard's answer: its next replica, and one retry on another when that fails retryably."""
        failures: list[str] = []
        tried: set[int] = set()
        for attempt in range(2):
            replica = self._pick(shard.name, exclude=tried)
            if replica is None:
                break
            tried.add(id(replica))
            started = time.perf_counter()
            try:
                if not replica.verified:
                    await self._verify(replica, shard, deadline)
                response = await replica.channel.exchange(call_id, request, max(0.001, deadline - time.monotonic()))
            except CallFailed as exc:
                if not exc.retryable:
                    await self._recheck_after_refusal(replica, shard, deadline)
                    if not replica.refused:  # it holds what it should and still refused: a router bug
                        raise DispatchError(f"shard '{shard.name}' ({replica.address}) refused layer {layer}: "
                                            f"{exc}") from None
                failures.append(f"{replica.address}: {replica.refused or exc}")
                self._mark_down(shard.name, replica, exc)
                if attempt == 0:
                    self.stats.retries += 1
                    self.metrics.retries.labels(shard.name).inc()
                continue
            replica.calls += 1
            if replica.down_until:
                log.info("shard %s: replica %s is back", shard.name, replica.address)
                replica.down_until = 0.0
            m = self.metrics
            m.dispatch_shard.labels(shard.name, replica.channel.kind).observe(time.perf_counter() - started)
            m.bytes_sent.labels(shard.name).inc(request.nbytes)
            m.bytes_received.labels(shard.name).inc(response.partial.nbytes)
            return response
        self.stats.failures += 1
        self.metrics.failures.labels(shard.name).inc()
        detail = "; ".join(failures) or "no live replica"
        log.warning("shard %s unavailable for layer %d: %s", shard.name, layer, detail)
        raise ShardUnavailable(shard.name, layer, detail)

    async def _verify(self, replica: Replica, shard: Shard, deadline: float) -> None:
        """Ask the replica what it holds; refuse it (CallFailed, retryable elsewhere) when that is not `shard`.
        A replica that matches gets its data channel: shared memory when it is on this host and allowed."""
        info = await replica.control.info(min(INFO_TIMEOUT_S, max(0.001, deadline - time.monotonic())))
        mismatch = info_mismatch(info, shard, self.model_id, wire.DTYPE_TO_WIRE[self.dtype])
        if mismatch:
            if replica.refused != mismatch:
                log.error("shard %s: replica %s refused: %s", shard.name, replica.address, mismatch)
            replica.refused = mismatch
            raise CallFailed(f"refused: {mismatch}", retryable=True, code="FAILED_PRECONDITION")
        if replica.refused:
            log.info("shard %s: replica %s matches the placement again", shard.name, replica.address)
        replica.refused = ""
        await self._choose_transport(replica, shard, info, deadline)
        replica.verified = True

    async def _choose_transport(self, replica: Replica, shard: Shard, info, deadline: float) -> None:
        """Shared memory for a replica on this host (transport auto or shm), else its gRPC channel; a failed
        set-up falls back to gRPC, logged and shown in status."""
        wanted = self.settings.transport
        if wanted == "grpc" or (replica.channel is not replica.control and not getattr(replica.channel, "broken", "")):
            return
        if replica.channel is not replica.control:  # a broken shared-memory channel: set up a new one
            await replica.channel.close()
            replica.channel = replica.control
        same_host = bool(info.host_id) and info.host_id == host_id()
        if not (same_host and info.shared_memory):
            note = "another host" if not same_host else "the worker offers no shared memory"
            if wanted == "shm" and replica.transport_note != note:
                log.warning("shard %s: replica %s: shared memory requested but not possible (%s); using gRPC",
                            shard.name, replica.address, note)
            replica.transport_note = note
            return
        try:
            timeout = min(INFO_TIMEOUT_S, max(0.001, deadline - time.monotonic()))
            replica.channel = await ShmChannel.open(replica.control, self.settings.shm_slots, timeout)
        except ShmUnavailable as exc:
            log.warning("shard %s: replica %s: shared memory could not be set up (%s); using gRPC", shard.name,
                        replica.address, exc)
            replica.transport_note = f"shared memory failed: {exc}"
            return
        replica.transport_note = ""
        log.info("shard %s: replica %s on this host: dispatching through shared memory", shard.name,
                 replica.address)

    async def _recheck_after_refusal(self, replica: Replica, shard: Shard, deadline: float) -> None:
        """A worker refused a message: was it replaced by a worker of another shard, model or dtype?"""
        replica.verified = False
        with contextlib.suppress(CallFailed):  # a mismatch is recorded on the replica
            await self._verify(replica, shard, deadline)

    def _pick(self, shard: str, exclude: set[int]) -> Replica | None:
        """Round-robin over the shard's usable replicas: never refused ones; live ones before those that
        failed recently (which are tried again when nothing else is left)."""
        usable = [r for r in self.replicas.get(shard, []) if id(r) not in exclude]
        if not usable:
            return None
        now = time.monotonic()
        live = [r for r in usable if not r.refused and r.down_until <= now]
        pool = live or [r for r in usable if not r.refused] or usable  # refused ones are re-verified on use
        return pool[next(self._rr.setdefault(shard, itertools.count())) % len(pool)]

    def _mark_down(self, shard: str, replica: Replica, exc: CallFailed) -> None:
        if replica.down_until <= time.monotonic():
            log.warning("shard %s: replica %s down (%s)", shard, replica.address, exc)
        replica.down_until = time.monotonic() + self.settings.down_backoff_s
        replica.verified = False  # after an outage, check what it holds before trusting it again


async def _close(replica: Replica) -> None:
    if replica.channel is not replica.control:
        await replica.channel.close()
    await replica.control.close()

