"""Run the embedded Triton Inference Server (the `tritonserver` 2.51 binary of nvidia-pytriton).

`TritonServer(ServerOptions(repository=...))` is a context manager: it assembles a backend
directory (the python backend plus the stub for the running Python), starts tritonserver with all
three endpoints on 127.0.0.1, waits for /v2/health/ready and a canary inference per task, and stops
it on exit (SIGINT, then SIGTERM, then SIGKILL). Stdout and stderr (Triton's log and the python
models' prints) are appended to `options.log_file`, by default `.cache/serving/tritonserver-<http_port>.log`.

Hardening: the public HTTP port is served by `serving/guard.py` (bounded bodies and JSON depth,
canary readiness), which forwards to tritonserver's own HTTP endpoint on a private 127.0.0.1
port; the repository, shared-memory, trace and logging APIs need the header `mpismoe-admin-key`
(a random key per server, in `<log_file>.admin-key`, mode 0600) on HTTP and gRPC. `respawn()`
replaces a dead or broken tritonserver behind the same ports (serving/supervisor.py decides when).

The python-backend stub runs an isolated interpreter that ignores PYTHONPATH and finds its
site-packages from the first `python3` on PATH; hence the venv's bin/ goes first on PATH, and the
models put PYTHONPATH (project root + site-packages) on sys.path themselves (triton_models/*).
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from serving.canary import DIRECT, Canary, tasks_of
from serving.errors import ServerError
from serving.guard import GuardLimits, HttpGuard
from serving.install import CACHE_DIR, TritonInstall, backend_directory, check_numpy, find_tritonserver  # noqa: F401
from serving.repository import DEFAULT_REPOSITORY, PROJECT_ROOT

_ERROR_LINE = re.compile(r"^E\d{4} ")
_NOISE = ("CudaDriverHelper", "NVML", "DCGM")  # expected on a machine without a GPU
ADMIN_HEADER = "mpismoe-admin-key"
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")  # need ADMIN_HEADER


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class ServerOptions:
    repository: Path = DEFAULT_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None  # default: .cache/serving/tritonserver-<http_port>.log
    startup_timeout_s: float = 180.0
    exit_timeout_s: int = 5  # Triton's wait for in-flight requests on shutdown
    log_verbose: int = 0
    python_shm_mb: tuple[int, int] = (16, 16)  # python backend shared memory: initial, growth (MiB)
    guard: bool = True  # serve the public HTTP port through serving/guard.py
    guard_limits: GuardLimits = field(default_factory=GuardLimits)
    restrict_apis: bool = True  # RESTRICTED_APIS need ADMIN_HEADER
    admin_key: str | None = None  # default: a random key per server
    canary_timeout_s: float = 10.0
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.repository = Path(self.repository).resolve()
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise ValueError(f"http/grpc/metrics ports must be three distinct ports in 1-65535, got {ports}")
        if self.log_file is None:
            self.log_file = CACHE_DIR / f"tritonserver-{self.http_port}.log"
        self.log_file = Path(self.log_file)
        if self.restrict_apis and not self.admin_key:
            self.admin_key = secrets.token_urlsafe(24)

    @classmethod
    def on_free_ports(cls, **kwargs) -> ServerOptions:
        """Options on three currently free 127.0.0.1 ports (tests, benchmarks)."""
        ports = set()
        while len(ports) < 3:
            ports.add(free_port())
        http, grpc, metrics = sorted(ports)
        return cls(http_port=http, grpc_port=grpc, metrics_port=metrics, **kwargs)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL tritonserver if the Python process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonServer:
    """One tritonserver on `options` (respawned in place when needed); `with TritonServer(opts) as server:`."""

    def __init__(self, options: ServerOptions, install: TritonInstall | None = None):
        self.options = options
        self.install = install or find_tritonserver()
        self.process: subprocess.Popen | None = None
        self.backend_http_port: int = options.http_port  # tritonserver's own HTTP port (private behind the guard)
        self.guard: HttpGuard | None = None
        self.canary: Canary | None = None
        self.started_at: float | None = None  # time.monotonic() of the last spawn
        self._log = None
        self._shm_prefix = f"mpismoe-{os.getpid()}-{options.http_port}-"

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def backend_http_url(self) -> str:
        return f"{self.options.host}:{self.backend_http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    @property
    def admin_key_file(self) -> Path:
        return self.options.log_file.with_suffix(".admin-key")

    def _restrictions(self) -> list[str]:
        if not self.options.restrict_apis:
            return []
        value = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.options.admin_key}"
        return [f"--http-restricted-api={value}", f"--grpc-restricted-protocol={value}"]

    def command(self) -> list[str]:
        o = self.options
        shm_default, shm_growth = (mb * 1024 * 1024 for mb in o.python_shm_mb)
        return [
            str(self.install.binary),
            f"--model-repository={o.repository}",
            f"--backend-directory={backend_directory(self.install)}",
            f"--http-address={o.host}",
            f"--http-port={self.backend_http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            "--model-control-mode=none",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--log-verbose={o.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={shm_default}",
            f"--backend-config=python,shm-growth-byte-size={shm_growth}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self._restrictions(),
            *o.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        """PATH with this venv's bin/ first, PYTHONPATH = project root + site-packages, the package's libs."""
        env = dict(os.environ)

        def prepend(key: str, *paths) -> None:
            env[key] = os.pathsep.join([*map(str, paths), *filter(None, [env.get(key)])])

        prepend("PATH", Path(sys.executable).parent)
        prepend("PYTHONPATH", PROJECT_ROOT, sysconfig.get_paths()["purelib"])
        prepend("LD_LIBRARY_PATH", self.install.libs)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def check_ports(self) -> None:
        """ServerError naming the first of the three public ports that is taken."""
        o = self.options
        for what, port in (("http", o.http_port), ("grpc", o.grpc_port), ("metrics", o.metrics_port)):
            if port_in_use(o.host, port):
                raise ServerError(
                    f"{what} port {port} on {o.host} is already in use (another tritonserver?); "
                    f"stop it or pick another port (--{what}-port)"
                )

    def _preflight(self) -> None:
        check_numpy()
        o = self.options
        if not o.repository.is_dir() or not any(p.is_dir() for p in o.repository.iterdir()):
            raise ServerError(
                f"model repository {o.repository} is empty or missing: generate it first "
                "(`python -m serving --runs runs/<name> --generate-only`)"
            )
        self.check_ports()

    def start(self) -> TritonServer:
        """Start tritonserver (behind the guard) and wait until a canary inference answers; ServerError if not."""
        if self.process is not None and self.process.poll() is None:
            raise ServerError(f"tritonserver is already running (pid {self.process.pid})")
        self._preflight()
        try:
            if self.options.guard:
                self.guard = HttpGuard(
                    self.options.host, self.options.http_port, self.options.guard_limits, self.readiness
                ).start()
            if self.options.restrict_apis:
                _write_private(self.admin_key_file, self.options.admin_key + "\n")
            self._spawn(append_log=False)
            self.canary = Canary(
                self.backend_http_url, tasks_of(self.options.repository), self.options.canary_timeout_s
            )
            self._wait_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, append_log: bool = True) -> None:
        """Start a tritonserver process and wait for Triton's own readiness; the guard forwards to it then.

        The log is started afresh by start() and appended to by a respawn, so that a crash's log is kept.
        """
        if self.options.guard:
            self.backend_http_port = free_port(self.options.host)
        self.options.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.options.log_file, "ab" if append_log else "wb")
        self._log.write(f"==== tritonserver starting at {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
        self._log.flush()
        self._log_start = self._log.tell()
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()
        self.wait_ready(self.options.startup_timeout_s)
        if self.canary is not None:
            self.canary.url = self.backend_http_url
        if self.guard is not None:
            self.guard.target = (self.options.host, self.backend_http_port)

    def _wait_answering(self) -> None:
        result = self.canary.check()
        if not result.ok:
            raise ServerError(
                f"tritonserver is up but a canary inference failed: {result.detail} "
                f"(log: {self.options.log_file}):\n{self.log_tail()}"
            )

    def respawn(self) -> None:
        """Replace the tritonserver process (dead or broken) by a new one on the same public ports.

        Ready means the canary answers as it did before the restart; ServerError otherwise.
        """
        if self.guard is not None:
            self.guard.target = None  # clients get "restarting" (503) meanwhile
        self.kill()
        self._spawn()
        self._wait_answering()

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): tritonserver runs and a canary inference (at most 1 s old) answered as before."""
        if self.process is None or self.process.poll() is not None or self.canary is None:
            return False, "tritonserver is not running"
        result = self.canary.cached(1.0)
        return result.ok, result.detail

    def is_ready(self) -> bool:
        """Triton's own /v2/health/ready (models loaded; says nothing about a dead python stub)."""
        try:
            with DIRECT.open(f"http://{self.backend_http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver {exit_cause(self.process.returncode)} during startup "
                    f"(log: {self.options.log_file}):\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.1)
        raise ServerError(
            f"tritonserver was not ready on http://{self.backend_http_url} after {timeout_s:.0f} s "
            f"(log: {self.options.log_file}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        """The current run's error lines (model load failures), then its last lines."""
        try:
            with open(self.options.log_file, "rb") as f:
                f.seek(getattr(self, "_log_start", 0))
                text = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        errors = [line[:600] for line in text if _ERROR_LINE.match(line) and not any(n in line for n in _NOISE)]
        return "\n".join(["errors:", *errors[:6], "last lines:", *text[-lines:]] if errors else text[-lines:])

    def _signal(self, sig: int, wait_s: float) -> bool:
        """Send `sig` and wait up to `wait_s`; True once the process has exited."""
        try:
            self.process.send_signal(sig)
            self.process.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False
        except ProcessLookupError:
            return True

    def stop(self) -> int | None:
        """SIGINT (graceful), then SIGTERM, then SIGKILL; the guard stops too; return the exit code."""
        if self.process is not None and self.process.poll() is None:
            (
                self._signal(signal.SIGINT, self.options.exit_timeout_s + 10)
                or self._signal(signal.SIGTERM, 5)
                or self._signal(signal.SIGKILL, 10)
            )
        code = self._cleanup()
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        return code

    def kill(self) -> int | None:
        """SIGKILL tritonserver at once (a crash, for tests); the guard keeps its port."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGKILL, 10)
        return self._cleanup()

    def _cleanup(self) -> int | None:
        if self.process is not None:  # python-backend stubs outlive a killed server: end its whole group
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        for leftover in glob.glob(f"/dev/shm/{self._shm_prefix}*"):  # only after a kill
            try:
                os.unlink(leftover)
            except OSError:
                pass
        return None if self.process is None else self.process.returncode

    def wait(self) -> int:
        """Block until tritonserver exits (foreground serving); return its exit code."""
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (mode 0600, whatever it was before)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def exit_cause(code: int | None) -> str:
    """How tritonserver ended, in words: `exited with code 1` or `was killed by signal 11 (SIGSEGV)`."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else "unknown"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"
