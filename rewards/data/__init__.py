"""Data shipped with the rewards package: `sample_rollouts.jsonl` (rec_reasoning-style rollouts for `recforge reward
test`, synthetic users with hand-written completions)."""
