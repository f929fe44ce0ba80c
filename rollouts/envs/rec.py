"""Recommendation tasks on MovieLens-style data: reasoning-to-rate prompts and next-item prompts in two item forms.

The data model (users, items, interactions, splits, candidate sampling) lives in `rec_data.py`, file loaders in
`rec_formats.py`; both are re-exported here so recipes import one module.

Item forms. A prompt shows items either as text (`TextItemForm`: "Toy Story (1995) [Animation, Comedy]") or as
semantic IDs (`SIDItemForm`: "<a_12><b_7><c_3>", optionally followed by the title, LC-Rec style), and asks for the
next item in the same form.

`RecReasoningTask` (pointwise rating prediction, the rec_reasoning recipe) keeps the leave-last-out protocol: per user,
interactions sorted by time; the last `num_eval_holdout` go to evaluation, the rest are training targets, each
predicted from the `history_len` interactions before it. `NextItemTask` draws targets from any `Split`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from rl.types import Sample
from rollouts.envs.rec_data import (
    Candidates,
    DataError,
    Id,
    Interaction,
    Item,
    NegativeSampler,
    RecData,
    Split,
    Target,
    User,
    id_sort_key,
    leave_last_out,
    parse_id,
    sample_candidates,
    time_cutoffs,
    time_split,
    user_rng,
)
from rollouts.envs.rec_formats import (
    iter_json_entries,
    load_dataset,
    load_interactions,
    load_items,
    load_movielens,
    load_users,
    read_records,
)

if TYPE_CHECKING:
    from rollouts.sid import SIDIndex

__all__ = [
    "Candidates", "DataError", "Id", "Interaction", "Item", "NegativeSampler", "RecData", "Split", "Target", "User",
    "id_sort_key", "leave_last_out", "parse_id", "sample_candidates", "time_cutoffs", "time_split", "user_rng",
    "iter_json_entries", "load_dataset", "load_interactions", "load_items", "load_movielens", "load_users",
    "read_records", "load_sid_index", "SYSTEM_PROMPT", "reasoning_prompt", "RecReasoningTask", "ItemForm",
    "TextItemForm", "SIDItemForm", "sid_alignment_pairs", "next_item_prompt", "NextItemTask",
]

Render = Callable[[list[dict[str, str]]], str]


def load_sid_index(path) -> SIDIndex:
    """An item → semantic-ID index from JSON `{item_id: ["<a_12>", "<b_7>", "<c_3>"]}` (see `rollouts.sid`)."""
    from rollouts.sid import SIDIndex

    return SIDIndex.load(path)


SYSTEM_PROMPT = (
    "You are a movie recommender. Predict how the user will rate the candidate movie. Start your reply with "
    "'Rating: N' (N from 1 to 5), then explain briefly in one sentence."
)


def reasoning_prompt(data: RecData, history: list[Interaction], candidate: Id) -> list[dict[str, str]]:
    """Chat messages asking how much the user with `history` (oldest first) will like `candidate`."""
    lines = [f"- {data.items[x.item_id].describe()}: rated {x.rating}/5" for x in history]
    user = (
        "Movies this user rated, oldest first:\n" + "\n".join(lines)
        + f"\n\nCandidate: {data.items[candidate].describe()}\nHow will this user rate the candidate?"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class RecReasoningTask:
    """Training and evaluation samples for pointwise reasoning-to-rank on MovieLens.

    `render` turns chat messages into the prompt text (the tokenizer's chat template, applied once here so the
    rollout worker and the learner see identical tokens).
    """

    def __init__(self, data: RecData, render: Render, *, history_len: int, num_eval_holdout: int = 1,
                 max_train_users: int = 0) -> None:
        self.data = data
        self.render = render
        self.history_len = history_len
        self.train_targets: list[tuple[int, int]] = []  # (user_id, index of the target interaction)
        users = list(data.by_user)
        if max_train_users:
            users = users[:max_train_users]
        for user in users:
            seq = data.by_user[user]
            for idx in range(history_len, len(seq) - num_eval_holdout):
                self.train_targets.append((user, idx))
        self.num_eval_holdout = num_eval_holdout

    def __len__(self) -> int:
        return len(self.train_targets)

    def train_sample(self, position: int) -> Sample:
        user, idx = self.train_targets[position]
        seq = self.data.by_user[user]
        target = seq[idx]
        history = seq[idx - self.history_len: idx]
        return Sample(
            sample_id=f"u{user}-i{target.item_id}-t{idx}",
            prompt=self.render(reasoning_prompt(self.data, history, target.item_id)),
            metadata={"user_id": user, "item_id": target.item_id, "rating": target.rating,
                      "liked": target.rating >= 4},
        )

    def eval_samples(self, *, num_users: int, num_candidates: int, seed: int) -> list[Sample]:
        """Per user: the held-out interactions plus sampled unseen items (negatives, rating 0), one sample each."""
        rng = random.Random(seed)
        users = sorted(self.data.by_user)
        rng.shuffle(users)
        all_items = sorted(self.data.items, key=id_sort_key)
        samples = []
        for user in users[:num_users]:
            seq = self.data.by_user[user]
            held = seq[len(seq) - self.num_eval_holdout:]
            history = seq[len(seq) - self.num_eval_holdout - self.history_len: len(seq) - self.num_eval_holdout]
            seen = {x.item_id for x in seq}
            negatives = []
            while len(negatives) < num_candidates - len(held):
                item = rng.choice(all_items)
                if item not in seen and item not in negatives:
                    negatives.append(item)
            cands = [(x.item_id, x.rating) for x in held] + [(i, 0) for i in negatives]
            for item, rating in cands:
                samples.append(Sample(
                    sample_id=f"eval-u{user}-i{item}",
                    prompt=self.render(reasoning_prompt(self.data, history, item)),
                    metadata={"user_id": user, "item_id": item, "rating": rating, "liked": rating >= 4},
                ))
        return samples


# ---------------------------------------------------------------------------------------------------------------------
# Next-item prediction in text form or semantic-ID form.


class ItemForm(Protocol):
    """How a prompt writes an item, and what the model is asked to answer with."""

    answer_hint: str
    """Completes "Answer with ...", e.g. "the movie's semantic ID and nothing else"."""
    system_prompt: str

    def __call__(self, item_id: Id) -> str:
        """The item as shown in a history or candidate list."""
        ...

    def answer(self, item_id: Id) -> str:
        """The exact answer string for `item_id` (a reward compares against it)."""
        ...


class TextItemForm:
    """Items as "Title (year) [genres]"; the answer is the title with its year, "Toy Story (1995)"."""

    answer_hint = 'the title and year of one movie, like "Toy Story (1995)", and nothing else'
    system_prompt = "You are a movie recommender. You predict which movie a user will watch next."

    def __init__(self, items: dict[Id, Item]) -> None:
        self.items = items

    def __call__(self, item_id: Id) -> str:
        return self.items[item_id].describe()

    def answer(self, item_id: Id) -> str:
        item = self.items[item_id]
        return f"{item.title} ({item.year})" if item.year else item.title


class SIDItemForm:
    """Items as semantic IDs ("<a_12><b_7><c_3>"), optionally followed by the title; the answer is the bare SID."""

    answer_hint = "the semantic ID of one movie and nothing else"
    system_prompt = (
        "You are a movie recommender. Every movie has a semantic ID: a short sequence of tokens such as "
        "<a_12><b_7><c_3>, where similar movies share leading tokens. You predict which movie a user will watch next."
    )

    def __init__(self, index: SIDIndex, items: dict[Id, Item] | None = None, *, with_title: bool = False) -> None:
        if with_title and items is None:
            raise ValueError("SIDItemForm(with_title=True) needs the items, to write their titles.")
        self.index = index
        self.items = items
        self.with_title = with_title

    def __call__(self, item_id: Id) -> str:
        sid = self.index.sid_text(item_id)
        return f"{sid} {self.items[item_id].describe()}" if self.with_title else sid

    def answer(self, item_id: Id) -> str:
        return self.index.sid_text(item_id)


def sid_alignment_pairs(index: SIDIndex, items: dict[Id, Item]) -> list[tuple[list[dict[str, str]], str]]:
    """Item title <-> semantic-ID pairs for a supervised warm-start (LC-Rec's item-indexing tasks): per item,
    (chat messages, answer) for "which movie has SID s?" -> "Title (Year)" and "what is the SID of Title (Year)
    [genres]?" -> s, in item order. They teach freshly added SID tokens what each code means."""
    text = TextItemForm(items)
    system = SIDItemForm.system_prompt
    pairs = []
    for item_id in sorted(index, key=id_sort_key):
        if item_id not in items:
            continue
        sid = index.sid_text(item_id)
        pairs.append(([{"role": "system", "content": system},
                       {"role": "user", "content": f"Which movie has the semantic ID {sid}? Answer with "
                                                   f"{TextItemForm.answer_hint}."}], text.answer(item_id)))
        pairs.append(([{"role": "system", "content": system},
                       {"role": "user", "content": f"What is the semantic ID of the movie {items[item_id].describe()}?"
                                                   f" Answer with {SIDItemForm.answer_hint}."}], sid))
    return pairs


def next_item_prompt(history: Sequence[Interaction], *, form: ItemForm, user: User | None = None,
                     candidates: Sequence[Id] | None = None, show_ratings: bool = False) -> list[dict[str, str]]:
    """Chat messages asking which item comes after `history` (oldest first), among `candidates` when given."""
    lines = [f"{k}. {form(x.item_id)}" + (f" (rated {x.rating}/5)" if show_ratings else "")
             for k, x in enumerate(history, start=1)]
    parts = []
    if user is not None and user.describe() != "a user":
        parts.append(f"The user is {user.describe()}.")
    parts.append("Movies this user watched, oldest first:\n" + "\n".join(lines))
    if candidates is not None:
        parts.append("Candidates:\n" + "\n".join(f"- {form(i)}" for i in candidates))
        parts.append(f"Which candidate will the user watch next? Answer with {form.answer_hint}.")
    else:
        parts.append(f"Which movie will the user watch next? Answer with {form.answer_hint}.")
    return [{"role": "system", "content": form.system_prompt}, {"role": "user", "content": "\n\n".join(parts)}]


class NextItemTask:
    """Next-item prediction samples for the targets of one split part.

    Each sample's metadata holds what rewards need: `user_id`, `item_id` (the target), `rating`, `answer` (the target
    in the form's answer syntax), `history` (item ids, oldest first) and, with `num_negatives > 0`, `candidates`
    (1 positive + K negatives the user never interacted with, shuffled) and `positive_index`. Negatives are drawn from
    a per-(seed, user, position) generator, so a sample is the same however the task is indexed or sharded.
    """

    def __init__(self, data: RecData, split: Split, render: Render, *, form: ItemForm, history_len: int,
                 part: str = "train", num_negatives: int = 0, seed: int = 0, sampler: NegativeSampler | None = None,
                 with_user: bool = True, show_ratings: bool = False) -> None:
        if history_len < 1:
            raise ValueError(f"history_len={history_len}: a next-item prompt needs at least one past interaction.")
        self.data = data
        self.targets = split.part(part)
        self.part = part
        self.render = render
        self.form = form
        self.history_len = history_len
        self.num_negatives = num_negatives
        self.seed = seed
        self.sampler = sampler or NegativeSampler(list(data.items))
        self.with_user = with_user
        self.show_ratings = show_ratings

    def __len__(self) -> int:
        return len(self.targets)

    def sample(self, position: int) -> Sample:
        user, pos = self.targets[position]
        target = self.data.interaction((user, pos))
        history = self.data.history((user, pos), self.history_len)
        metadata = {"user_id": user, "item_id": target.item_id, "rating": target.rating,
                    "answer": self.form.answer(target.item_id), "history": [x.item_id for x in history]}
        candidates = None
        if self.num_negatives:
            rng = user_rng(self.seed, user, f"{self.part}/{pos}")
            cands = sample_candidates(target.item_id, num_negatives=self.num_negatives,
                                      exclude=self.data.seen_items(user), sampler=self.sampler, rng=rng)
            candidates = list(cands.item_ids)
            metadata.update(candidates=candidates, positive_index=cands.positive_index)
        messages = next_item_prompt(history, form=self.form, user=self.data.user(user) if self.with_user else None,
                                    candidates=candidates, show_ratings=self.show_ratings)
        return Sample(sample_id=f"{self.part}-u{user}-p{pos}", prompt=self.render(messages), metadata=metadata)

    def samples(self, *, limit: int = 0, seed: int | None = None) -> list[Sample]:
        """All samples, or `limit` of them drawn without replacement with `seed` (evaluation subsets)."""
        positions = list(range(len(self)))
        if limit and limit < len(positions):
            positions = sorted(random.Random(self.seed if seed is None else seed).sample(positions, limit))
        return [self.sample(p) for p in positions]
