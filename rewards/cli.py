"""`recforge reward ...`: develop reward plugins on saved rollouts, before any GPU is spent.

    recforge reward list                                         built-in and installed rewards, with their source
    recforge reward test <name> [--rollouts file.jsonl] [--limit N] [--kwargs JSON] [--details]
                                                                 run a reward locally (no Ray): scores, distribution,
                                                                 components, errors, time per call
    recforge reward new <name> [--dir D]                         write a plugin package skeleton (entry point + test)

Without `--rollouts`, `test` uses the shipped sample (rewards/data/sample_rollouts.jsonl, rec_reasoning-style
completions), e.g. `recforge reward test ranking --kwargs '{"mode": "rating"}'`. Also runnable as
`python -m rewards.cli ...`. Exit status: 0 ok, 1 the reward failed on some rollout, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import keyword
import math
import os
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rewards.api import RewardError, known_reward_names, list_rewards, resolve_reward
from rewards.local import LocalRewardScorer, RewardRun
from rl.config import ConfigError, RewardConfig, RewardSpec, build
from rl.rollout_io import RolloutFileError, read_rollouts
from rl.types import Rollout

SAMPLE_ROLLOUTS = Path(__file__).resolve().parent / "data" / "sample_rollouts.jsonl"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recforge reward", description="Develop and try reward plugins.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="Built-in and installed rewards with their source.")
    test = sub.add_parser("test", help="Run a reward on saved rollouts, locally, without Ray.")
    test.add_argument("name", help="Reward name (see `list`) or 'package.module:function'.")
    test.add_argument("--rollouts", type=Path, default=SAMPLE_ROLLOUTS,
                      help="Rollout JSONL file (default: the shipped sample, %(default)s).")
    test.add_argument("--limit", type=int, default=None, help="Use only the first N rollouts.")
    test.add_argument("--kwargs", default="{}", help='Keyword arguments for the reward as JSON, e.g. \'{"k": 5}\'.')
    test.add_argument("--batch-size", type=int, default=64, help="Rollouts per call (as RewardSpec.batch_size).")
    test.add_argument("--timeout", type=float, default=600.0,
                      help="Seconds per call (as RewardSpec.timeout_s; default %(default)s: an LLM judge's first call "
                           "includes its engine start).")
    test.add_argument("--show", type=int, default=50, help="Rows of the score table to print (default 50).")
    test.add_argument("--details", action="store_true",
                      help="Also print every shown rollout's full details as JSON (judge verdicts, reasons).")
    new = sub.add_parser("new", help="Write a reward plugin package skeleton with a test.")
    new.add_argument("name", help="Reward name: lower-case letters, digits and '_' (also the function name).")
    new.add_argument("--dir", type=Path, default=Path("."), help="Parent directory of the new package.")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 140, highlight=False)
    commands = {"list": _cmd_list, "test": _cmd_test, "new": _cmd_new}
    return commands[args.command](args, console)


def _fail(console: Console, message: str) -> int:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return 2


# ---------------------------------------------------------------------------------------------------------------------
# list


def _cmd_list(args: argparse.Namespace, console: Console) -> int:
    if not sys.stdout.isatty():  # piped or captured: one unwrapped line per reward, easy to grep
        return _print_list_plain(console)
    table = Table(title="Rewards (use the name in a recipe's reward.rewards[].name)", title_justify="left")
    for col in ("name", "source", "kind", "deterministic", "description"):
        table.add_column(col, overflow="fold")
    for row in list_rewards():
        if row.info is None:
            table.add_row(escape(row.name), escape(row.source), "-", "-", f"[red]{escape(row.error or '')}[/]")
            continue
        kind = "async" if row.info.is_async else "sync"
        table.add_row(row.name, escape(row.source), kind, "yes" if row.info.deterministic else "no",
                      escape(row.info.description))
    console.print(table)
    console.print("Ad-hoc rewards need no registration: name them 'package.module:function'.")
    return 0


def _print_list_plain(console: Console) -> int:
    rows = [("name", "source", "kind", "deterministic", "description")]
    for row in list_rewards():
        if row.info is None:
            rows.append((row.name, row.source, "-", "-", f"error: {row.error or ''}"))
        else:
            rows.append((row.name, row.source, "async" if row.info.is_async else "sync",
                         "yes" if row.info.deterministic else "no", " ".join(row.info.description.split())))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    console.print("Rewards (use the name in a recipe's reward.rewards[].name)", soft_wrap=True)
    for r in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        console.print(escape(line), soft_wrap=True)
    console.print("Ad-hoc rewards need no registration: name them 'package.module:function'.", soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# test


def _cmd_test(args: argparse.Namespace, console: Console) -> int:
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as err:
        return _fail(console, f"--kwargs is not valid JSON ({err}); e.g. --kwargs '{{\"mode\": \"rating\"}}'.")
    if not isinstance(kwargs, dict):
        return _fail(console, f"--kwargs must be a JSON object, got {type(kwargs).__name__}.")
    if args.limit is not None and args.limit < 1:
        return _fail(console, f"--limit {args.limit} must be >= 1.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `my_rewards:fn` in the current directory, as with `python -m`
    try:
        records = read_rollouts(args.rollouts, limit=args.limit)
        spec = build(RewardSpec, {"name": args.name, "kwargs": kwargs, "failure_policy": "skip_group",
                                  "timeout_s": args.timeout, "batch_size": args.batch_size, "max_retries": 0})
        scorer = LocalRewardScorer(RewardConfig(rewards=[spec]))
    except (RolloutFileError, RewardError, ConfigError) as err:
        return _fail(console, str(err))
    if not records:
        return _fail(console, f"{args.rollouts} holds no rollouts.")
    rollouts = [r.rollout for r in records]
    prepared = scorer.prepared[0]
    info = prepared.info
    kind = f"{'async' if info.is_async else 'sync'}, {'' if info.deterministic else 'not '}deterministic"
    console.print(f"[bold]{escape(prepared.key)}[/] from {escape(info.source)}: {kind}; "
                  f"kwargs {escape(json.dumps(kwargs))}; "
                  f"{len(rollouts)} rollouts from {escape(str(args.rollouts))}", soft_wrap=True)
    run = scorer.run(rollouts)
    _print_scores(console, rollouts, run, prepared.key, args.show)
    if args.details:
        _print_details(console, rollouts, run, prepared.key, args.show)
    _print_distribution(console, run, prepared.key)
    _print_errors(console, rollouts, run, prepared.key)
    _print_timing(console, run, prepared.key, len(rollouts))
    return 1 if any(e is not None for e in run.errors[prepared.key]) else 0


def _clip(text: str, width: int) -> str:
    flat = text.replace("\n", " ⏎ ")
    return escape(flat if len(flat) <= width else "…" + flat[-(width - 1):])


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value, ensure_ascii=False, default=str)


def _print_scores(console: Console, rollouts: Sequence[Rollout], run: RewardRun, key: str, show: int) -> None:
    table = Table(title="Scores", title_justify="left")
    for col, kw in (("rollout", {"no_wrap": True}), ("score", {"justify": "right"}), ("components", {}),
                    ("details / error", {}), ("completion (end)", {})):
        table.add_column(col, overflow="fold", **kw)
    for i, r in enumerate(rollouts[:show]):
        result, error = run.results[key][i], run.errors[key][i]
        if result is None:
            cause = f"[red]{escape(error or '')}[/]"
            table.add_row(escape(r.rollout_id), "[red]error[/]", "", cause, _clip(r.text, 48))
            continue
        comps = escape(", ".join(f"{k}={v:.4g}" for k, v in result.components.items()))
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in result.details.items())
        table.add_row(escape(r.rollout_id), f"{result.score:.4g}", comps, _clip(details, 60), _clip(r.text, 48))
    console.print(table)
    if len(rollouts) > show:
        console.print(f"... {len(rollouts) - show} more rows (--show N to print more)")


def _print_details(console: Console, rollouts: Sequence[Rollout], run: RewardRun, key: str, show: int) -> None:
    console.print("[bold]Details[/] (--details)")
    for r, result in zip(rollouts[:show], run.results[key][:show], strict=False):
        if result is not None:
            text = json.dumps(dict(result.details), ensure_ascii=False, default=str)
            console.print(f"{escape(r.rollout_id)}: {escape(text)}", soft_wrap=True)


def _histogram(scores: list[float]) -> list[tuple[str, int]]:
    distinct = sorted(set(scores))
    if len(distinct) <= 8:
        return [(f"{v:.4g}", scores.count(v)) for v in distinct]
    lo, hi = distinct[0], distinct[-1]
    edges = [lo + (hi - lo) * j / 5 for j in range(6)]
    counts = [0] * 5
    for s in scores:
        counts[min(4, int((s - lo) / (hi - lo) * 5))] += 1
    return [(f"[{edges[j]:.3g}, {edges[j + 1]:.3g}{']' if j == 4 else ')'}", counts[j]) for j in range(5)]


def _print_distribution(console: Console, run: RewardRun, key: str) -> None:
    scores = [r.score for r in run.results[key] if r is not None]
    if not scores:
        console.print("[red]No rollout was scored.[/]")
        return
    std = statistics.pstdev(scores) if len(scores) > 1 else 0.0
    console.print(f"\n[bold]Score distribution[/] (n={len(scores)}): mean {statistics.fmean(scores):.4g}, "
                  f"std {std:.4g}, min {min(scores):.4g}, median {statistics.median(scores):.4g}, "
                  f"max {max(scores):.4g}")
    for label, count in _histogram(scores):
        console.print(f"  {label:>18} {'█' * math.ceil(30 * count / len(scores))} {count}")
    components: dict[str, list[float]] = {}
    for result in run.results[key]:
        for name, value in (result.components.items() if result is not None else ()):
            components.setdefault(name, []).append(float(value))
    if components:
        table = Table(title="Components", title_justify="left")
        for col in ("component", "mean", "min", "max", "n"):
            table.add_column(col, justify="left" if col == "component" else "right")
        for name, values in components.items():
            table.add_row(escape(name), f"{statistics.fmean(values):.4g}", f"{min(values):.4g}", f"{max(values):.4g}",
                          str(len(values)))
        console.print(table)


def _print_errors(console: Console, rollouts: Sequence[Rollout], run: RewardRun, key: str) -> None:
    failed = [(r, e) for r, e in zip(rollouts, run.errors[key], strict=True) if e is not None]
    if not failed:
        console.print("[green]No errors.[/]")
        return
    table = Table(title=f"[red]Errors: {len(failed)} of {len(rollouts)} rollouts[/] (a training step would fail "
                        "under failure_policy 'fail', or drop these groups under 'skip_group')", title_justify="left")
    for col in ("rollout", "cause", "completion (end)"):
        table.add_column(col, overflow="fold")
    for r, error in failed:
        table.add_row(escape(r.rollout_id), escape(error or ""), _clip(r.text, 60))
    console.print(table)
    if any(e.startswith(("raised", "timed out")) for _, e in failed):
        console.print("A call that raises or times out fails its whole micro-batch: rerun with --batch-size 1 to see "
                      "which rollouts trigger it.")


def _print_timing(console: Console, run: RewardRun, key: str, num_rollouts: int) -> None:
    calls = run.call_seconds[key]
    total = sum(calls)
    console.print(f"[bold]Time[/]: {len(calls)} call(s), {total * 1e3:.1f} ms in all, {total / len(calls) * 1e3:.1f} "
                  f"ms per call (max {max(calls) * 1e3:.1f} ms), {total / num_rollouts * 1e3:.2f} ms per rollout")


# ---------------------------------------------------------------------------------------------------------------------
# new


_PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "RecForge reward plugin: {name}"
requires-python = ">=3.10"
# RecForge must be installed in the same environment (e.g. `pip install -e /path/to/recforge`). It is not listed
# here, so that installing this plugin can never pull an unrelated package of that name from an index.
dependencies = []

# The entry point is what makes `{name}` a reward name: RecForge looks up the group "recforge.rewards".
[project.entry-points."recforge.rewards"]
{name} = "{pkg}.reward:{name}"

[tool.setuptools]
packages = ["{pkg}"]
'''

_REWARD = '''"""The `{name}` reward, a RecForge plugin.

