"""Learning checks of the semantic-ID recipes on the embedded SmolLM2-135M (slow, about 25 min each on 2 CPU cores,
30-40 s an RL step): `sgrec_a2po` (A2PO) and `gpr_hepo` (HEPO) run their debug.yaml for RL_STEPS steps after the
SFT warm-start, and their headline eval metric ends at least 10% above the starting checkpoint's (the SFT model,
step 0).

The headline metric is `eval/ecpm_sampled`: the mean raw eCPM (1000 · bid · pCTR) of the items the policy recommends
for held-out users when it samples at the rollout temperature — the business value both recipes' reward optimises
(group-normalised per request during training, raw here). Every other eval metric (greedy-item eCPM, HR@K,
NDCG@K, valid and distinct SID shares) is reported too; with 16 eval users over a 1682-item catalogue HR@K is
mostly 0 at this scale. Evaluations: step 0 (`recforge eval`'s `run_eval` on the run's starting model), mid-way
and at the end (the trainer's `run.eval_every`). Runs live under `runs/learning-check-<recipe>` and resume
(`run.resume=auto`) from their last checkpoint if interrupted; the report is
`recipes/<recipe>/learning_check.{json,png}`.

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest -m slow -s tests/integration/test_rec_learning_checks.py
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest
from conftest import read_steps

from rl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(7200)]

RL_STEPS = 32
HEADLINE = "eval/ecpm_sampled"
MIN_GAIN = 1.1
OVERRIDES = [
    f"run.num_steps={RL_STEPS}", f"run.eval_every={RL_STEPS // 2}", "run.save_every=4", "run.resume=auto",
    "sft.num_steps=8",         # half of debug.yaml's 16: 8 x 4 examples, to fit two runs in a session on 2 cores
    "data.num_eval_users=16",  # debug.yaml's 8 is too few to compare evaluations
    "logging.progress_bar=false",
]
START_EVAL = "eval_step0.json"
RAW_ECPM = "reward/ecpm/ecpm"  # the training rollouts' mean raw eCPM (the reward itself is min-max within a group)


def start_eval(recipe: str, run_dir: Path) -> dict[str, float]:
    """The eval metrics of the run's starting model (its config's model.path: the SFT model), cached in the run."""
    from rl.evaluation import run_eval

    cached = run_dir / START_EVAL
    if cached.is_file():
        return json.loads(cached.read_text())
    metrics = run_eval(recipe, load_config(run_dir / "config.yaml"), None)
    cached.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def run_learning_check(recipe: str, overrides: list[str]) -> dict:
    """Run (or resume) the recipe's learning check; returns the report written to recipes/<recipe>/."""
    main = importlib.import_module(f"recipes.{recipe}.main").main
    cfg = load_config(ROOT / f"recipes/{recipe}/debug.yaml",
                      [*OVERRIDES, *overrides, f"run.name=learning-check-{recipe}", f"run.output_dir={ROOT / 'runs'}"])
    t0 = time.perf_counter()
    run_dir = main(cfg)
    start_eval(recipe, run_dir)
    return write_report(recipe, run_dir, overrides, wall_s=time.perf_counter() - t0)


