"""What every recipe's `main.py` ends with: run the trainer and report, and the `python -m recipes.<name>` CLI."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rl.config import Config, ConfigError, load_config, resolve_config_path

if TYPE_CHECKING:  # the trainer pulls in ray and torch: recipe modules stay cheap to import
    from rl.trainer import Trainer


def fit_and_report(trainer: Trainer, *, summary_prefixes: tuple[str, ...] = ("eval/", "reward/total")) -> Path:
    """Train to `run.num_steps` (the actors are released even on failure), draw the curves, print where they are."""
    from rl.plots import plot_run

    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    png = plot_run(trainer.run_dir)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k.startswith(summary_prefixes))
    print(f"\nRun finished: {trainer.run_dir}\n  {summary}\n  report: {png}")
    return trainer.run_dir


def recipe_cli(recipe: str, doc: str, main: Callable[[Config], object], argv: list[str] | None = None) -> int:
    """`python -m recipes.<recipe> --config <name|path> [key=value ...]`; a config error exits 2 with its message."""
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{recipe}", description=doc.split("\n")[0])
    parser.add_argument("--config", default="debug", help=f"Config name under recipes/{recipe}/ or a YAML path.")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(resolve_config_path(recipe, args.config), args.overrides)
        random.seed(cfg.run.seed)
        main(cfg)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    return 0
