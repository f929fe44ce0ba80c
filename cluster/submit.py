"""`recforge submit <recipe> --config <name|path> [options] [key=value ...]`: `ray job submit` for a recipe.

Runs, from the repository root:

    ray job submit --address URL --working-dir <repo> --runtime-env cluster/runtime_env.yaml -- \
        python -m recipes.<recipe> --config <config> [key=value ...] cluster.address=auto

and streams the job's logs until it ends; the exit code is `ray job submit`'s (1 when the job failed).

- The config and overrides are checked here first, so a typo fails in a second, not on the cluster.
- Token authentication (on by default for `ray start --head` in Ray 2.60): `RAY_AUTH_MODE=token` unless it is set
  otherwise (`RAY_AUTH_MODE=disabled` for a cluster without it). The token is `RAY_AUTH_TOKEN`, the file named by
  `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` (on the head: `ray get-auth-token`). Without one this fails before
  anything is uploaded, and says where to put it. The token itself is never printed.
- `--runtime-env FILE` (default cluster/runtime_env.yaml, `none` for no file): env vars, upload excludes, optional pip
  packages for the job. Its `working_dir`, if any, is replaced by the repository root.
- `--no-wait` submits and returns at once with the commands to follow (`ray job logs -f`) or stop the job.
- Resubmitting the same command after a failure or a preemption resumes the run from its last checkpoint
  (`run.resume: auto`, the default), provided `run.output_dir` is on storage the new driver can read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"


def build_command(recipe: str, config: str, overrides: list[str], *, address: str, ray_bin: str,
                  runtime_env: Path | None = None, no_wait: bool = False) -> list[str]:
    """The `ray job submit` command line (the job joins the cluster with `cluster.address=auto`)."""
    if not any(o.startswith("cluster.address=") for o in overrides):
        overrides = [*overrides, "cluster.address=auto"]
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT)]
    if runtime_env is not None:
        cmd += ["--runtime-env", str(runtime_env)]
    if no_wait:
        cmd.append("--no-wait")
    return [*cmd, "--", "python", "-m", f"recipes.{recipe}", "--config", config, *overrides]


def auth_problem(env: dict[str, str]) -> str | None:
    """Why `ray job submit` would be refused for lack of a token, or None. Ray reads the same three places."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if env.get("RAY_AUTH_TOKEN"):
        return None
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        path = Path(token_path).expanduser()
        if path.is_file() and path.read_text().strip():
            return None
        return f"RAY_AUTH_TOKEN_PATH={token_path} is not a readable, non-empty token file."
    if (Path.home() / ".ray" / "auth_token").is_file():
        return None
    return ("token authentication is on (RAY_AUTH_MODE=token) but no token was found: set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH to a file holding it, or copy it to ~/.ray/auth_token (print it on the head with "
            "`ray get-auth-token`). For a cluster without token authentication set RAY_AUTH_MODE=disabled.")


def check_runtime_env(value: str) -> Path | None:
    """The runtime-env YAML to send (None for `none`); fails with the reason when it is not a usable mapping."""
    if value.lower() == "none":
        return None
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--runtime-env {value}: no such file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--runtime-env {value} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--runtime-env {value} must hold a mapping (env_vars, excludes, pip, ...).")
    return path.resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recforge submit", description=__doc__.split("\n")[0],
                                     epilog="Example: recforge submit rec_reasoning --config debug run.num_steps=2")
    parser.add_argument("recipe")
    parser.add_argument("--config", default="debug", help="Config name under recipes/<recipe>/ or a YAML path.")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="Ray jobs API (dashboard) address (default $RAY_ADDRESS or http://127.0.0.1:8265).")
    parser.add_argument("--runtime-env", default=str(DEFAULT_RUNTIME_ENV),
                        help="Runtime-env YAML for the job (default cluster/runtime_env.yaml; 'none' for none).")
    parser.add_argument("--no-wait", action="store_true", help="Submit and return without streaming the logs.")
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key.sub=value)")
    from rl.cli import available_recipes
    from rl.config import ConfigError, load_config, resolve_config_path

    if args.recipe not in available_recipes():
        parser.error(f"unknown recipe '{args.recipe}'; known: {', '.join(available_recipes())}")
    try:  # fail here, not on the cluster, when the config is wrong
        config_path = resolve_config_path(args.recipe, args.config)
        load_config(config_path, overrides)
        runtime_env = check_runtime_env(args.runtime_env)
    except (ConfigError, ValueError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2
    # A config given as a path must resolve on the cluster too: send it relative to the uploaded working dir.
    config = args.config
    if Path(config).is_file() and Path(config).resolve().is_relative_to(ROOT):
        config = str(Path(config).resolve().relative_to(ROOT))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    problem = auth_problem(env)
    if problem:
        print(f"recforge submit: {problem}", file=sys.stderr)
        return 2
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
    cmd = build_command(args.recipe, config, overrides, address=args.address, ray_bin=ray_bin,
                        runtime_env=runtime_env, no_wait=args.no_wait)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.run(cmd, env=env, check=False).returncode
    except KeyboardInterrupt:
        print("\nrecforge submit: stopped following the logs; the job keeps running. Follow it again with "
              f"`ray job logs -f --address {args.address} <submission id>`, stop it with `ray job stop`.",
              file=sys.stderr)
        return 130