Try it on saved rollouts (no GPU, no Ray):

    recforge reward test {name} --rollouts path/to/rollouts.jsonl --limit 20

Use it in a recipe once this package is installed (`pip install -e .`):

    reward:
      rewards:
        - name: {name}
          weight: 0.5
          kwargs: {{min_words: 10}}
"""

from __future__ import annotations

import re

from rewards.api import per_sample, reward
from rl.types import RewardResult, Rollout

_ANSWER = re.compile(r"(?im)^\\s*rating\\s*:\\s*[1-5]\\s*$")


@reward("{name}", deterministic=True)
@per_sample
def {name}(rollout: Rollout, *, min_words: int = 10) -> RewardResult:
    """Example: 1.0 for a `Rating: N` answer after at least `min_words` words. Replace it with your reward."""
    words = len(rollout.text.split())
    answered = _ANSWER.search(rollout.text) is not None
    score = 1.0 if answered and words >= min_words else 0.0
    return RewardResult(score=score, components={{"answered": float(answered)}}, details={{"words": words}})
'''

_TEST = '''"""Tests of the `{name}` reward: `python -m pytest tests` (RecForge and this package installed)."""

from {pkg}.reward import {name}
from rl.rollout_io import make_rollout


def test_a_reasoned_answer_scores_one():
    text = "The user rated Alien and Star Wars 5/5; Terminator 2 is the same kind of film.\\nRating: 5"
    [result] = {name}([make_rollout(text)])
    assert result.score == 1.0


def test_a_missing_answer_scores_zero():
    [result] = {name}([make_rollout("They might like it, hard to say.")])
    assert result.score == 0.0
    assert result.components["answered"] == 0.0


def test_the_installed_entry_point_resolves_to_this_function():
    from rewards.api import resolve_reward

    assert resolve_reward("{name}").fn is {name}
'''

_README = '''# {dist}

A RecForge reward plugin providing the reward `{name}` (entry-point group `recforge.rewards`).

    pip install -e .                                   # into the environment where RecForge is installed
    recforge reward list                               # shows `{name}` with this package as its source
    recforge reward test {name} --rollouts rollouts.jsonl
    python -m pytest tests
'''


def _cmd_new(args: argparse.Namespace, console: Console) -> int:
    name = args.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        return _fail(console, f"'{name}' is not a valid reward name here: use lower-case letters, digits and '_', "
                              "starting with a letter (it is also the Python function name), e.g. 'mentions_item'.")
    if name in known_reward_names():
        return _fail(console, f"a reward named '{name}' already exists ({resolve_reward(name).source}); "
                              "pick another name.")
    dist, pkg = f"recforge-reward-{name.replace('_', '-')}", f"recforge_reward_{name}"
    root = args.dir / dist
    if root.exists():
        return _fail(console, f"{root} already exists; remove it or choose --dir.")
    files = {
        root / "pyproject.toml": _PYPROJECT, root / "README.md": _README, root / pkg / "__init__.py":
        f'"""RecForge reward plugin `{name}`; the reward is in `reward.py`."""\n',
        root / pkg / "reward.py": _REWARD, root / "tests" / f"test_{name}.py": _TEST,
    }
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name, dist=dist, pkg=pkg), encoding="utf-8")
    console.print(f"Created {root}/ with the reward '{name}' in {pkg}/reward.py and a test.\nNext:\n"
                  f"  pip install -e {root}          # declares '{name}' in the entry-point group recforge.rewards\n"
                  f"  recforge reward list\n"
                  f"  recforge reward test {name} --limit 8\n"
                  f"  python -m pytest {root / 'tests'}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
