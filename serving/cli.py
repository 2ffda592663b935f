"""`python -m serving`: generate the Triton model repository from exported runs and serve it.

Examples:
  python -m serving --runs runs/default                      # generate, serve on 127.0.0.1:8000/8001/8002
  python -m serving --runs runs/a runs/b --generate-only     # two tasks (one shared backbone if possible)
  python -m serving --runs runs/default --target gpu --generate-only   # tensorrt_plan configs for the NGC container

Each run is `runs/<name>` (or its `onnx/` export directory) as written by `make export`. The
repository (default: model_repository/, its README.md kept) is regenerated from scratch and
validated before the server starts. The server runs in the foreground until Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import fields

from serving.config import ConfigError, ServeConfig
from serving.errors import RepositoryError, ServerError
from serving.repository import DEFAULT_REPOSITORY, generate_repository
from serving.server import ServerOptions, TritonServer
from training.artifacts import ArtifactError

log = logging.getLogger("serving")

NGC_HINT = ("The gpu target needs Triton's TensorRT backend, which the embedded tritonserver lacks. Run it in the "
            "NGC container whose TensorRT version matches the engines, with this project installed "
            "(pip install .) for the python models, e.g.\n"
            "  docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v {repo}:/models "
            "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="exported runs (runs/<name> or runs/<name>/onnx)")
    p.add_argument("--target", choices=("cpu", "gpu"), default="cpu",
                   help=next(f for f in fields(ServeConfig) if f.name == "target").metadata["help"])
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="model repository to (re)generate (default: %(default)s)")
    p.add_argument("--generate-only", action="store_true", help="write and validate the repository, do not start the server")
    srv = p.add_argument_group("server (all endpoints bind to --host)")
    srv.add_argument("--host", default="127.0.0.1", help="address for the http, grpc and metrics endpoints (default: %(default)s)")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=8001)
    srv.add_argument("--metrics-port", type=int, default=8002)
    srv.add_argument("--log-file", help="tritonserver log (default: .cache/serving/tritonserver-<http-port>.log)")
    srv.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /v2/health/ready")
    cfg = p.add_argument_group("models (ServeConfig)")
    defaults = ServeConfig()
    for f in fields(ServeConfig):
        if f.name == "target":
            continue
        flag = "--" + f.name.replace("_", "-")
        value, text = getattr(defaults, f.name), f.metadata["help"]
        if isinstance(value, bool):
            cfg.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        elif isinstance(value, tuple):
            cfg.add_argument(flag, type=int, nargs="*", default=list(value), help=text)
        else:
            cfg.add_argument(flag, type=type(value), default=value, help=f"{text} (default: %(default)s)")
    return p


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = serve_config(args)
        plan = generate_repository(args.runs, args.repository, cfg)
        log.info("tasks: %s", ", ".join(t.task for t in plan.tasks))
        if args.target == "gpu":
            print(NGC_HINT.format(repo=args.repository))
            return 0 if args.generate_only else 2
        if args.generate_only:
            return 0
        options = ServerOptions(repository=args.repository, host=args.host, http_port=args.http_port,
                                grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_file=args.log_file,
                                startup_timeout_s=args.startup_timeout)
        return run_foreground(TritonServer(options))
    except (ConfigError, ArtifactError, RepositoryError, ServerError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_foreground(server: TritonServer) -> int:
    """Start, report the endpoints, and serve until Ctrl-C (or SIGTERM) or until tritonserver exits."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, _interrupt)
    log.info("starting tritonserver (log: %s)", server.options.log_file)
    server.start()
    log.info("ready: http://%s  grpc %s  metrics %s  (Ctrl-C stops)", server.http_url, server.grpc_url, server.metrics_url)
    try:
        code = server.wait()
        log.error("tritonserver exited with code %s; last log lines:\n%s", code, server.log_tail())
        return code or 1
    except KeyboardInterrupt:
        log.info("stopping tritonserver")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
