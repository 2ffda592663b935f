"""`python -m training`: fine-tune a Hugging Face encoder with MP-ISMoE (or a baseline) into a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contracts.artifacts import ArtifactError

from .config import ConfigError, load_config

EPILOG = """examples:
  python -m training --config configs/default.yaml --out runs/default
  python -m training --config configs/default.yaml --out runs/lora --set train.method=lora \\
        --set quant.enabled=false --set side.enabled=false
  python -m training --out runs/quick --set data.max_examples=2000 --set train.epochs=1

outputs in --out: checkpoint/ (config.json, backbone_q.safetensors, side.safetensors, tokenizer/,
metrics.json, manifest.json), metrics.json, train_log.jsonl, curves.png
"""


def add_set_argument(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set KEY=VALUE` config override every command that trains takes."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help="YAML run config (default: built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="run directory, e.g. runs/default")
    add_set_argument(p, "override one config value, e.g. train.epochs=1 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (CI logs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from .trainer import Trainer

        Trainer(cfg, args.out, progress=not args.no_progress and sys.stderr.isatty()).run()
    except (ConfigError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .data import DataError

        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
