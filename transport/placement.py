"""Placement: which expert worker holds which (layer, expert), and how many replicas each shard has.

Both sides import it: the cluster builds deployments from a plan, the router's dispatcher routes by it.
A plan that leaves any (layer, expert) uncovered is rejected, naming what is missing. `parse_indices` is
the one parser of index lists ('0-3', '0,2,5-7', 'all') for the CLI and the cluster spec.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from grokserve.model.config import GrokConfig
from grokserve.v1 import expert_pb2 as pb


class PlacementError(ValueError):
    pass


def parse_indices(value: Any, count: int | None = None) -> tuple[int, ...]:
    """'0-3' | '0,2,5-7' | 'all' | [0, 1] | 5 → sorted unique indices. 'all' needs `count` (0 … count-1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected indices like '0-3', '0,2' or a list, got {value!r}")
    if isinstance(value, int):
        out = {value}
    elif isinstance(value, list | tuple):
        out = {int(v) for v in value}
    elif isinstance(value, str) and value.strip() == "all":
        if count is None:
            raise ValueError("'all' needs the model's size to expand")
        out = set(range(count))
    elif isinstance(value, str):
        out = set()
        for part in value.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            try:
                first, last = int(lo), int(hi if sep else lo)
            except ValueError:
                raise ValueError(f"'{part}' is not an index or a range like 0-3") from None
            if last < first:
                raise ValueError(f"range '{part}' runs backwards")
            out.update(range(first, last + 1))
    else:
        raise ValueError(f"expected indices like '0-3', '0,2' or a list, got {value!r}")
    if not out:
        raise ValueError(f"{value!r} names no index")
    if min(out) < 0 or (count is not None and max(out) >= count):
        raise ValueError(f"indices must lie in [0, {count if count is not None else '∞'}), got {sorted(out)}")
    return tuple(sorted(out))


class Shard(BaseModel):
    """The experts one worker (each of its replicas) holds: the same expert ids in every listed layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    layers: tuple[int, ...] = Field(min_length=1)
    experts: tuple[int, ...] = Field(min_length=1)
    replicas: int = Field(default=1, ge=1)

    @field_validator("layers", "experts")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(x < 0 for x in v):
            raise ValueError("indices must be ≥ 0")
        return tuple(sorted(set(v)))

    def as_map(self) -> dict[int, list[int]]:
        return {layer: list(self.experts) for layer in self.layers}


class PlacementPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    shards: tuple[Shard, ...] = Field(min_length=1)

    def check(self, config: GrokConfig) -> PlacementPlan:
        """Every (layer, expert) of the model held by ≥ 1 shard; nothing outside the model. Returns self."""
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise PlacementError(f"shard names must be unique, got {names}")
        covered: set[tuple[int, int]] = set()
        for shard in self.shards:
            bad_layers = [x for x in shard.layers if x >= config.n_layers]
            bad_experts = [x for x in shard.experts if x >= config.n_experts]
            if bad_layers or bad_experts:
                raise PlacementError(f"shard '{shard.name}' names layers {bad_layers} / experts {bad_experts} "
                                     f"outside the model ({config.n_layers} layers, {config.n_experts} experts)")
            covered.update((layer, e) for layer in shard.layers for e in shard.experts)
        missing = [(layer, e) for layer in range(config.n_layers) for e in range(config.n_experts)
                   if (layer, e) not in covered]
        if missing:
            shown = ", ".join(f"(layer {layer}, expert {e})" for layer, e in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise PlacementError(f"placement leaves {len(missing)} (layer, expert) pairs uncovered: {shown}{more}")
        return self

    def owners(self, config: GrokConfig) -> list[list[list[int]]]:
        """owners[layer][expert] = indices of the shards holding it."""
        table: list[list[list[int]]] = [[[] for _ in range(config.n_experts)] for _ in range(config.n_layers)]
        for i, shard in enumerate(self.shards):
            for layer in shard.layers:
                for e in shard.experts:
                    table[layer][e].append(i)
        return table


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Split into `parts` contiguous, nearly equal groups."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(items[start:start + size])
        start += size
    return out


def auto_plan(config: GrokConfig, num_workers: int, layer_groups: int = 1, replicas: int = 1) -> PlacementPlan:
    """A plan for `num_workers` distinct shards: layers split into `layer_groups` contiguous ranges, and each
    range's experts split evenly among its workers (num_workers / layer_groups)."""
    if num_workers < 1:
        raise PlacementError(f"num_workers must be ≥ 1, got {num_workers}")
    if not 1 <= layer_groups <= config.n_layers or num_workers % layer_groups:
        raise PlacementError(f"layer_groups ({layer_groups}) must divide num_workers ({num_workers}) "
                             f"and be ≤ the layer count ({config.n_layers})")
    per_group = num_workers // layer_groups
    if per_group > config.n_experts:
        raise PlacementError(f"{per_group} workers per layer range exceed the {config.n_experts} experts; "
                             f"split layers too (layer_groups ≥ {-(-num_workers // config.n_experts)})")
    shards = []
    for g, layer_range in enumerate(_split(list(range(config.n_layers)), layer_groups)):
        for w, experts in enumerate(_split(list(range(config.n_experts)), per_group)):
            name = f"experts-l{layer_range[0]}-{layer_range[-1]}-e{experts[0]}-{experts[-1]}"
            shards.append(Shard(name=name if layer_groups > 1 else f"experts-{g * per_group + w}",
                                layers=tuple(layer_range), experts=tuple(experts), replicas=replicas))
    return PlacementPlan(shards=tuple(shards)).check(config)


def info_mismatch(info: pb.InfoResponse, shard: Shard, model_id: str, wire_dtype: int) -> str:
    """Why a worker's Info does not fit `shard` of this model in this dtype ('' when it does)."""
    if info.model_id != model_id:
        return f"serves model {info.model_id}, this router {model_id}"
    if info.dtype != wire_dtype:
        return (f"computes in {pb.DType.Name(info.dtype)}, this router in {pb.DType.Name(wire_dtype)}")
    held = {entry.layer: set(entry.expert_ids) for entry in info.shard}
    missing = [(layer, e) for layer in shard.layers for e in shard.experts if e not in held.get(layer, ())]
    if missing:
        shown = ", ".join(f"(layer {layer}, expert {e})" for layer, e in missing[:4])
        return f"does not hold {len(missing)} of shard '{shard.name}''s experts, e.g. {shown}"
    return ""
