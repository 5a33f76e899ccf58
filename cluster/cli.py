"""The `grokserve` command: one argparse program with a subcommand per job.

convert/score work on checkpoints; worker and router run one process standalone; up/status/down/demo run
the Ray Serve application. Options that are settings (engine limits, dispatch, worker) are built from the
pydantic models that define them, so their names, types, defaults and help exist once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from grokserve.model.checkpoint import FORMATS, CheckpointError
from grokserve.model.dtypes import WEIGHT_MODES

Handler = Callable[[argparse.Namespace], int]


def add_settings_options(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "",
                         only: tuple[str, ...] | None = None) -> None:
    """One `--prefix-field-name` option per field of `model` (or of `only`), with the field's type, choices,
    default and description. The destination is `prefix_field_name`."""
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        dest = f"{prefix}_{name}" if prefix else name
        flag = "--" + dest.replace("_", "-")
        annotation = field.annotation
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        help_text = f"{field.description or name} (default: {field.default})"
        if annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=field.default,
                                help=field.description)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, dest=dest, choices=typing.get_args(annotation), default=field.default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=typing.cast(type, annotation), default=field.default,
                                help=help_text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def cmd_convert(args: argparse.Namespace) -> int:
    from grokserve.model.checkpoint import iter_params, resolve_config
    from grokserve.model.checkpoint.grokserve_format import write_checkpoint
    from grokserve.model.weights import expected_shapes

    config = resolve_config(args.checkpoint, args.format, args.config)
    total = sum(1 for _ in expected_shapes(config))
    out = write_checkpoint(args.output, config, iter_params(args.checkpoint, args.format, config),
                           tokenizer_file=args.tokenizer, total=total)
    print(f"wrote grokserve checkpoint ({config.name}: {config.n_layers} layers, {config.n_experts} experts) to {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from grokserve.model.engine import ReferenceEngine

    engine = ReferenceEngine.from_checkpoint(args.checkpoint, args.format, args.dtype, args.config,
                                             weights=args.weights)
    logits = engine.logits(args.tokens)  # [T, V] f32
    np.save(args.output, logits.cpu().numpy())
    print(f"wrote logits {tuple(logits.shape)} float32 to {args.output}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from grokserve.workers.main import main as worker_main

    return worker_main(args)


def cmd_router(args: argparse.Namespace) -> int:
    from grokserve.router.main import main as router_main

    return router_main(args)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from grokserve.client import Client

    prompt: str | list[int] = _int_list(args.prompt) if args.token_ids else args.prompt
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop or None)
    try:
        credentials = None
        if args.tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        with Client(args.address, timeout=args.timeout, credentials=credentials, token=token) as client:
            last = None
            for chunk in client.generate_stream(prompt, **kwargs):
                print(chunk.text if chunk.text or not args.token_ids else " ".join(map(str, chunk.token_ids)),
                      end="" if chunk.text else " ", flush=True)
                last = chunk
            print()
            if last is not None and args.verbose:
                print(f"[{last.usage.completion_tokens} tokens, finish {last.finish_reason}, "
                      f"ttft {last.timings.time_to_first_token_seconds * 1e3:.0f} ms, "
                      f"total {last.timings.total_seconds * 1e3:.0f} ms]", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"grokserve generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _readiness_bar():
    from tqdm import tqdm

    bar = tqdm(total=1, desc="expert shards ready", unit="shard", disable=None)

    def progress(stats: dict, missing: list[str]) -> None:
        total = len(stats["endpoints"])
        bar.total = total
        bar.n = total - len(missing)
        bar.refresh()

    return bar, progress


def cmd_up(args: argparse.Namespace) -> int:
    from grokserve.cluster import session
    from grokserve.cluster.spec import load_spec

    spec = load_spec(args.spec)
    head = None
    address = args.address
    if not address:
        head = session.start_local_head(args.ray_port, args.num_cpus or session.local_cpus(spec))
        address = head["address"]
    session.save_state({"address": address, "app": spec.name, "head": head,
                        "host": spec.router.host, "port": spec.router.grpc_port})
    session.connect(address)
    session.quiet_ray_logs()
    print(f"deploying '{spec.name}' ({spec.model.checkpoint}) on Ray at {address} ...", flush=True)
    bar, progress = _readiness_bar()
    stats = session.deploy(spec, args.timeout, progress)
    bar.close()
    print(f"grokserve is up: gRPC Generation service at {spec.router.host}:{stats['port']}")
    if stats.get("http_port") is not None:
        scheme = "https" if spec.security.client_tls else "http"
        print(f"  OpenAI-compatible HTTP API at {scheme}://{spec.router.host}:{stats['http_port']}/v1")
    print(f"  try: grokserve generate --address {spec.router.host}:{stats['port']} \"The\"")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from grokserve.cluster import session

    state = session.load_state()
    address = args.address or state.get("address")
    if not address:
        print("grokserve status: no cluster known (run grokserve up, or pass --address)", file=sys.stderr)
        return 1
    session.connect(address)
    report = session.describe(args.app or state.get("app", "grokserve"))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    print(f"application {report['app']}: {report['app_status']}  (Ray at {address})")
    for name, dep in report["deployments"].items():
        print(f"  {name:<24} {dep['status']:<10} replicas {dep['replicas']}")
    print("expert shards (registered replicas):")
    for shard, replicas in sorted(report["shards"].items()):
        for r in replicas:
            print(f"  {shard:<24} {r['address']:<22} node {r['node_id'][:12]}  seen {r['age_s']}s ago")
    router = report["router"] or {}
    if "load" in router:
        load = router["load"]
        http = f"  http {router['http_port']}" if router.get("http_port") else ""
        print(f"router: port {router['port']}{http}  running {load['running']}  waiting {load['waiting']}  "
              f"kv {load['kv_usage']:.0%}  prefix-cache hits {load.get('prefix_cache_hit_rate', 0):.0%}  "
              f"steps {router['steps']}")
        print("dispatch (as the router sees each replica):")
        for shard, replicas in sorted(router.get("replicas", {}).items()):
            for r in replicas:
                reason = f"  ({r['reason']})" if r["reason"] else ""
                print(f"  {shard:<24} {r['address']:<22} {r['transport']:<12} {r['state']:<8} "
                      f"calls {r['calls']}{reason}")
    print("nodes:")
    for node_id, node in report["nodes"].items():
        print(f"  {node_id[:12]} {'alive' if node['alive'] else 'DEAD '} {node['address']} {node['resources']}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from grokserve.cluster import session

    state = session.load_state()
    address = args.address or state.get("address")
    app = args.app or state.get("app", "grokserve")
    head = state.get("head") if not args.address else None
    summary = []
    if address and head is None:  # a cluster we joined: remove our application only, leave Serve and Ray
        try:
            session.connect(address)
            session.quiet_ray_logs()
            session.teardown(app)
            summary.append(f"application '{app}' deleted from the Ray cluster at {address}")
        except Exception as exc:  # the cluster may already be gone
            print(f"grokserve down: {exc}", file=sys.stderr)
    if head is not None:  # the head `up` started: stop exactly its processes (and so our application)
        stopped = session.stop_local_head(head)
        summary.append(f"local Ray head {head['address']} stopped ({stopped} processes)")
    session.STATE_FILE.unlink(missing_ok=True)
    print(f"grokserve is down: {'; '.join(summary) or 'nothing was running'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded Ray → deploy the spec → one streamed request → shut down, all in this process."""
    import time

    import ray

    from grokserve.client import Client
    from grokserve.cluster import session
    from grokserve.cluster.spec import load_spec

    session.loopback_env()
    spec = load_spec(args.spec)
    router = spec.router.model_copy(update={"grpc_port": args.port, "http_port": None})  # the demo asks over gRPC
    spec = spec.model_copy(update={"router": router})
    started = time.monotonic()
    ray.init(namespace="grokserve", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             num_cpus=args.num_cpus or session.local_cpus(spec))
    session.quiet_ray_logs()
    try:
        print(f"starting a local cluster: {spec.model.checkpoint} model, router + "
              f"{spec.experts.workers or len(spec.experts.shards or [])} expert workers ...", flush=True)
        bar, progress = _readiness_bar()
        stats = session.deploy(spec, args.timeout, progress)
        bar.close()
        address = f"{spec.router.host}:{stats['port']}"
        print(f"serving on {address}; request: {args.prompt!r}", flush=True)
        last = None
        with Client(address, timeout=120) as client:
            print(args.prompt, end="", flush=True)
            for chunk in client.generate_stream(args.prompt, max_tokens=args.max_tokens, temperature=0.0):
                print(chunk.text, end="", flush=True)
                last = chunk
            print()
    finally:
        session.teardown(spec.name)
        ray.shutdown()
    if last is not None:
        print(f"[{last.usage.completion_tokens} tokens in {last.timings.total_seconds:.2f} s, first after "
              f"{last.timings.time_to_first_token_seconds * 1e3:.0f} ms; cluster up, served and stopped in "
              f"{time.monotonic() - started:.1f} s]")
    return 0


