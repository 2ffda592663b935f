"""`python -m serving`: generate the Triton model repository from exported runs and serve it.

Examples:
  python -m serving --runs runs/default                      # generate, serve on 127.0.0.1:8000/8001/8002
  python -m serving --runs runs/a runs/b --generate-only     # two tasks (one shared backbone if possible)
  python -m serving --runs runs/default --target gpu --generate-only   # tensorrt_plan configs for the NGC container

Each run is `runs/<name>` (or its `onnx/` export directory) as written by `make export`. Before
anything is written, the ports must be free and no server may serve the repository. The repository
(default: model_repository/, its README.md kept; a directory holding files the generator did not
write is refused) is regenerated and validated, then tritonserver runs supervised in the
foreground until Ctrl-C: restarted when it crashes or stops answering, with its state in
.cache/serving/tritonserver-<http-port>.status.json.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import fields

from contracts.artifacts import ArtifactError
from serving.config import ConfigError, ServeConfig
from serving.errors import RepositoryError, ServerError
from serving.guard import GuardLimits
from serving.repository import DEFAULT_REPOSITORY, check_replaceable, generate_repository
from serving.server import CACHE_DIR, ServerOptions, TritonServer
from serving.supervisor import RepositoryLock, Supervisor, SupervisorConfig, serving_processes

log = logging.getLogger("serving")

NGC_HINT = (
    "The gpu target needs Triton's TensorRT backend, which the embedded tritonserver lacks. Run it in the "
    "NGC container whose TensorRT version matches the engines, with this project installed "
    "(pip install .) for the python models, e.g.\n"
    "  docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v {repo}:/models "
    "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--runs", nargs="+", required=True, metavar="RUN", help="exported runs (runs/<name> or runs/<name>/onnx)"
    )
    p.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help=next(f for f in fields(ServeConfig) if f.name == "target").metadata["help"],
    )
    p.add_argument(
        "--repository", default=str(DEFAULT_REPOSITORY), help="model repository to (re)generate (default: %(default)s)"
    )
    p.add_argument(
        "--generate-only", action="store_true", help="write and validate the repository, do not start the server"
    )
    srv = p.add_argument_group("server (all endpoints bind to --host)")
    srv.add_argument(
        "--host", default="127.0.0.1", help="address for the http, grpc and metrics endpoints (default: %(default)s)"
    )
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=8001)
    srv.add_argument("--metrics-port", type=int, default=8002)
    srv.add_argument("--log-file", help="tritonserver log (default: .cache/serving/tritonserver-<http-port>.log)")
    srv.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /v2/health/ready")
    srv.add_argument(
        "--max-request-bytes",
        type=int,
        default=GuardLimits().max_body_bytes,
        help="largest HTTP request body the guard forwards (default: %(default)s)",
    )
    srv.add_argument(
        "--max-json-depth",
        type=int,
        default=GuardLimits().max_json_depth,
        help="deepest JSON nesting the guard forwards (default: %(default)s)",
    )
    srv.add_argument(
        "--no-http-guard",
        action="store_true",
        help="expose tritonserver's HTTP endpoint directly (debugging only: one deep JSON request crashes it)",
    )
    srv.add_argument(
        "--max-restarts",
        type=int,
        default=SupervisorConfig().max_restarts,
        help="restarts within 10 minutes before the supervisor gives up (default: %(default)s)",
    )
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


def server_options(args: argparse.Namespace) -> ServerOptions:
    limits = GuardLimits(max_body_bytes=args.max_request_bytes, max_json_depth=args.max_json_depth)
    return ServerOptions(
        repository=args.repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        startup_timeout_s=args.startup_timeout,
        guard=not args.no_http_guard,
        guard_limits=limits,
    )


def check_free(server: TritonServer) -> None:
    """Before anything is written: nothing serves the repository and the three ports are free."""
    pids = serving_processes(server.options.repository)
    if pids:
        raise ServerError(
            f"tritonserver (pid {', '.join(map(str, pids))}) is serving {server.options.repository}; "
            "stop it before regenerating that repository, or use another --repository"
        )
    server.check_ports()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = serve_config(args)
        options = server_options(args)
        with RepositoryLock(options.repository, CACHE_DIR).acquire(f"serving {options.repository}"):
            check_replaceable(options.repository)
            server = TritonServer(options) if not (args.generate_only or args.target == "gpu") else None
            if server is not None:
                check_free(server)
            elif serving_processes(options.repository):
                raise ServerError(f"a tritonserver is serving {options.repository}; stop it before regenerating it")
            plan = generate_repository(args.runs, args.repository, cfg)
            log.info("tasks: %s", ", ".join(t.task for t in plan.tasks))
            if args.target == "gpu":
                print(NGC_HINT.format(repo=args.repository))
                return 0 if args.generate_only else 2
            if server is None:
                return 0
            return run_supervised(Supervisor(server, SupervisorConfig(max_restarts=args.max_restarts)))
    except (ConfigError, ArtifactError, RepositoryError, ServerError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1


def run_supervised(supervisor: Supervisor) -> int:
    """Serve until Ctrl-C or SIGTERM (0), or until the supervisor gives up on a crash loop (1)."""
    interrupted = []

    def stop(signum, frame):  # sets an event: nothing is interrupted halfway, except a startup (once: it cleans up)
        log.info("stopping tritonserver (signal %d)", signum)
        supervisor.stop()
        if supervisor.state == "starting" and not interrupted:
            interrupted.append(signum)
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, stop)
    s = supervisor.server
    log.info("starting tritonserver (log: %s)", s.options.log_file)
    try:
        code = supervisor.run()
    except KeyboardInterrupt:
        log.info("stopped during startup")
        return 0
    if code == 0:
        log.info("stopped; %d restart(s) while serving", supervisor.restarts)
    return code


if __name__ == "__main__":
    sys.exit(main())
