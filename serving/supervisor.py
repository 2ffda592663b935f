"""Supervise tritonserver: restart it when it dies or stops answering, say why, and count the restarts.

Triton 2.51 can be killed by one request (a JSON body nesting 100,000 arrays: SIGSEGV; the HTTP
guard stops that one, gRPC or a future bug may find another), and a python-backend stub can die
while Triton keeps reporting ready. `Supervisor.run()` watches the process and a canary inference
every `canary_interval_s`: on an exit, or after `canary_strikes` broken canaries in a row, it logs
the cause with the log's last lines, waits a backoff (doubling from `backoff_initial_s` to
`backoff_max_s`, reset after `stable_s` of uptime) and respawns tritonserver behind the same ports.
More than `max_restarts` restarts within `window_s` is a crash loop: it gives up (exit 1).

What an operator sees: log lines, and the status file (JSON, rewritten atomically on every change):
state (starting | ready | unhealthy | overloaded | restarting | failed | stopped), pid, restarts,
the last crashes with their causes, the last canary, the guard's rejections by HTTP status.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ServerError
from serving.server import TritonServer, exit_cause

log = logging.getLogger("serving.supervisor")


@dataclass(frozen=True)
class SupervisorConfig:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_s: float = 60.0  # an uptime this long resets the backoff
    max_restarts: int = 10  # within window_s; more is a crash loop and the supervisor gives up
    window_s: float = 600.0
    canary_interval_s: float = 5.0
    canary_strikes: int = 3  # broken canaries in a row (process alive) that trigger a restart
    poll_s: float = 0.2

    def __post_init__(self):
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(f"need 0 < backoff_initial_s <= backoff_max_s, got {self}")
        if self.max_restarts < 1 or self.canary_strikes < 1 or self.canary_interval_s <= 0:
            raise ValueError(f"max_restarts, canary_strikes and canary_interval_s must be positive, got {self}")


class Supervisor:
    """Own one TritonServer for its whole life: start, watch, restart, stop (also on every error path)."""

    def __init__(
        self, server: TritonServer, cfg: SupervisorConfig = SupervisorConfig(), status_file: Path | None = None
    ):
        self.server, self.cfg = server, cfg
        self.status_file = Path(status_file or server.options.log_file.with_suffix(".status.json"))
        self.state = "stopped"
        self.restarts = 0
        self.crashes: deque = deque(maxlen=20)
        self.last_canary: dict | None = None
        self._stop = threading.Event()
        self._restart_times: deque = deque()
        self._backoff = cfg.backoff_initial_s
        self._thread: threading.Thread | None = None

    def run(self) -> int:
        """Start tritonserver, then watch it until stop() (0) or a crash loop (1); it is stopped either way."""
        self._stop.clear()
        self._set("starting")
        try:
            self.server.start()
            self._set("ready")
            s = self.server
            log.info(
                "ready: http://%s  grpc %s  metrics %s  (pid %s; Ctrl-C stops; state in %s)",
                s.http_url,
                s.grpc_url,
                s.metrics_url,
                s.process.pid,
                self.status_file,
            )
            return self._watch()
        finally:
            self.server.stop()
            if self.state != "failed":
                self._set("stopped")

    def stop(self) -> None:
        """Ask run() to return; safe from a signal handler (it only sets an event)."""
        self._stop.set()

    def start_background(self, timeout_s: float = 180.0) -> Supervisor:
        """run() in a thread (tests, benchmarks); returns once the server is ready, ServerError if it is not."""
        self._thread = threading.Thread(target=self._run_quietly, name="supervisor", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while self.state in ("stopped", "starting") and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.state != "ready":
            self.stop_background()
            raise ServerError(
                f"the supervised tritonserver did not become ready (state {self.state}); log: "
                f"{self.server.options.log_file}"
            )
        return self

    def _run_quietly(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - start_background reports the state
            log.exception("supervisor failed")

    def stop_background(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(120)

    def _watch(self) -> int:
        strikes, next_canary = 0, time.monotonic() + self.cfg.canary_interval_s
        while not self._stop.wait(self.cfg.poll_s):
            code = self.server.process.poll()
            if code is not None:
                cause = f"{exit_cause(code)}"
            elif time.monotonic() < next_canary:
                continue
            else:
                result = self.server.canary.check()
                next_canary = time.monotonic() + self.cfg.canary_interval_s
                strikes = strikes + 1 if result.kind == "broken" else 0
                self.last_canary = result.to_dict()
                self._set({"ok": "ready", "overloaded": "overloaded"}.get(result.kind, "unhealthy"))
                if strikes < self.cfg.canary_strikes:
                    continue
                cause = f"stopped answering: {strikes} canary inferences failed in a row ({result.detail})"
            if not self._restart(cause):
                return 1
            strikes, next_canary = 0, time.monotonic() + self.cfg.canary_interval_s
        return 0

    def _restart(self, cause: str) -> bool:
        """Log the cause, back off, respawn until it answers; False when the restarts form a crash loop."""
        while not self._stop.is_set():
            uptime = time.monotonic() - (self.server.started_at or time.monotonic())
            self.crashes.append(
                {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cause": cause, "uptime_s": round(uptime, 1)}
            )
            log.error("tritonserver %s after %.0f s up; last log lines:\n%s", cause, uptime, self.server.log_tail())
            now = time.monotonic()
            self._restart_times.append(now)
            while self._restart_times and now - self._restart_times[0] > self.cfg.window_s:
                self._restart_times.popleft()
            if len(self._restart_times) > self.cfg.max_restarts:
                self._set("failed")
                log.error(
                    "tritonserver needed %d restarts within %.0f s: a crash loop; giving up (log: %s)",
                    len(self._restart_times) - 1,
                    self.cfg.window_s,
                    self.server.options.log_file,
                )
                return False
            self._backoff = self.cfg.backoff_initial_s if uptime >= self.cfg.stable_s else self._backoff
            self._set("restarting")
            log.warning("restarting tritonserver in %.1f s (restart %d)", self._backoff, self.restarts + 1)
            if self._stop.wait(self._backoff):
                return True
            self._backoff = min(2 * self._backoff, self.cfg.backoff_max_s)
            try:
                self.server.respawn()
            except (ServerError, OSError) as e:  # counts as another crash: back off longer
                cause = f"failed to restart: {e}"
                continue
            self.restarts += 1
            self._set("ready")
            log.warning(
                "tritonserver restarted (pid %s, restart %d); it answers as before",
                self.server.process.pid,
                self.restarts,
            )
            return True
        return True

    def status(self) -> dict:
        s, o = self.server, self.server.options
        guard = dict(s.guard.rejected) if s.guard is not None else {}  # a copy: the guard's thread updates it
        return {
            "state": self.state,
            "pid": s.process.pid if s.process is not None else None,
            "supervisor_pid": os.getpid(),
            "restarts": self.restarts,
            "crashes": list(self.crashes),
            "last_canary": self.last_canary,
            "guard_rejections": {str(k): v for k, v in sorted(guard.items())},
            "http": s.http_url,
            "grpc": s.grpc_url,
            "metrics": s.metrics_url,
            "repository": str(o.repository),
            "log_file": str(o.log_file),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _set(self, state: str) -> None:
        """Record the state and rewrite the status file atomically (a reader never sees half a file)."""
        self.state = state
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status_file.with_name(f".{self.status_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.status(), indent=2))
            os.replace(tmp, self.status_file)
        except OSError as e:
            log.warning("cannot write the status file %s: %s", self.status_file, e)


class RepositoryLock:
    """An exclusive lock on serving one repository (fcntl.flock on a file under .cache; freed when the process dies)."""

    def __init__(self, repository: Path, cache: Path):
        key = str(Path(repository).resolve()).strip("/").replace("/", "_")[-150:]
        self.path = Path(cache) / "locks" / f"{key}.lock"
        self._file = None

    def acquire(self, what: str) -> RepositoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ServerError(f"{holder} holds the repository; stop it first, or use another --repository") from None
        self._file.truncate(0)
        self._file.write(f"`python -m serving` (pid {os.getpid()}, {what})")
        self._file.flush()
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> RepositoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def serving_processes(repository: Path) -> list[int]:
    """Pids of tritonserver processes started with --model-repository=<repository> (from /proc)."""
    flag = f"--model-repository={Path(repository).resolve()}".encode()
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"tritonserver") and flag in args:
            pids.append(int(cmdline.parent.name))
    return pids
