"""The cluster spec: one pydantic model shared by the CLI, the Ray Serve application and the Helm chart.

YAML in, a validated spec out; errors name the field (`experts.shards.1.layers: ...`). `placement()` turns
it into the PlacementPlan both routers and workers use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grokserve.model.config import GrokConfig
from grokserve.router.settings import DispatchSettings, EngineLimits
from grokserve.transport.placement import PlacementPlan, Shard, auto_plan, parse_indices
from grokserve.transport.tls import TlsFiles
from grokserve.workers.server import WorkerSettings

DEMO = "demo"
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"


class SpecError(ValueError):
    """The spec is invalid; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActorOptions(_Strict):
    """What each replica asks Ray for (Ray Serve `ray_actor_options`)."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory: int | None = Field(default=None, ge=0, description="bytes")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources / node labels")

    def to_ray(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            options["memory"] = self.memory
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class ModelSpec(_Strict):
    checkpoint: str = Field(default=DEMO, description="a grokserve checkpoint folder, or 'demo'")
    dtype: Literal["float32", "bfloat16"] = "float32"
    weights: Literal["dense", "int8"] = Field(
        default="dense", description="dense: matrices materialised in dtype; int8: the release's int8 attention and "
                                     "expert matrices kept as int8 with bf16 scales (half of bfloat16's memory)")
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def checkpoint_path(self) -> Path:
        return DEMO_CHECKPOINT if self.checkpoint == DEMO else Path(self.checkpoint)


class RouterSpec(_Strict):
    replicas: int = Field(default=1, ge=1)
    host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=1, le=65535)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    threads: int = Field(default=1, ge=0, description="torch intra-op threads per router (0 = torch default, one per "
                                                      "core; 1 is fastest for decode on small CPU machines)")
    metrics_port: int | None = Field(default=9464, ge=0, le=65535,
                                     description="first /metrics port of router replicas on a node (null = off)")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    limits: EngineLimits = Field(default_factory=EngineLimits)
    http_port: int | None = Field(default=8000, ge=0, le=65535,
                                  description="OpenAI-compatible HTTP API port of every router replica (null = off)")
    chat_template: str | None = Field(default=None, description="Jinja chat template file for /v1/chat/completions "
                                                                "(null = the built-in transcript template)")
    chat_stop: list[str] | None = Field(default=None, max_length=8,
                                        description="stop strings of every chat request (null = the template's)")
    served_model_name: str | None = Field(default=None, max_length=256,
                                          description="model name of the HTTP API (null = the checkpoint's)")


class ShardSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    layers: tuple[int, ...] | str = "all"
    experts: tuple[int, ...]
    replicas: int = Field(default=1, ge=1)
    ray_actor_options: ActorOptions | None = None

    @field_validator("experts", mode="before")
    @classmethod
    def _experts(cls, v: Any) -> tuple[int, ...]:
        return parse_indices(v)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> tuple[int, ...] | str:
        return v if v == "all" else parse_indices(v)


class ExpertsSpec(_Strict):
    workers: int | None = Field(default=2, ge=1, description="auto plan: this many shards")
    layer_groups: int = Field(default=1, ge=1, description="auto plan: split layers into this many ranges")
    replicas: int = Field(default=1, ge=1, description="auto plan: replicas per shard")
    shards: list[ShardSpec] | None = Field(default=None, description="explicit shards (instead of workers)")
    threads: int = Field(default=1, ge=0, description="torch threads per expert worker (0 = torch default)")
    max_rows: int = Field(default=WorkerSettings.model_fields["max_rows"].default, ge=1)
    shared_memory: bool = Field(default=WorkerSettings.model_fields["shared_memory"].default,
                                description="offer routers on the same host the shared-memory data plane")
    metrics_port: int | None = Field(default=9470, ge=0, le=65535,
                                     description="first /metrics port of expert replicas on a node (null = off)")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)

    @model_validator(mode="after")
    def _one_way(self) -> ExpertsSpec:
        if self.shards is not None:
            self.workers = None
            names = [s.name for s in self.shards]
            if len(set(names)) != len(names):
                raise ValueError(f"shard names must be unique, got {names}")
        return self


class TlsSpec(_Strict):
    cert_file: str
    key_file: str


class MutualTlsSpec(_Strict):
    ca_file: str = Field(description="the cluster CA: workers accept only router certificates it signed")
    cert_file: str
    key_file: str
    server_name: str = Field(default="grokserve-expert", description="name in every worker certificate")


class SecuritySpec(_Strict):
    client_tls: TlsSpec | None = Field(default=None, description="TLS on the client gRPC API")
    tokens_file: str | None = Field(default=None, description="bearer tokens, one per line (a mounted Secret)")
    dispatch_mtls: MutualTlsSpec | None = Field(default=None, description="mutual TLS between routers and workers")

    def dispatch_tls(self) -> TlsFiles | None:
        m = self.dispatch_mtls
        return TlsFiles(m.cert_file, m.key_file, m.ca_file, m.server_name) if m else None

    def client_tls_files(self) -> TlsFiles | None:
        return TlsFiles(self.client_tls.cert_file, self.client_tls.key_file) if self.client_tls else None


METRICS_PORT_SPAN = 6  # replicas of one role on one node take consecutive ports: base … base+5


class ClusterSpec(_Strict):
    name: str = Field(default="grokserve", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    model: ModelSpec = Field(default_factory=ModelSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    experts: ExpertsSpec = Field(default_factory=ExpertsSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)

    def placement(self, config: GrokConfig) -> PlacementPlan:
        e = self.experts
        if e.shards is None:
            return auto_plan(config, e.workers or 1, e.layer_groups, e.replicas)
        shards = [Shard(name=s.name, layers=s.layers if isinstance(s.layers, tuple) else tuple(range(config.n_layers)),
                        experts=s.experts, replicas=s.replicas) for s in e.shards]
        return PlacementPlan(shards=tuple(shards)).check(config)

    def required_resources(self, config: GrokConfig) -> dict[str, float]:
        """Total Ray resources every replica of the application asks for (CPU, GPU, custom)."""
        total: dict[str, float] = {}

        def add(options: ActorOptions, replicas: int) -> None:
            for key, value in (("CPU", options.num_cpus), ("GPU", options.num_gpus), *options.resources.items()):
                if value:
                    total[key] = total.get(key, 0.0) + value * replicas

        add(self.router.ray_actor_options, self.router.replicas)
        for shard in self.placement(config).shards:
            add(self.shard_actor_options(shard.name), shard.replicas)
        return total

    def shard_actor_options(self, shard_name: str) -> ActorOptions:
        for s in self.experts.shards or []:
            if s.name == shard_name and s.ray_actor_options is not None:
                return s.ray_actor_options
        return self.experts.ray_actor_options


def _field_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def parse_spec(data: dict[str, Any] | None) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(data or {})
    except ValidationError as exc:
        raise SpecError(f"invalid cluster spec: {_field_errors(exc)}") from None


def load_spec(path: str | Path | None) -> ClusterSpec:
    """A YAML file → ClusterSpec; no path → the defaults (demo model, 2 expert workers, CPU)."""
    if path is None:
        return parse_spec({})
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise SpecError(f"{path}: a cluster spec is a mapping, got {type(data).__name__}")
    return parse_spec(data)
