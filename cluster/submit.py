"""`recforge submit <recipe> --config <name|path> [--address URL] [key=value ...]`: `ray job submit` for a recipe.

Runs `ray job submit --working-dir . -- python -m recipes.<recipe> --config ... cluster.address=auto ...` with token
authentication (`RAY_AUTH_MODE=token`; the token comes from `~/.ray/auth_token` or `RAY_AUTH_TOKEN`) and streams
the job's logs until it finishes; the exit code is the job's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_command(recipe: str, config: str, overrides: list[str], *, address: str, ray_bin: str) -> list[str]:
    if not any(o.startswith("cluster.address=") for o in overrides):
        overrides = [*overrides, "cluster.address=auto"]
    return [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
            "python", "-m", f"recipes.{recipe}", "--config", config, *overrides]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recforge submit", description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--config", default="debug")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="Ray jobs API address (default $RAY_ADDRESS or the local head).")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key.sub=value)")
    from rl.cli import available_recipes
    from rl.config import ConfigError, load_config, resolve_config_path

    if args.recipe not in available_recipes():
        parser.error(f"unknown recipe '{args.recipe}'; known: {', '.join(available_recipes())}")
    try:  # fail here, not on the cluster, when the config is wrong
        load_config(resolve_config_path(args.recipe, args.config), overrides)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    cmd = build_command(args.recipe, args.config, overrides, address=args.address, ray_bin=ray_bin)
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, env=env, check=False).returncode
