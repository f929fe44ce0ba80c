"""Training curves of a run directory as one PNG (reward, KL, entropy, rollout length)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("reward/total", "reward"), ("loss/kl", "KL"), ("actor/entropy", "entropy"), ("rollout/len_mean", "length"))


def plot_run(run_dir: Path) -> Path:
    """Draw `{run_dir}/curves.png` from `metrics.jsonl`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", markersize=3)
        else:  # e.g. KL when algorithm.kl_coef=0
            ax.text(0.5, 0.5, f"{key}\nnot logged in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
