"""Run by test_learner.py in a fresh process (DeepSpeed initialises torch.distributed once per process).

Trains one step of a real DeepSpeed Learner (one rank, gloo) on a fixed batch and prints the grad norm and the
updated log-probs as JSON: `python learner_accum_check.py MODEL_DIR ZERO_STAGE MICRO_BATCH_SIZE`.
"""

import json
import sys

import torch

from rl.config import AlgorithmConfig, LearnerConfig
from rl.learner import Learner, free_port
from rl.types import TrainBatch


def main() -> None:
    model_dir, stage, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    learner = Learner(model_path=model_dir, learner_cfg=LearnerConfig(micro_batch_size=micro, lr=1e-3,
                                                                      zero_stage=stage),
                      algorithm_cfg=AlgorithmConfig(), dtype="float32", temperature=1.0, rank=0, world_size=1,
                      seed=0, max_completion_length=8)
    learner.setup("127.0.0.1", free_port())
    gen = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, 1000, (3, 12), generator=gen)
    mask_BT = torch.zeros(3, 12)
    mask_BT[:, 6:] = 1
    mask_BT[2, 10:] = 0  # unequal lengths
    # Positions 6-8 as if sampled under a constraint (rl/kernels/restricted.py): 3, 2 and 1 (forced) allowed ids.
    positions_BC = torch.tensor([[6, 7, 8]] * 3)
    allowed_BCA = torch.full((3, 3, 3), -1)
    for c, width in enumerate((3, 2, 1)):
        allowed_BCA[:, c, :width] = ids_BT[:, 6 + c, None] + torch.arange(width)
    batch = TrainBatch(input_ids_BT=ids_BT, attention_mask_BT=torch.ones_like(ids_BT), loss_mask_BT=mask_BT,
                       old_logprobs_BT=torch.zeros(3, 12), group_ids_B=torch.zeros(3, dtype=torch.long),
                       advantages_BT=mask_BT * torch.tensor([[1.0], [-1.0], [0.5]]),
                       allowed_positions_BC=positions_BC, allowed_ids_BCA=allowed_BCA)
    before = learner.logprobs(batch)
    num_micro = -(-3 // micro)
    metrics = learner.train(batch, loss_denominator=float(mask_BT.sum()), num_micro_batches=num_micro,
                            entropy_coef=0.0)
    after = learner.logprobs(batch)
    print(json.dumps({"grad_norm": metrics["learner/grad_norm"], "loss": metrics["loss/policy"],
                      "logprobs": after.tolist(), "before": before.tolist()}))


if __name__ == "__main__":
    main()
