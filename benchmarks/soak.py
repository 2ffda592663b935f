"""Soak and overload of the served task, through `python -m serving` (what `make serve` runs) on 127.0.0.1.

    python -m benchmarks.soak --run runs/default [--requests 2000 --concurrency 16 --overload-concurrency 64]

The server is started as `make serve` starts it (supervised, guarded HTTP, queue policy from ServeConfig
defaults) in a subprocess on free 127.0.0.1 ports, from a repository generated in a temporary directory.
Soak: `--requests` requests (one held-out text each, HTTP and gRPC alternating) at `--concurrency`;
every one must be answered, with the label the same text got before the soak. Overload: as many
requests at `--overload-concurrency`; each must be answered, or rejected with the queue policy's
clear error (ServerBusyError), within the queue timeouts of the ensemble's four models plus the
time an answered request takes (Triton notices an expired request when the model's batcher next runs,
after the batch executing meanwhile; and a request may have run earlier models first). The
tritonserver resident memory before and after, and the supervisor's restarts, are recorded. Results:
docs/serving_soak.json and docs/serving_soak.md. Timing figures are meaningless on a busy machine: the
load average is recorded before each phase.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.serving_bench import load_texts
from serving.client import Client, ServerBusyError
from serving.config import ServeConfig
from serving.repository import PROJECT_ROOT
from serving.server import free_port

STAGES = 4  # tokenizer, backbone, adapter, postprocess: each has its own queue and timeout


def start_server(run: Path, tmp: Path, extra: list[str]) -> tuple[subprocess.Popen, dict, Path]:
    """`python -m serving` on free ports; returns once its status file says ready."""
    ports = dict(zip(("http", "grpc", "metrics"), (free_port() for _ in range(3))))
    log = tmp / "tritonserver.log"
    cmd = [
        sys.executable,
        "-m",
        "serving",
        "--runs",
        str(run),
        "--repository",
        str(tmp / "model_repository"),
        "--log-file",
        str(log),
        *(f"--{k}-port={v}" for k, v in ports.items()),
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=open(tmp / "serve.out", "wb"), stderr=subprocess.STDOUT)
    status = log.with_suffix(".status.json")
    deadline = time.monotonic() + 300
    while not (status.is_file() and json.loads(status.read_text())["state"] == "ready"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"python -m serving did not become ready:\n{(tmp / 'serve.out').read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, ports, status


def _tree(pid: int) -> list[int]:
    """A process and its descendants (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (tritonserver and its python stubs), MiB."""
    total = 0
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        except (OSError, StopIteration):
            pass
    return total / 1024


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds all processes have used, CPU seconds of `pids` and their descendants), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    ours = 0
    for p in {q for pid in pids for q in _tree(pid)}:
        try:
            ours += sum(int(x) for x in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        except OSError:
            pass
    return (sum(f) - f[3] - f[4]) / ticks, ours / ticks


def timed_phase(pids: list[int], call) -> tuple[list, float, float]:
    """Run `call()`; return its result, the wall time, and the cores other processes used meanwhile."""
    busy0, ours0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    result = call()
    wall = time.perf_counter() - t0
    busy1, ours1 = cpu_seconds(pids)
    return result, wall, max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall


def drive(ports: dict, task: str, texts: list[str], n: int, concurrency: int) -> list[tuple[str, float, str]]:
    """n requests on `concurrency` threads: (outcome ok | busy | failed, latency s, label or error) each."""
    local = threading.local()

    def one(i: int):
        protocol = "grpc" if i % 2 else "http"
        if getattr(local, protocol, None) is None:
            setattr(local, protocol, Client(f"127.0.0.1:{ports[protocol]}", protocol, timeout_s=120))
        t0 = time.perf_counter()
        try:
            (p,) = getattr(local, protocol).classify(task, [texts[i % len(texts)]])
            return "ok", time.perf_counter() - t0, p.label
        except ServerBusyError as e:
            return "busy", time.perf_counter() - t0, str(e)
        except Exception as e:  # noqa: BLE001 - counted as a failure
            return "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}"

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def summarize(results: list, wall_s: float, concurrency: int) -> dict:
    out = {
        "requests": len(results),
        "concurrency": concurrency,
        "wall_s": round(wall_s, 2),
        "throughput_rps": round(sum(r[0] == "ok" for r in results) / wall_s, 2),
    }
    for kind in ("ok", "busy", "failed"):
        lat = np.array([r[1] for r in results if r[0] == kind])
        out[kind] = {"count": int(lat.size)} | (
            {
                "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 1),
                "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 1),
                "max_ms": round(1e3 * float(lat.max()), 1),
            }
            if lat.size
            else {}
        )
    out["failures"] = sorted({r[2] for r in results if r[0] == "failed"})[:5]
    return out


def run(
    run_dir: Path,
    n: int,
    concurrency: int,
    overload_concurrency: int,
    overload_n: int,
    extra: list[str],
    texts_file: str | None = None,
) -> dict:
    texts, _, source = load_texts(run_dir, texts_file)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        proc, ports, status_file = start_server(run_dir, Path(tmp), extra)
        try:
            summary = json.loads((Path(tmp) / "model_repository" / "repository.json").read_text())
            task, cfg = next(iter(summary["tasks"])), ServeConfig(**summary["serve_config"])
            pid = json.loads(status_file.read_text())["pid"]
            first = drive(ports, task, texts, min(len(texts), 200), 4)  # each text's label before the soak
            expected = {t: r[2] for t, r in zip(texts, first) if r[0] == "ok"}
            rss_before, load1 = rss_mb(pid), os.getloadavg()[0]
            mine = [proc.pid, os.getpid()]
            soak, soak_s, other1 = timed_phase(mine, lambda: drive(ports, task, texts, n, concurrency))
            rss_after, load2 = rss_mb(pid), os.getloadavg()[0]
            over, over_s, other2 = timed_phase(
                mine, lambda: drive(ports, task, texts, overload_n, overload_concurrency)
            )
            rss_end, status = rss_mb(pid), json.loads(status_file.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    mismatched = sum(
        1
        for i, r in enumerate(soak)
        if r[0] == "ok" and texts[i % len(texts)] in expected and r[2] != expected[texts[i % len(texts)]]
    )
    answered_max = max((r[1] for r in over if r[0] == "ok"), default=0.0)
    bound_ms = round(STAGES * cfg.queue_timeout_us / 1e3 + 1e3 * answered_max, 1)
    return {
        "task": task,
        "run": str(run_dir),
        "texts": source,
        "serve_config": cfg.to_dict(),
        "soak": summarize(soak, soak_s, concurrency)
        | {
            "label_mismatches": mismatched,
            "load_avg_before": load1,
            "other_processes_cores": round(other1, 2),
            "rss_mb_before": round(rss_before),
            "rss_mb_after": round(rss_after),
        },
        "overload": summarize(over, over_s, overload_concurrency)
        | {
            "load_avg_before": load2,
            "rejection_bound_ms": bound_ms,
            "rss_mb_after": round(rss_end),
            "other_processes_cores": round(other2, 2),
        },
        "restarts": status["restarts"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }


def verdict(r: dict) -> list[str]:
    """What failed the run: any failure, a changed label, a rejection later than the queue timeouts, a restart."""
    problems = []
    for phase in ("soak", "overload"):
        if r[phase]["failed"]["count"]:
            problems.append(f"{phase}: {r[phase]['failed']['count']} failed requests: {r[phase]['failures']}")
    if r["soak"]["busy"]["count"] or r["soak"]["label_mismatches"]:
        problems.append(f"soak: {r['soak']['busy']['count']} rejected, {r['soak']['label_mismatches']} changed labels")
    busy = r["overload"]["busy"]
    if busy["count"] and busy["max_ms"] > r["overload"]["rejection_bound_ms"]:
        problems.append(
            f"overload: a rejection took {busy['max_ms']} ms, over {r['overload']['rejection_bound_ms']} ms"
        )
    if r["restarts"]:
        problems.append(f"{r['restarts']} restarts")
    return problems


def to_markdown(r: dict) -> str:
    lines = [
        f"# Soak and overload: task `{r['task']}` ({r['run']}), {r['date']}",
        "",
        f"`python -m serving` (supervised, guarded HTTP; queue: {r['serve_config']['max_queue_size']} requests, "
        f"{r['serve_config']['queue_timeout_us'] / 1e6:g} s per model) on 127.0.0.1; one held-out text per request, "
        f"HTTP and gRPC alternating; {r['machine']['cpus']} CPUs ({r['machine']['platform']}). "
        f"Command: `{r.get('command', 'python -m benchmarks.soak --run ' + r['run'])}`.",
        "",
        "| phase | concurrency | requests | answered | rejected (busy) | failed | req/s | p50 ms | p99 ms | max ms | "
        "other processes (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("soak", "overload"):
        p = r[phase]
        lines.append(
            f"| {phase} | {p['concurrency']} | {p['requests']} | {p['ok']['count']} | {p['busy']['count']} | "
            f"{p['failed']['count']} | {p['throughput_rps']} | {p['ok'].get('p50_ms', '-')} | "
            f"{p['ok'].get('p99_ms', '-')} | {p['ok'].get('max_ms', '-')} | {p['other_processes_cores']:.2f} |"
        )
    o, s = r["overload"], r["soak"]
    lines += [
        "",
        f"- Soak: {s['label_mismatches']} labels differ from the same text's answer before the soak; "
        f"tritonserver + stubs resident memory {s['rss_mb_before']} MiB before, {s['rss_mb_after']} MiB after, "
        f"{o['rss_mb_after']} MiB after the overload.",
        f"- Overload: rejections (busy) p50 {o['busy'].get('p50_ms', '-')} ms, max {o['busy'].get('max_ms', '-')} ms; "
        f"bound {o['rejection_bound_ms']:g} ms (the queue timeout in each of 4 models + the slowest answered request).",
        f"- Supervisor restarts: {r['restarts']}. Verdict: {'; '.join(verdict(r)) or 'pass'}.",
        f"- Other processes used {o['other_processes_cores']:.2f} / {s['other_processes_cores']:.2f} cores on average "
        f"during the overload / soak (of {r['machine']['cpus']}); above about 0.1 the timings are contended.",
    ]
    return "\n".join(lines) + "\n"


def summary(docs: Path) -> list[str]:
    """This benchmark's section of docs/BENCHMARKS.md, from docs/serving_soak.json (its own schema)."""
    from benchmarks.report import absent, load_json

    out = ["## Soak and overload of the served model", ""]
    r = load_json(docs / "serving_soak.json")
    if not r:
        return out + absent("docs/serving_soak.json", "python -m benchmarks.soak --run runs/<name>")
    out += [
        f"From `docs/serving_soak.json` ({r['date']}; command `{r['command']}`). Details: "
        "[serving_soak.md](serving_soak.md).",
        "",
        "| phase | requests | concurrency | answered | rejected (busy) | failed | req/s | answered p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {name} | {p['requests']} | {p['concurrency']} | {p['ok']['count']} | {p['busy']['count']} | "
        f"{p['failed']['count']} | {p['throughput_rps']:.1f} | {p['ok'].get('p50_ms', '-')} / {p['ok'].get('p99_ms', '-')} |"
        for name, p in (("soak", r["soak"]), ("overload", r["overload"]))
    ]
    return out + ["", f"tritonserver restarts during the run: {r['restarts']}.", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="exported run (runs/<name>)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--overload-concurrency", type=int, default=64)
    p.add_argument("--overload-requests", type=int, default=1280)
    p.add_argument("--texts", help="examples file (default: the run's held-out split)")
    p.add_argument("--serve-args", default="", help="extra `python -m serving` arguments, e.g. '--ort-threads 2'")
    p.add_argument("--out-dir", default=str(PROJECT_ROOT / "docs"))
    p.add_argument("--name", default="serving_soak", help="report file names: <out-dir>/<name>.json and .md")
    args = p.parse_args(argv)
    for name in ("requests", "overload_requests"):
        if not 1 <= getattr(args, name) <= 100_000:
            p.error(f"--{name.replace('_', '-')} must be in [1, 100000]")
    result = run(
        Path(args.run),
        args.requests,
        args.concurrency,
        args.overload_concurrency,
        args.overload_requests,
        args.serve_args.split(),
        args.texts,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result["command"] = "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 1 if verdict(result) else 0


if __name__ == "__main__":
    raise SystemExit(main())
