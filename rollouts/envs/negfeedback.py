"""Next-negative-feedback prediction on MovieLens-style data (recipes/negfeedback_pgrpo).

A target is one of a user's negative ratings (rating <= 2, `rewards.negative_feedback.NEGATIVE_MAX_RATING`). The
prompt shows the user's last `history_len` ratings before it (ratings visible: the model sees what the user
disliked) and a list of candidates — the target plus other movies, each as "#<id> Title (year) [genres]" — and asks
which one the user will give negative feedback to next, answered as `Item: <id>`. The sample's `timestamp` is one
second before the target's, so the multi-day `negative_feedback` reward's window (t0, t0 + D days] starts with it.

Users are split, not time: every `EVAL_USER_EVERY`-th user (user_id % 10 == 0 for integer ids) is an evaluation
user, never trained on; so neither the prompts nor the reward's future-feedback look-ups of training leak an
evaluation target.

Data filters (the Progressive GRPO stages, rl/curriculum.py):
- "recent_negatives": negatives within `recent_days` of the user's last training interaction, easy candidates
  (random movies the user never rated);
- "all_negatives": every negative of the training users, easy candidates;
- "negatives_and_positives": every negative, hard candidates: up to half of the others are movies the user rated
  >= 4 after the target (`POSITIVE_MIN_RATING`), so the policy must tell future dislikes from future likes.
Evaluation uses the hard candidates on each evaluation user's last negative.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from rl.types import Sample
from rollouts.envs.rec_data import Id, Interaction, NegativeSampler, RecData, id_sort_key, user_rng

NEGATIVE_MAX_RATING = 2
POSITIVE_MIN_RATING = 4
SECONDS_PER_DAY = 86_400
EVAL_USER_EVERY = 10
DATA_FILTERS: tuple[str, ...] = ("recent_negatives", "all_negatives", "negatives_and_positives")
ANSWER_PATTERN = r"(?im)^[ \t]*\**item\**[ \t]*:[ \t]*\**[ \t]*#?(\d+)\b"
"""`Item: 123` (optionally `#123`, markdown bold): what the `format` reward and the item parser read."""
SYSTEM_PROMPT = ("You are the negative-feedback model of a movie recommender. You predict which movie a user will "
                 "dislike next.")

Render = Callable[[list[dict[str, str]]], str]


def is_eval_user(user_id: Id) -> bool:
    return isinstance(user_id, int) and user_id % EVAL_USER_EVERY == 0


def negfeedback_prompt(data: RecData, history: Sequence[Interaction], candidates: Sequence[Id]
                       ) -> list[dict[str, str]]:
    lines = [f"{k}. {data.items[x.item_id].describe()}: rated {x.rating}/5" for k, x in enumerate(history, start=1)]
    cands = [f"- #{i} {data.items[i].describe()}" for i in candidates]
    user = ("Movies this user rated, oldest first:\n" + "\n".join(lines) + "\n\nCandidates:\n" + "\n".join(cands)
            + "\n\nWhich candidate will the user dislike next? Answer with one line: Item: <number>.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class NegFeedbackTask:
    """Training targets per data filter and evaluation samples (see the module doc)."""

    def __init__(self, data: RecData, render: Render, *, history_len: int, num_candidates: int, recent_days: float,
                 seed: int = 0, max_train_users: int = 0) -> None:
        if num_candidates < 2:
            raise ValueError(f"num_candidates={num_candidates}: a candidate list needs the target and one other.")
        self.data, self.render, self.seed = data, render, seed
        self.history_len, self.num_candidates = history_len, num_candidates
        self.sampler = NegativeSampler(list(data.items))
        users = [u for u in data.by_user if not is_eval_user(u)]
        self.train_users = users[:max_train_users] if max_train_users else users
        self.eval_users = [u for u in data.by_user if is_eval_user(u)]
        self.targets: dict[str, list[tuple[Id, int]]] = {name: [] for name in DATA_FILTERS}
        for user in self.train_users:
            seq = data.by_user[user]
            horizon = seq[-1].timestamp - recent_days * SECONDS_PER_DAY
            for pos in self._negatives(seq):
                self.targets["all_negatives"].append((user, pos))
                self.targets["negatives_and_positives"].append((user, pos))
                if seq[pos].timestamp >= horizon:
                    self.targets["recent_negatives"].append((user, pos))
        empty = [name for name, targets in self.targets.items() if not targets]
        if empty:
            raise ValueError(f"data filter(s) {empty} have no training targets (users with a negative rating after "
                             "at least one earlier rating); use more users or a larger data.recent_days.")

    @staticmethod
    def _negatives(seq: Sequence[Interaction]) -> list[int]:
        return [p for p in range(1, len(seq)) if seq[p].rating <= NEGATIVE_MAX_RATING]

    def source(self, data_filter: str) -> TargetSource:
        if data_filter not in self.targets:
            raise ValueError(f"unknown data filter {data_filter!r}; this task offers {', '.join(DATA_FILTERS)}.")
        return TargetSource(self, data_filter)

    def candidates(self, user: Id, pos: int, *, hard: bool, salt: str) -> list[Id]:
        """The target plus `num_candidates - 1` others, shuffled by a per-(seed, user, position) generator."""
        seq = self.data.by_user[user]
        target = seq[pos].item_id
        rng = user_rng(self.seed, user, f"{salt}/{pos}")
        others: list[Id] = []
        if hard:
            liked = sorted({x.item_id for x in seq[pos + 1:] if x.rating >= POSITIVE_MIN_RATING} - {target},
                           key=id_sort_key)
            others = rng.sample(liked, min(len(liked), (self.num_candidates - 1) // 2))
        exclude = self.data.seen_items(user)
        others += self.sampler.sample(self.num_candidates - 1 - len(others), exclude=exclude, rng=rng)
        out = [target, *others]
        rng.shuffle(out)
        return out

    def sample(self, user: Id, pos: int, *, hard: bool, prefix: str) -> Sample:
        seq = self.data.by_user[user]
        target = seq[pos]
        history = seq[max(0, pos - self.history_len): pos]
        cands = self.candidates(user, pos, hard=hard, salt=prefix)
        metadata = {"user_id": user, "item_id": target.item_id, "rating": target.rating,
                    "timestamp": target.timestamp - 1, "candidates": cands, "history": [x.item_id for x in history]}
        return Sample(sample_id=f"{prefix}-u{user}-p{pos}",
                      prompt=self.render(negfeedback_prompt(self.data, history, cands)), metadata=metadata)

    def eval_samples(self, *, num_users: int, seed: int) -> list[Sample]:
        """Each of `num_users` evaluation users' last negative (users without one are skipped), hard candidates."""
        users = [u for u in self.eval_users if self._negatives(self.data.by_user[u])]
        random.Random(seed).shuffle(users)
        return [self.sample(u, self._negatives(self.data.by_user[u])[-1], hard=True, prefix="eval")
                for u in sorted(users[:num_users], key=id_sort_key)]


class TargetSource:
    """The trainer's `PromptSource` over one data filter's targets."""

    def __init__(self, task: NegFeedbackTask, data_filter: str) -> None:
        self.task, self.data_filter = task, data_filter
        self.hard = data_filter == "negatives_and_positives"

    def __len__(self) -> int:
        return len(self.task.targets[self.data_filter])

    def sample(self, index: int) -> Sample:
        user, pos = self.task.targets[self.data_filter][index]
        return self.task.sample(user, pos, hard=self.hard, prefix=self.data_filter)
