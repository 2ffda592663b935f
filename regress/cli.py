"""`python -m regress --run runs/default [--serve] [--latency] [--update]`: compare a run with its baseline.

Exit codes: 0 all checks pass, 1 a check failed (or --update refused), 2 missing/corrupt artifact,
missing baseline or bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from contracts.artifacts import ArtifactError

from . import rules
from .baseline import BASELINE_FILE, RegressError, load_baseline, write_baseline
from .measure import Options, measure
from .rules import ABSOLUTE, DEFAULT_TOLERANCES, RULES, Rule, compare, format_table, resolve_tolerances

REPORT_FILE = "regress.json"
RULES_HELP = rules.__doc__.split("\n\n", 1)[1]


def parse_tolerances(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in DEFAULT_TOLERANCES:
            raise RegressError(f"--tolerances {item!r}: unknown key {key!r}; known: {', '.join(DEFAULT_TOLERANCES)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise RegressError(f"--tolerances {item!r}: {value!r} is not a number") from None
        if out[key] < 0 or (key.startswith("agreement") and out[key] > 1):
            raise RegressError(f"--tolerances {item!r}: must be >= 0 (agreement in [0, 1])")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m regress",
        description=__doc__.split("\n\n")[0],
        epilog=RULES_HELP + "\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="run directory with checkpoint/ and onnx/ (runs/<name>)")
    p.add_argument("--baseline", type=Path, help=f"baseline file (default: RUN/{BASELINE_FILE})")
    p.add_argument("--update", action="store_true", help="rewrite the baseline with this run's figures (deliberately)")
    p.add_argument("--force", action="store_true", help="with --update: write even if an absolute check fails")
    p.add_argument("--serve", action="store_true", help="also classify the held-out split through a real tritonserver")
    p.add_argument(
        "--latency", action="store_true", help="also measure latency ratios (PyTorch, ORT, served with --serve)"
    )
    p.add_argument("--latency-requests", type=int, default=100, help="timed single-example calls per path")
    p.add_argument(
        "--tolerances",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"override tolerances; keys: {', '.join(DEFAULT_TOLERANCES)}",
    )
    p.add_argument("--rows", type=int, help="use only the first N held-out rows (must match the baseline)")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: all cores)")
    p.add_argument("--report", type=Path, help=f"JSON report of this check (default: RUN/{REPORT_FILE})")
    return p.parse_args(argv)


def _describe(baseline: dict, path: Path) -> str:
    env = baseline.get("environment", {})
    return (
        f"baseline {path}: written {env.get('date', '?')} on {env.get('host', '?')} "
        f"({env.get('cpu_count', '?')} CPUs); command `{baseline.get('command', '?')}`"
    )


def run(args: argparse.Namespace, command: str) -> int:
    if args.latency_requests < 1 or (args.rows is not None and args.rows < 1):
        raise RegressError("--latency-requests and --rows must be >= 1")
    cli_tol = parse_tolerances(args.tolerances)
    path = args.baseline or args.run / BASELINE_FILE
    try:
        baseline = load_baseline(path) if path.is_file() else None
    except RegressError as e:
        if not args.update:
            raise
        print(f"note: {e}; --update replaces it")
        baseline = None
    if baseline is None and not args.update:
        raise RegressError(
            f"no baseline at {path}: create one from this run with "
            f"`python -m regress --run {args.run} --update` (or `make regress RUN={args.run} "
            f"ARGS=--update`), after checking the run is good"
        )
    opts = Options(
        rows=args.rows,
        threads=args.threads,
        serve=args.serve,
        latency=args.latency,
        latency_requests=args.latency_requests,
    )
    figs = measure(args.run, opts)
    stored = (baseline or {}).get("tolerances") or {}
    tol = resolve_tolerances(figs.info["precision"], stored, cli_tol, figs.info.get("cpu_runtime", "exact"))
    rows = compare((baseline or {}).get("metrics", {}), figs.metrics, tol)
    print(
        f"regression check of {args.run} ({figs.info['task']}, {figs.info['precision']}, "
        f"{int(figs.metrics['data.heldout_rows'])} held-out rows)"
    )
    if baseline:
        print(_describe(baseline, path))
        if baseline.get("info", {}).get("heldout_sha256") not in (None, figs.info["heldout_sha256"]):
            print("note: the held-out split differs from the baseline's (the run was retrained on another split?)")
        if args.latency and baseline.get("info", {}).get("threads") != args.threads:
            print(
                f"note: the baseline's latency was measured with --threads {baseline.get('info', {}).get('threads')}, "
                f"this run with {args.threads}: latency ratios are comparable only at equal thread counts"
            )
    print(
        "tolerances: "
        + ", ".join(
            f"{k} {v:g}" + (" (cli)" if k in cli_tol else " (baseline)" if k in stored else "")
            for k, v in tol.items()
            if v is not None
        )
    )
    print(format_table(rows))
    report = args.report or args.run / REPORT_FILE
    failed = [r.metric for r in rows if r.status == "FAIL"]
    report.write_text(
        json.dumps(
            {
                "baseline": str(path),
                "command": command,
                "tolerances": tol,
                "passed": not failed,
                "failed": failed,
                "rows": [r.__dict__ for r in rows],
                "metrics": figs.metrics,
                "info": figs.info,
            },
            indent=2,
        )
        + "\n"
    )
    if not args.update:
        return 1 if failed else 0
    absolute = [r.metric for r in rows if r.status == "FAIL" and RULES.get(r.metric, Rule("info")).kind in ABSOLUTE]
    if absolute and not args.force:
        print(
            f"refusing to write a baseline: {', '.join(absolute)} fail their absolute limits "
            "(fix the run, or pass --force to record it anyway)"
        )
        return 1
    dropped = sorted(set((baseline or {}).get("metrics", {})) - set(figs.metrics))
    write_baseline(path, figs, {**stored, **cli_tol}, command)
    print(
        f"baseline {'rewritten deliberately' if baseline else 'created'}: {path} ({len(figs.metrics)} metrics)"
        + (f"; dropped, not measured in this run: {', '.join(dropped)}" if dropped else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m regress " + shlex.join(sys.argv[1:] if argv is None else argv)
    from serving.errors import RepositoryError, ServerError

    try:
        return run(args, command)
    except (RegressError, ArtifactError, FileNotFoundError, ValueError, RepositoryError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
