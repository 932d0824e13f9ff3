"""``triserve deploy | undeploy | status | scale | kserve``: the scale-out command line.

Only argument parsing here; Ray is imported when a command runs (``kserve`` never needs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

COMMANDS = ("deploy", "undeploy", "status", "scale", "kserve")


def _default_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9.-]+", "-", path.resolve().name.lower()).strip("-.")
    return name or "triserve"


def _resources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", type=float, default=1, help="CPU cores per instance (default 1)")
    parser.add_argument("--memory", type=float, default=0,
                        help="memory in GB per instance (default 0: no reservation)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per instance")
    parser.add_argument("--instances", type=int, default=1, help="instances (replicas) of every model")


def add_commands(commands) -> None:
    """Add the scale-out sub-commands to ``triserve``'s sub-parsers."""
    endpoint_help = "Ray cluster address (default: the local cluster, started if none runs)"

    deploy = commands.add_parser(
        "deploy", help="deploy a model folder or repository on a Ray Serve cluster",
        description="Deploy every model of DIR as a Ray Serve deployment, behind a front door "
                    "that serves triserve's whole HTTP/gRPC surface. Prints the endpoints.")
    deploy.add_argument("path", type=Path, metavar="DIR", help="a model folder or a model repository")
    deploy.add_argument("--name", help="deployment name (default: DIR's folder name)")
    deploy.add_argument("--protocol", choices=["http", "grpc"], default="http",
                        help="what the printed URL speaks (both are served)")
    deploy.add_argument("--endpoint", help=endpoint_help)
    _resources(deploy)
    deploy.add_argument("--min-replicas", type=int, help="autoscaling: fewest instances")
    deploy.add_argument("--max-replicas", type=int, help="autoscaling: most instances")
    deploy.add_argument("--target-ongoing-requests", type=float, default=2.0,
                        help="autoscaling: requests in flight per instance to aim for (default 2)")
    deploy.add_argument("--override", action="store_true", help="replace a deployment of this name")
    deploy.add_argument("--host", default="127.0.0.1", help="front door address (default 127.0.0.1)")
    deploy.add_argument("--http-port", type=int, default=8000)
    deploy.add_argument("--grpc-port", type=int, default=8001)
    deploy.add_argument("--metrics-port", type=int, default=8002)
    deploy.add_argument("--chatglm-model", default=None, metavar="NAME",
                        help="the model behind ChatGLM's POST / (default: the first chat model)")
    deploy.add_argument("--timeout", type=float, default=900, help="seconds to wait until ready")

    undeploy = commands.add_parser("undeploy", help="delete a deployment (every instance stops)")
    undeploy.add_argument("name", metavar="NAME")
    undeploy.add_argument("--endpoint", help=endpoint_help)

    status = commands.add_parser("status", help="deployments and their replicas, as JSON")
    status.add_argument("name", nargs="?", metavar="NAME")
    status.add_argument("--endpoint", help=endpoint_help)

    scale = commands.add_parser("scale", help="change the instances of a live deployment in place")
    scale.add_argument("name", metavar="NAME")
    scale.add_argument("--instances", type=int, required=True)
    scale.add_argument("--endpoint", help=endpoint_help)

    kserve = commands.add_parser(
        "kserve", help="write KServe ServingRuntime and InferenceService YAML for a repository",
        description="Write a KServe ServingRuntime (triserve's image running `triserve serve`, "
                    "ports 8080 HTTP / 8081 gRPC, protocols v2 and grpc-v2) and an "
                    "InferenceService for DIR.")
    kserve.add_argument("path", type=Path, metavar="DIR", help="a model folder or a model repository")
    kserve.add_argument("--name", help="InferenceService name (default: DIR's folder name)")
    kserve.add_argument("--storage-uri", help="where KServe downloads the repository from "
                                              "(default: pvc://triserve-models/NAME)")
    kserve.add_argument("--image", default=None, help="the triserve container image")
    _resources(kserve)
    kserve.add_argument("--max-replicas", type=int, default=None)
    kserve.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")


def run(args: argparse.Namespace) -> int:
    from triserve.deploy.spec import DeployError

    try:
        return _run(args)
    except DeployError as exc:
        print(f"triserve {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from triserve.deploy.spec import DeployError

    if args.command == "kserve":
        from triserve.deploy import kserve

        text = kserve.manifests_yaml(kserve.KServeSpec.from_path(
            args.path, name=args.name or _default_name(args.path), storage_uri=args.storage_uri,
            image=args.image, cpu=args.cpu, memory=args.memory, gpu=args.use_gpu,
            instances=args.instances, max_replicas=args.max_replicas))
        if args.output:
            args.output.write_text(text)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0

    from triserve.deploy import sdk
    from triserve.deploy.spec import Autoscaling

    if args.command == "deploy":
        autoscaling = None
        if args.min_replicas is not None or args.max_replicas is not None:
            autoscaling = Autoscaling(
                min_replicas=args.min_replicas if args.min_replicas is not None else 1,
                max_replicas=args.max_replicas if args.max_replicas is not None else args.instances,
                target_ongoing_requests=args.target_ongoing_requests)
        predictor = sdk.TritonModel(args.name or _default_name(args.path)).deploy(
            args.path, protocol=args.protocol, endpoint=args.endpoint, cpu=args.cpu,
            memory=args.memory, use_gpu=args.use_gpu, override=args.override,
            instances=args.instances, autoscaling=autoscaling, host=args.host,
            http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            chatglm_model=args.chatglm_model, timeout=args.timeout)
        print(json.dumps(_endpoints(predictor), indent=2))
    elif args.command == "undeploy":
        sdk.undeploy(args.name, args.endpoint)
        print(f"undeployed {args.name}")
    elif args.command == "status":
        states = sdk.status(args.endpoint)
        if args.name:
            if args.name not in states:
                raise DeployError(f"no deployment named '{args.name}'")
            states = {args.name: states[args.name]}
        print(json.dumps(states, indent=2))
    elif args.command == "scale":
        predictor = sdk.TritonModel(args.name).scale(instances=args.instances, endpoint=args.endpoint)
        print(json.dumps(_endpoints(predictor), indent=2))
    return 0


def _endpoints(predictor) -> dict:
    return {"name": predictor.name, "url": predictor.url, "http": predictor.http_url,
            "grpc": predictor.grpc_url, "predict": predictor.predict_url,
            "openai": predictor.openai_url, "metrics": predictor.metrics_url,
            "models": list(predictor.models), "chat_model": predictor.chat_model}