def _dispatch_tls_args(p: argparse.ArgumentParser, cert_help: str) -> None:
    p.add_argument("--dispatch-ca", help="mutual TLS on dispatch: the cluster CA (PEM)")
    p.add_argument("--dispatch-cert", help=cert_help)
    p.add_argument("--dispatch-key", help="its private key (PEM)")
    p.add_argument("--dispatch-server-name", help="name routers expect in worker certificates (default: address)")


def build_parser() -> argparse.ArgumentParser:
    from grokserve.router.settings import DispatchSettings, EngineLimits
    from grokserve.workers.server import WorkerSettings

    parser = argparse.ArgumentParser(prog="grokserve", description="Expert-parallel serving of Grok-1.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert an official or Hugging-Face checkpoint to grokserve's layout",
                       description="Read an official (ckpt-0/ pickles) or Hugging-Face checkpoint and write "
                                   "grokserve's sharded safetensors layout (int8 weights stay int8).")
    p.add_argument("--checkpoint", required=True, help="input checkpoint folder")
    p.add_argument("--format", required=True, choices=("official", "hf"), help="input format")
    p.add_argument("--config", help="model config JSON (official LanguageModelConfig/TransformerConfig fields "
                                    "or grokserve's); default: grok-1 (official) or the HF config.json")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model to bundle with the checkpoint")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("score", help="write full-sequence logits [T, vocab] for a token sequence",
                       description="Load a checkpoint in any format and write the float32 logits of every "
                                   "position to a .npy file (to validate conversions and fidelity).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", default="grokserve", choices=FORMATS)
    p.add_argument("--config", help="model config JSON (needed for non-grok-1 official checkpoints)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--weights", default="dense", choices=WEIGHT_MODES,
                   help="dense: matrices in --dtype; int8: the release's int8 matrices kept as int8 (W8A16)")
    p.add_argument("--tokens", required=True, type=_int_list, help="comma-separated token ids, e.g. 5,17,42")
    p.add_argument("--output", required=True, help="output .npy file")
    p.set_defaults(handler=cmd_score)

    p = sub.add_parser("worker", help="run one expert worker standalone (outside Ray)",
                       description="Serve ExpertService for a shard of (layer, expert) from a grokserve checkpoint. "
                                   "Health turns SERVING once the weights are loaded; SIGTERM drains in-flight calls.")
    p.add_argument("--checkpoint", required=True, help="grokserve checkpoint folder")
    p.add_argument("--layers", default="all", help="layers held, e.g. 0-63, 0,2,4 or all (default)")
    p.add_argument("--experts", required=True, help="experts held in each of those layers, e.g. 0,1 or 0-3")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=0, help="port (0 = pick a free one and print it)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--weights", default="dense", choices=WEIGHT_MODES,
                   help="dense: matrices in --dtype; int8: the release's int8 matrices kept as int8 (W8A16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    add_settings_options(p, WorkerSettings, only=("max_rows", "shared_memory"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1; 0 = torch's default, one per core)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here (0 = any port)")
    p.add_argument("--shard-name", default="standalone", help="the shard label on this worker's metrics")
    _dispatch_tls_args(p, "this worker's certificate (server side of dispatch mTLS)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("router", help="run one router (the Generation gRPC service) standalone",
                       description="Serve the client Generation API with health and reflection. Experts run in "
                                   "process unless --workers lists expert workers (placement is read from them).")
    p.add_argument("--checkpoint", required=True, help="grokserve checkpoint folder")
    p.add_argument("--workers", default="", help="expert workers HOST:PORT,HOST:PORT,... (default: in process)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--weights", default="dense", choices=WEIGHT_MODES,
                   help="dense: matrices in --dtype; int8: the release's int8 matrices kept as int8 (W8A16)")
    p.add_argument("--device", default="cpu")
    add_settings_options(p, EngineLimits)
    add_settings_options(p, DispatchSettings, prefix="dispatch")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: a decode step is many small ops, and on a 2-core machine "
                        "1 thread serves 2.6× the tokens/s of 2, docs/benchmarks.md; 0 = torch's default)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here (0 = any port)")
    p.add_argument("--tls-cert", help="serve the client API over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument("--tokens-file", help="require `authorization: Bearer <token>`, tokens one per line")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (0 = any free port, -1 = off)")
    p.add_argument("--chat-template", help="Jinja chat template for /v1/chat/completions (default: a plain "
                                           "'Human: … / Assistant:' transcript, docs/operations.md)")
    p.add_argument("--chat-stop", action="append", default=None,
                   help="a stop string every chat request gets (repeatable; default: the default template's)")
    p.add_argument("--served-model-name", help="the model name of the HTTP API (default: the checkpoint's name)")
    _dispatch_tls_args(p, "the router's client certificate for dispatch mTLS")
    p.set_defaults(handler=cmd_router)

    p = sub.add_parser("generate", help="stream a completion from a running router to the terminal",
                       description="Send one GenerateStream request and print the text as it arrives.")
    p.add_argument("prompt", help="prompt text (or comma-separated token ids with --token-ids)")
    p.add_argument("--address", default="127.0.0.1:50051", help="router HOST:PORT")
    p.add_argument("--token-ids", action="store_true", help="the prompt is token ids; print ids back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--tls-ca", help="connect over TLS, trusting this CA (PEM)")
    p.add_argument("--token-file", help="send the bearer token in this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print usage and timings to stderr")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("up", help="start the cluster (local Ray by default) and deploy the application",
                       description="Start a local Ray head in the background (or join --address), deploy the "
                                   "router and expert shards of SPEC (default: the demo model on 2 CPU workers), "
                                   "wait until every shard is ready and print where to connect.")
    p.add_argument("spec", nargs="?", help="cluster spec YAML (default: demo model, 2 expert workers, CPU)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--ray-port", type=int, default=6380, help="port of the local Ray head")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray head offers")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser("status", help="show shards, replicas, nodes, health and load",
                       description="Report the application's deployments, where each expert shard's replicas "
                                   "run, the router's load and the Ray nodes.")
    p.add_argument("--address", help="Ray cluster address (default: the one `up` started)")
    p.add_argument("--app", help="application name (default: the one `up` deployed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("down", help="remove the application (and stop the local Ray that `up` started)",
                       description="Stop what `grokserve up` started: its local Ray head (only that one), or, on a "
                                   "cluster it joined, only its Serve application.")
    p.add_argument("--address", help="Ray cluster address (the cluster itself is left running)")
    p.add_argument("--app", help="application name (default: the one `up` deployed)")
    p.set_defaults(handler=cmd_down)

    p = sub.add_parser("demo", help="start a local cluster, answer one gRPC request, stop it",
                       description="All in one process: embedded Ray, the demo model (or SPEC) behind a router "
                                   "and expert workers, one streamed Generate request printed, then shut down.")
    p.add_argument("prompt", nargs="?", default="And God said")
    p.add_argument("--spec", help="cluster spec YAML (default: demo model, 2 expert workers)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"grokserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
