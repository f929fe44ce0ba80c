"""User interest tags on MovieLens-style data (recipes/recgpt_tags).

A sample cuts one user's timeline at a position: the prompt shows the `history_len` ratings before the cut and asks
for interest tags on a line `Tags: ...` and one sentence explaining them; the metadata holds what the rewards and
the evaluation need — `future_genres` (genres of the next `num_future` movies the user rates >= 4, one entry per
(movie, genre), for `rewards.tags.tag_accuracy`), `future_items` and `seen_items`.

Training users cut every `stride` positions; evaluation users (user_id % 10 == 0, the same user split as
rollouts/envs/negfeedback.py) are cut once, `num_future` liked movies before their end.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rl.types import Sample
from rollouts.envs.rec_data import Id, RecData, id_sort_key

POSITIVE_MIN_RATING = 4
EVAL_USER_EVERY = 10
SYSTEM_PROMPT = "You are a movie recommender. You describe a user's tastes as short interest tags."

Render = Callable[[list[dict[str, str]]], str]


def tags_prompt(data: RecData, history) -> list[dict[str, str]]:
    lines = [f"- {data.items[x.item_id].describe()}: rated {x.rating}/5" for x in history]
    user = ("Movies this user rated, oldest first:\n" + "\n".join(lines)
            + "\n\nWrite 3 to 5 short interest tags for this user on one line, like\n"
              "Tags: tag one, tag two, tag three\nthen one sentence that explains them with the user's movies.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class TagsTask:
    """Training cuts (the trainer's `PromptSource`) and evaluation samples."""

    def __init__(self, data: RecData, render: Render, *, history_len: int, num_future: int = 5, stride: int = 10,
                 max_train_users: int = 0) -> None:
        self.data, self.render = data, render
        self.history_len, self.num_future = history_len, num_future
        users = [u for u in data.by_user if not self._is_eval(u)]
        self.train_users = users[:max_train_users] if max_train_users else users
        self.eval_users = [u for u in data.by_user if self._is_eval(u)]
        self.cuts: list[tuple[Id, int]] = []
        for user in self.train_users:
            for pos in range(history_len, len(data.by_user[user]), stride):
                if len(self._future(user, pos)) >= 1:
                    self.cuts.append((user, pos))
        if not self.cuts:
            raise ValueError("no training cuts: users need history_len ratings followed by a rating >= 4.")

    @staticmethod
    def _is_eval(user: Id) -> bool:
        return isinstance(user, int) and user % EVAL_USER_EVERY == 0

    def _future(self, user: Id, pos: int) -> list[Id]:
        return [x.item_id for x in self.data.by_user[user][pos:] if x.rating >= POSITIVE_MIN_RATING][:self.num_future]

    def __len__(self) -> int:
        return len(self.cuts)

    def sample(self, index: int) -> Sample:
        return self.cut_sample(*self.cuts[index], prefix="train")

    def cut_sample(self, user: Id, pos: int, *, prefix: str) -> Sample:
        seq = self.data.by_user[user]
        history = seq[max(0, pos - self.history_len): pos]
        future = self._future(user, pos)
        genres = [g for item in future for g in self.data.items[item].genres]
        metadata = {"user_id": user, "timestamp": seq[pos].timestamp - 1, "future_items": future,
                    "future_genres": genres, "seen_items": sorted(self.data.seen_items(user), key=id_sort_key)}
        return Sample(sample_id=f"{prefix}-u{user}-p{pos}", prompt=self.render(tags_prompt(self.data, history)),
                      metadata=metadata)

    def eval_samples(self, *, num_users: int, seed: int) -> list[Sample]:
        """Evaluation users cut so that `num_future` liked movies follow (users with fewer are skipped)."""
        cuts = []
        for user in self.eval_users:
            seq = self.data.by_user[user]
            liked = [p for p, x in enumerate(seq) if x.rating >= POSITIVE_MIN_RATING]
            if len(liked) >= self.num_future and liked[-self.num_future] >= self.history_len:
                cuts.append((user, liked[-self.num_future]))
        random.Random(seed).shuffle(cuts)
        return [self.cut_sample(u, p, prefix="eval") for u, p in sorted(cuts[:num_users], key=lambda c: c[0])]
