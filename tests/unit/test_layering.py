"""Pure modules import neither ray, vllm nor deepspeed (DESIGN.md: layout and dependency direction)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PURE = ["rl.types", "rl.config", "rl.advantages", "rl.losses", "rl.kernels", "rewards.api", "rewards.rules",
        "rollouts.envs.rec",
        "rollouts.envs.base", "rollouts.envs.actions",
        "rewards.ecpm", "rewards.negative_feedback", "rewards.aggregator", "rewards.items", "rollouts.sid",
        "rewards.judge", "rewards.semantic_judge", "rewards.agent_judge", "rewards.tags", "rollouts.envs.negfeedback",
        "rollouts.envs.tags", "rl.curriculum", "rl.sft", "rollouts.sid_processor", "rollouts.weight_receiver",
        "rollouts.engine", "rl.placement", "rl.config_sections"]  # engine imports vllm lazily, inside methods


def test_pure_modules_do_not_import_heavy_runtimes():
    code = (
        "import importlib, sys\n"
        f"for name in {PURE!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'vllm', 'deepspeed'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"pure modules pulled in: {out.stdout.strip()}"


def test_only_engine_imports_vllm_and_only_learner_imports_deepspeed():
    offenders = []
    # bench/ is left out on purpose: benchmarks measure raw vLLM/DeepSpeed/TRL baselines next to RecForge.
    packages = ("rl", "rewards", "rollouts", "recipes", "cluster")
    for path in (p for pkg in packages for p in (ROOT / pkg).rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        if ("import vllm" in text or "from vllm" in text) and rel != "rollouts/engine.py":
            offenders.append(f"{rel} imports vllm")
        if ("import deepspeed" in text or "from deepspeed" in text) and rel != "rl/learner.py":
            offenders.append(f"{rel} imports deepspeed")
    assert offenders == []
