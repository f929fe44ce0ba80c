"""The `recforge` command line.

    recforge prepare [model|data|encoder|all]       fetch and convert the embedded model and data (once)
    recforge run <recipe> --config debug [k=v ...]  run a recipe locally (everything colocated)
    recforge reward {list,test,new} ...             develop and try reward plugins
    recforge submit <recipe> --config ... [k=v ...] submit a recipe to a Ray cluster (`ray job submit`)
    recforge eval <recipe> --checkpoint DIR [--config ...] [k=v ...]
                                                    evaluate a checkpoint (HR@K, NDCG@K, ...): table + JSON
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def available_recipes() -> list[str]:
    """Recipe names: folders under recipes/ that hold a main.py."""
    return sorted(p.parent.name for p in RECIPES_DIR.glob("*/main.py"))


def _parser() -> argparse.ArgumentParser:
    recipes = ", ".join(available_recipes()) or "(none yet)"
    parser = argparse.ArgumentParser(
        prog="recforge",
        description="RecForge: distributed RL post-training for LLM recommenders and GUI agents.",
        epilog=f"Recipes: {recipes}.  Example: recforge run rec_reasoning --config debug run.num_steps=2",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="Prepare the embedded model, data and encoder into $RECFORGE_HOME.")
    prep.add_argument("what", nargs="?", default="all", choices=["model", "data", "encoder", "all"])
    run = sub.add_parser("run", help="Run a recipe on this machine.", epilog=f"Recipes: {recipes}.")
    run.add_argument("recipe", help=f"One of: {recipes}.")
    run.add_argument("--config", default="debug", help="Config name under recipes/<recipe>/ or a YAML path.")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. rollout.temperature=0.8")
    ev = sub.add_parser("eval", help="Evaluate a checkpoint with the recipe's metrics (table and JSON).",
                        epilog=f"Recipes: {recipes}.")
    ev.add_argument("recipe", help=f"One of: {recipes}.")
    ev.add_argument("--checkpoint", default=None,
                    help="A checkpoint directory (runs/<name>/checkpoints/step_NNNNNN) or a run directory (its latest "
                         "checkpoint). Omit to evaluate the config's base model.")
    ev.add_argument("--config", default=None,
                    help="Config name under recipes/<recipe>/ or a YAML path (default: the checkpoint's own config, "
                         "else debug).")
    ev.add_argument("--output", default=None,
                    help="Where to write the JSON report (default: <checkpoint>/eval.json, else "
                         "runs/eval-<recipe>.json).")
    ev.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.num_eval_users=32")
    sub.add_parser("reward", help="Reward plugins: list, test on saved rollouts, new skeleton.", add_help=False)
    sub.add_parser("submit", help="Submit a recipe to a Ray cluster with `ray job submit`.", add_help=False)
    return parser


def _run(args: argparse.Namespace) -> int:
    from rl.config import ConfigError, load_config, resolve_config_path

    if args.recipe not in available_recipes():
        import difflib

        close = difflib.get_close_matches(args.recipe, available_recipes(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown recipe '{args.recipe}'. Known: {', '.join(available_recipes())}.{hint}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(resolve_config_path(args.recipe, args.config), args.overrides)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"recipes.{args.recipe}.main")
    module.main(cfg)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rl.config import ConfigError, load_config, resolve_config_path
    from rl.evaluation import print_table, resolve_checkpoint, run_eval, write_report

    if args.recipe not in available_recipes():
        print(f"error: unknown recipe '{args.recipe}'. Known: {', '.join(available_recipes())}.", file=sys.stderr)
        return 2
    try:
        checkpoint = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
        if args.config is not None:
            source = resolve_config_path(args.recipe, args.config)
        elif checkpoint is not None:
            source = checkpoint / "config.yaml"
        else:
            source = resolve_config_path(args.recipe, "debug")
        cfg = load_config(source, args.overrides)
        metrics = run_eval(args.recipe, cfg, checkpoint)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else (
        checkpoint / "eval.json" if checkpoint is not None else Path(cfg.run.output_dir) / f"eval-{args.recipe}.json")
    write_report(metrics, output, recipe=args.recipe, checkpoint=checkpoint)
    print_table(metrics, title=f"{args.recipe}: {checkpoint or cfg.model.path}")
    print(f"report: {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `reward` and `submit` own their argument parsing; dispatch before argparse sees their flags.
    if argv and argv[0] == "reward":
        from rewards.cli import main as reward_main

        return reward_main(argv[1:])
    if argv and argv[0] == "submit":
        from cluster.submit import main as submit_main

        return submit_main(argv[1:])
    parser = _parser()
    # Overrides may follow or precede --config; argparse's subparsers stop at the first positional, so collect the
    # `key=value` leftovers here and reject anything else.
    args, extra = parser.parse_known_args(argv)
    bad = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if bad or (extra and args.command not in ("run", "eval")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if args.command in ("run", "eval"):
        args.overrides = [*args.overrides, *extra]
    if args.command == "prepare":
        from rl.assets import prepare

        for name, path in prepare(args.what).items():
            print(f"{name}: {path}")
        return 0
    if args.command == "eval":
        return _eval(args)
    return _run(args)


if __name__ == "__main__":
    raise SystemExit(main())