def write_report(recipe: str, run_dir: Path, overrides: list[str], *, wall_s: float) -> dict:
    """recipes/<recipe>/learning_check.{json,png} from the finished run's metrics and its step-0 evaluation."""
    rows = read_steps(run_dir)
    evals = {0: {k: v for k, v in start_eval(recipe, run_dir).items() if k != "eval/step"}}
    evals.update({s: {k: v for k, v in m.items() if k.startswith("eval/")} for s, m in rows.items()
                  if any(k.startswith("eval/") for k in m)})
    rewards = {s: rows[s]["reward/total"] for s in sorted(rows) if "reward/total" in rows[s]}
    steps = sorted(rewards)
    first5 = lambda key: window_mean(rows, steps[:5], key)
    last5 = lambda key: window_mean(rows, steps[-5:], key)
    report = {
        "command": "flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest -m slow -s "
                   f"tests/integration/test_rec_learning_checks.py -k {recipe}",
        "config": " ".join([f"recipes/{recipe}/debug.yaml", *OVERRIDES, *overrides]),
        "model": "SmolLM2-135M-Instruct (embedded) + SID tokens, SFT warm-start, CPU 2 cores",
        "learner_lr": load_config(run_dir / "config.yaml").learner.lr,
        "headline_metric": HEADLINE,
        "eval_by_step": {str(s): {k.removeprefix("eval/"): round(v, 4) for k, v in sorted(m.items())}
                         for s, m in sorted(evals.items())},
        "reward_total_by_step": {str(s): round(rewards[s], 4) for s in steps},
        "rollout_raw_ecpm_by_step": {str(s): round(rows[s][RAW_ECPM], 2) for s in steps},
        "first5_mean_reward": first5("reward/total"), "last5_mean_reward": last5("reward/total"),
        "first5_mean_rollout_raw_ecpm": first5(RAW_ECPM), "last5_mean_rollout_raw_ecpm": last5(RAW_ECPM),
        "first5_mean_entropy": first5("actor/entropy"), "last5_mean_entropy": last5("actor/entropy"),
        "zero_std_group_frac_mean": window_mean(rows, steps, "adv/zero_std_frac"),
        "seconds_per_step_mean": window_mean(rows, steps, "timing/step"),
        "wall_s": round(wall_s, 1),  # this session's run (SID model, SFT, RL, evaluations); less when it resumed
    }
    out = ROOT / "recipes" / recipe
    (out / "learning_check.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_report(report, out / "learning_check.png", title=f"{recipe} learning check")
    print(json.dumps({k: v for k, v in report.items() if k != "reward_total_by_step"}, indent=1))
    return report


def window_mean(rows: dict[int, dict[str, float]], steps: list[int], key: str) -> float:
    """Mean of `key` over the given steps that logged it; nan when none did."""
    values = [rows[s][key] for s in steps if key in rows[s]]
    return sum(values) / len(values) if values else float("nan")


def plot_report(report: dict, path: Path, *, title: str) -> None:
    """Reward and rollouts' raw eCPM per step (with 5-step running means), eCPM evaluations, ranking evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = {int(s): v for s, v in report["reward_total_by_step"].items()}
    evals = {int(s): m for s, m in report["eval_by_step"].items()}
    steps = sorted(rewards)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for ax, series, name in ((axes[0], rewards, "train reward (eCPM min-max in group)"),
                             (axes[1], {int(s): v for s, v in report["rollout_raw_ecpm_by_step"].items()},
                              "train rollouts' raw eCPM")):
        values = [series[s] for s in steps]
        running = [sum(values[max(0, i - 4):i + 1]) / len(values[max(0, i - 4):i + 1]) for i in range(len(values))]
        ax.plot(steps, values, marker="o", markersize=3, alpha=0.5, label="per step")
        ax.plot(steps, running, label="5-step mean")
        ax.set_title(name)
    panels = ((axes[2], ("ecpm_sampled", "ecpm"), "eval eCPM (raw)"),
              (axes[3], sorted(k for k in evals[0] if k.startswith(("hr@", "ndcg@"))), "eval HR@K / NDCG@K"))
    for ax, keys, name in panels:
        for key in keys:
            points = sorted((s, m[key]) for s, m in evals.items() if key in m)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
        ax.set_title(name)
    for ax in axes:
        ax.set_xlabel("RL step (0 = SFT start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def assert_improved(report: dict) -> None:
    evals = report["eval_by_step"]
    start, end = evals["0"], evals[str(RL_STEPS)]
    key = HEADLINE.removeprefix("eval/")
    assert end["valid_sid_frac"] == 1.0, end  # constrained decoding: every greedy completion is one real item
    # Re-evaluating an unchanged policy moves this by ~3% (same eval seed; e.g. 208.4 / 204.9 / 208.8 at lr 2e-5,
    # where the sampled policy barely moved): an improvement is 10% or more.
    assert end[key] > MIN_GAIN * start[key], (key, start, end)


def test_sgrec_a2po_improves_ecpm_on_embedded_model():
    assert_improved(run_learning_check("sgrec_a2po", []))


def test_gpr_hepo_improves_ecpm_on_embedded_model():
    assert_improved(run_learning_check("gpr_hepo", []))
