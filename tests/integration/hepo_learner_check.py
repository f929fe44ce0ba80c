"""Run by test_value_head.py in a fresh process (DeepSpeed initialises torch.distributed once per process).

A real DeepSpeed Learner (one rank, gloo, ZeRO-2) with HEPO's value head: V starts at 0, one step moves it; the
checkpoint holds the head (and its optimizer state), so a second learner loaded from it takes the same next step;
exported weights leave the head out. Prints JSON: `python hepo_learner_check.py MODEL_DIR WORK_DIR [ZERO_STAGE]`.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from rl.config import AlgorithmConfig, LearnerConfig
from rl.learner import Learner, export_checkpoint_weights, free_port
from rl.types import TrainBatch

ALGO = AlgorithmConfig(advantage="hepo", hepo_level_weights=[1.0, 0.5], value_coef=0.5)


def batch() -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, 1000, (3, 10), generator=gen)
    positions_BL = torch.tensor([[6, 7], [6, 7], [5, 6]])
    mask_BT = torch.zeros(3, 10).scatter_(1, positions_BL, 1.0)
    adv_BT = torch.zeros(3, 10).scatter_(1, positions_BL, torch.tensor([[1.0, 0.5], [-1.0, -0.5], [0.2, 1.0]]))
    return TrainBatch(input_ids_BT=ids_BT, attention_mask_BT=torch.ones_like(ids_BT), loss_mask_BT=mask_BT,
                      old_logprobs_BT=torch.zeros(3, 10), advantages_BT=adv_BT,
                      group_ids_B=torch.zeros(3, dtype=torch.long), level_positions_BL=positions_BL,
                      returns_BL=torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, 0.3]]))


def learner(model_dir: str, stage: int, micro: int = 2) -> Learner:
    cfg = LearnerConfig(micro_batch_size=micro, lr=1e-2, zero_stage=stage)
    out = Learner(model_path=model_dir, learner_cfg=cfg, algorithm_cfg=ALGO,
                  dtype="float32", temperature=1.0, rank=0, world_size=1, seed=0, max_completion_length=4)
    out.setup("127.0.0.1", free_port())
    return out


def step(lrn: Learner, b: TrainBatch) -> dict:
    return lrn.train(b, loss_denominator=3.0, num_micro_batches=2, entropy_coef=0.0)


def main() -> None:
    model_dir, work = sys.argv[1], Path(sys.argv[2])
    stage = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    b = batch()
    first = learner(model_dir, stage)
    values_0 = first.values(b)
    step(first, b)
    values_1 = first.values(b)
    first.save_checkpoint(str(work / "ckpt"), "learner")
    second_step = step(first, b)
    values_2 = first.values(b)
    first.export_weights(str(work / "export"))
    with safe_open(str(work / "export" / "model.safetensors"), "pt") as handle:
        exported = list(handle.keys())
    consolidated = export_checkpoint_weights(str(work / "ckpt"), "learner", str(work / "consolidated"))
    with safe_open(str(work / "consolidated" / "model.safetensors"), "pt") as handle:
        consolidated_keys = list(handle.keys())
    resumed = learner(model_dir, stage)
    resumed.load_checkpoint(str(work / "ckpt"), "learner")
    values_1_resumed = resumed.values(b)
    resumed_step = step(resumed, b)
    print(json.dumps({
        "values_0": values_0.tolist(), "values_1": values_1.tolist(), "values_2": values_2.tolist(),
        "values_1_resumed": values_1_resumed.tolist(), "values_2_resumed": resumed.values(b).tolist(),
        "second_step": second_step, "resumed_step": resumed_step,
        "exported_value_head": [k for k in exported + consolidated_keys if "value_head" in k],
        "num_exported": len(exported), "num_consolidated": consolidated["weights/num_tensors"],
    }))


if __name__ == "__main__":
    main()
