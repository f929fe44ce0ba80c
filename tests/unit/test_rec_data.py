"""Recommendation data layer: loaders for the public formats, file:line errors, splits, candidate sampling, prompts."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from rollouts.envs.rec import (
    DataError,
    Interaction,
    Item,
    NegativeSampler,
    NextItemTask,
    RecData,
    RecReasoningTask,
    SIDItemForm,
    TextItemForm,
    User,
    iter_json_entries,
    leave_last_out,
    load_dataset,
    load_interactions,
    load_items,
    load_sid_index,
    load_users,
    parse_id,
    sample_candidates,
    time_cutoffs,
    time_split,
    user_rng,
)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def toy_data() -> RecData:
    """Two users; u1 watched items 1..5 at t=10..50, u2 watched 2, 4, 6 at t=15, 35, 60."""
    items = {i: Item(item_id=i, title=f"Movie {i}", year="2000", genres=("Drama",)) for i in range(1, 9)}
    inters = [Interaction(user_id=1, item_id=i, rating=4, timestamp=10 * i) for i in (5, 3, 1, 2, 4)]
    inters += [Interaction(user_id=2, item_id=i, rating=5, timestamp=t) for i, t in ((6, 60), (2, 15), (4, 35))]
    return RecData.build(items, inters, {1: User(user_id=1, age=30, gender="F", occupation="writer")})


# ---------------------------------------------------------------------------------------------------------------------
# Ids and MovieLens.


def test_parse_id_canonical_integers_become_int_and_other_tokens_stay_strings():
    assert parse_id("42") == 42 and parse_id(" 42 ") == 42 and parse_id(7) == 7 and parse_id("-3") == -3
    assert parse_id("042") == "042" and parse_id("B00XYZ") == "B00XYZ" and parse_id("1.5") == "1.5"
    for bad in ("", "  ", None, True, 1.0):
        with pytest.raises(ValueError):
            parse_id(bad)


def test_movielens_loads_users_items_and_time_sorted_interactions():
    from rl.assets import prepare

    data = RecData.load_movielens(prepare("data")["data"])
    assert (len(data.users), len(data.items), len(data.by_user), data.num_interactions) == (943, 1682, 943, 100000)
    assert data.users[1] == User(user_id=1, age=24, gender="M", occupation="technician", zip_code="85711")
    assert data.users[2].describe() == "a 53-year-old woman"  # occupation "other" adds nothing
    assert data.items[1] == Item(item_id=1, title="Toy Story", year="1995", genres=("Animation", "Children's",
                                                                                    "Comedy"))
    assert data.items[1].describe() == "Toy Story (1995) [Animation, Children's, Comedy]"
    # RecBole's ml-100k.item has year "V" for item 1412, whose title ends in "(1995)": the year comes from the title.
    assert (data.items[1412].title, data.items[1412].year) == ("Land Before Time III: The Time of the Great Giving",
                                                              "1995")
    assert data.items[267].year == ""  # "unkonwn" in the file
    for seq in data.by_user.values():
        assert [(x.timestamp, x.item_id) for x in seq] == sorted((x.timestamp, x.item_id) for x in seq)
    first = data.by_user[196][0]
    assert isinstance(first.rating, int) and 1 <= first.rating <= 5


def test_reasoning_task_keeps_its_protocol():
    data = toy_data()
    task = RecReasoningTask(data, lambda m: m[-1]["content"], history_len=2, num_eval_holdout=1)
    # u1: 5 interactions → targets at positions 2, 3; u2: 3 interactions → none (2 history + 1 held out).
    assert len(task) == 2
    sample = task.train_sample(0)
    assert sample.sample_id == "u1-i3-t2" and sample.metadata == {"user_id": 1, "item_id": 3, "rating": 4,
                                                                  "liked": True}
    assert "Movie 1 (2000) [Drama]: rated 4/5" in sample.prompt and "Candidate: Movie 3" in sample.prompt
    evals = task.eval_samples(num_users=2, num_candidates=3, seed=0)
    assert len(evals) == 6 and {s.metadata["item_id"] for s in evals if s.metadata["rating"] > 0} == {5, 6}


# ---------------------------------------------------------------------------------------------------------------------
# Public formats.


def test_csv_interactions_with_movielens_latest_names_and_items_with_year_in_title(tmp_path):
    inter = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.5,964982703\n1,20,3,964981247\n"
                                           "\n2,10,5,964982224\n")
    movies = write(tmp_path / "movies.csv", 'movieId,title,genres\n10,"Heat (1995)",Action|Crime|Thriller\n'
                                            '20,"Sabrina, The (1954)",(no genres listed)\n')
    data = load_dataset(inter, movies)
    assert data.items[10] == Item(item_id=10, title="Heat", year="1995", genres=("Action", "Crime", "Thriller"))
    assert data.items[20].title == "Sabrina, The" and data.items[20].genres == ()
    assert [(x.item_id, x.rating) for x in data.by_user[1]] == [(20, 3), (10, 4.5)]  # sorted by time
    assert isinstance(data.by_user[1][0].rating, int)


def test_amazon_style_jsonl_gz_interactions_and_json_metadata_keyed_by_id(tmp_path):
    rows = [{"reviewerID": "A1", "asin": "B001", "overall": 5.0, "unixReviewTime": 1400000000},
            {"reviewerID": "A1", "asin": "B002", "overall": 2.0, "unixReviewTime": 1300000000},
            {"reviewerID": "A2", "asin": "B001", "overall": 4.0, "unixReviewTime": "2014-05-13T10:00:00Z"}]
    inter = tmp_path / "reviews.jsonl.gz"
    with gzip.open(inter, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = write(tmp_path / "meta.json", json.dumps({
        "B001": {"title": "Kettle", "categories": [["Home", "Kitchen"]], "description": ["Boils.", "Fast."]},
        "B002": {"title": "Mug", "category": "Home, Cups"},
    }, indent=1))
    data = load_dataset(inter, meta)
    assert data.items["B001"] == Item(item_id="B001", title="Kettle", genres=("Home", "Kitchen"), text="Boils. Fast.")
    assert data.items["B002"].genres == ("Home", "Cups")
    assert [x.item_id for x in data.by_user["A1"]] == ["B002", "B001"]
    assert data.by_user["A2"][0].timestamp == 1399975200  # ISO date with Z → unix seconds


def test_implicit_feedback_without_rating_or_time_uses_one_and_row_order(tmp_path):
    inter = write(tmp_path / "clicks.tsv", "user\titem\nu1\t3\nu1\t1\nu2\t3\n")
    got = load_interactions(inter)
    assert [(x.user_id, x.item_id, x.rating, x.timestamp) for x in got] == [("u1", 3, 1, 0), ("u1", 1, 1, 1),
                                                                            ("u2", 3, 1, 2)]


def test_explicit_column_names_and_json_list_metadata(tmp_path):
    inter = write(tmp_path / "log.csv", "who,what,when\n7,a,5\n")
    assert load_interactions(inter, columns={"user": "who", "item": "what", "timestamp": "when"})[0] == \
        Interaction(user_id=7, item_id="a", rating=1, timestamp=5)
    meta = write(tmp_path / "items.json", '[\n {"item_id": 1, "name": "X", "year": 1999, "genres": ["A", "B"]}\n]')
    assert load_items(meta)[1] == Item(item_id=1, title="X", year="1999", genres=("A", "B"))


def test_users_file_with_side_features(tmp_path):
    users = write(tmp_path / "users.jsonl", '{"user_id": 1, "age": 31, "sex": "female", "job": "artist"}\n'
                                            '{"user_id": 2}\n')
    got = load_users(users)
    assert got[1].describe() == "a 31-year-old woman, artist" and got[2] == User(user_id=2)


@pytest.mark.parametrize("name, text, line, fragment", [
    ("bad_fields.csv", "user,item,rating,timestamp\n1,2,3,4\n1,2,3\n", 3, "3 fields, but the header has 4"),
    ("bad_rating.csv", "user,item,rating,timestamp\n1,2,3,4\n\n1,2,five,4\n", 4, "rating 'five' is not a number"),
    ("bad_time.tsv", "user\titem\ttimestamp\n1\t2\tyesterday\n", 2, "neither unix seconds nor an ISO-8601 date"),
    ("bad_json.jsonl", '{"user": 1, "item": 2}\n{"user": 1, "item": \n', 2, "invalid JSON"),
    ("no_item.jsonl", '{"user": 1, "item": 2}\n{"user": 1, "product": 3}\n', 2, "no item field"),
    ("empty_id.csv", "user,item\n1,2\n,3\n", 3, "user id '' is not usable"),
    ("not_object.jsonl", '{"user": 1, "item": 2}\n[1, 2]\n', 2, "expected a JSON object per line"),
    ("quoted.csv", 'user,item,rating\n1,"multi\nline",3\n1,2,x\n', 4, "rating 'x' is not a number"),
])
def test_malformed_interaction_rows_name_file_and_line(tmp_path, name, text, line, fragment):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        load_interactions(path)
    assert f"{path}:{line}:" in str(err.value) and fragment in str(err.value)


def test_malformed_metadata_names_file_and_line(tmp_path):
    dup = write(tmp_path / "items.json", '[\n {"item_id": 1, "title": "A"},\n\n {"item_id": 1, "title": "B"}\n]')
    with pytest.raises(DataError, match=rf"{dup}:4: item 1 is already defined on line 2"):
        load_items(dup)
    not_obj = write(tmp_path / "items2.json", '{"a": {"title": "A"},\n "b": 3}')
    with pytest.raises(DataError, match=rf"{not_obj}:2: expected each entry to be a JSON object"):
        load_items(not_obj)
    broken = write(tmp_path / "items3.json", '[\n {"item_id": 1},\n {"item_id": 2,}\n]')
    with pytest.raises(DataError, match=rf"{broken}:3: invalid JSON"):
        load_items(broken)
    trailing = write(tmp_path / "items4.json", '[{"item_id": 1}]\n]')
    with pytest.raises(DataError, match=rf"{trailing}:2: unexpected text"):
        load_items(trailing)
    bad_age = write(tmp_path / "users.csv", "user_id,age\n1,20\n2,-4\n")
    with pytest.raises(DataError, match=rf"{bad_age}:3: age '-4'"):
        load_users(bad_age)


def test_unknown_items_are_errors_with_line_or_dropped_on_request(tmp_path):
    inter = write(tmp_path / "i.csv", "user,item\n1,1\n1,9\n")
    meta = write(tmp_path / "m.csv", "item,title\n1,One\n")
    with pytest.raises(DataError, match=rf"{inter}:3: item 9 is not in the item metadata"):
        load_dataset(inter, meta)
    assert load_dataset(inter, meta, drop_unknown_items=True).num_interactions == 1


def test_json_entries_report_the_line_each_entry_starts_on(tmp_path):
    path = write(tmp_path / "x.json", '{\n  "1": [1,\n 2],\n\n  "b": {}\n}\n')
    assert [(line, key) for line, key, _ in iter_json_entries(path)] == [(2, "1"), (5, "b")]
    assert list(iter_json_entries(write(tmp_path / "e.json", " [ ] "))) == []


def test_non_utf8_file_says_which_encoding_to_pass(tmp_path):
    path = tmp_path / "u.item.csv"
    path.write_bytes("item,title\n1,Café\n".encode("latin-1"))
    with pytest.raises(DataError, match="encoding='latin-1'"):
        load_items(path)
    assert load_items(path, encoding="latin-1")[1].title == "Café"


# ---------------------------------------------------------------------------------------------------------------------
# Splits.


def test_leave_last_out_positions():
    split = leave_last_out(toy_data(), num_valid=1, num_test=1, min_history=1)
    # u1 has positions 0..4: train 1..2, valid 3, test 4; u2 has 0..2: valid 1, test 2 (no train target left).
    assert split.train == ((1, 1), (1, 2))
    assert split.valid == ((1, 3), (2, 1))
    assert split.test == ((1, 4), (2, 2))
    strict = leave_last_out(toy_data(), num_valid=0, num_test=1, min_history=2)
    assert strict.train == ((1, 2), (1, 3)) and strict.valid == () and strict.test == ((1, 4), (2, 2))


def test_time_split_uses_global_cutoffs_and_full_past_history():
    data = toy_data()
    split = time_split(data, valid_start=35, test_start=50, min_history=1)
    stamp = lambda t: data.interaction(t).timestamp  # noqa: E731
    assert [stamp(t) for t in split.train] == [20, 30]
    assert [stamp(t) for t in split.valid] == [40, 35]
    assert [stamp(t) for t in split.test] == [50, 60]
    # The history of u2's test target is everything before it, including its validation interaction.
    assert [x.timestamp for x in data.history((2, 2), 5)] == [15, 35]
    with pytest.raises(ValueError, match="validation must come first"):
        time_split(data, valid_start=50, test_start=40)


def test_time_cutoffs_by_fraction():
    data = toy_data()  # stamps: 10 15 20 30 35 40 50 60
    assert time_cutoffs(data, valid_fraction=0.25, test_fraction=0.25) == (35, 50)
    assert time_cutoffs(data, valid_fraction=0.0, test_fraction=0.25) == (50, 50)
    with pytest.raises(ValueError, match="sum < 1"):
        time_cutoffs(data, valid_fraction=0.5, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Candidates.


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("num_seen", [3, 90])  # few exclusions: rejection sampling; most excluded: exact draw
def test_candidates_are_one_positive_plus_k_unseen_distinct_negatives(alpha, num_seen):
    items = list(range(100))
    popularity = {i: 100 - i for i in items}
    sampler = NegativeSampler(items, popularity=popularity, alpha=alpha)
    seen = set(range(num_seen))
    for seed in range(20):
        cands = sample_candidates(0, num_negatives=9, exclude=seen, sampler=sampler, rng=user_rng(seed, "u"))
        assert len(cands.item_ids) == 10 == len(set(cands.item_ids))
        assert cands.positive == 0 and cands.item_ids[cands.positive_index] == 0
        assert not set(cands.item_ids) - {0} & seen and set(cands.item_ids) <= set(items)
        again = sample_candidates(0, num_negatives=9, exclude=seen, sampler=sampler, rng=user_rng(seed, "u"))
        assert again == cands  # same seed and user → same candidates


def test_candidate_sampling_fails_clearly_when_too_few_items():
    sampler = NegativeSampler(list(range(10)))
    with pytest.raises(ValueError, match="only 2 of 10 items are not excluded"):
        sample_candidates(0, num_negatives=3, exclude=set(range(8)), sampler=sampler, rng=random.Random(0))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts.


def test_next_item_task_in_text_form_with_candidates():
    data = toy_data()
    task = NextItemTask(data, leave_last_out(data), lambda m: m[0]["content"] + "\n|\n" + m[1]["content"],
                        form=TextItemForm(data.items), history_len=2, part="test", num_negatives=3, seed=1)
    sample = task.sample(0)
    meta = sample.metadata
    assert meta["user_id"] == 1 and meta["item_id"] == 5 and meta["history"] == [3, 4]
    assert meta["answer"] == "Movie 5 (2000)" and meta["candidates"][meta["positive_index"]] == 5
    assert sorted(meta["candidates"]) == [5, 6, 7, 8]  # u1 saw items 1..5, so the negatives are the other three
    assert "The user is a 30-year-old woman, writer." in sample.prompt
    assert "1. Movie 3 (2000) [Drama]\n2. Movie 4 (2000) [Drama]" in sample.prompt
    assert "Candidates:" in sample.prompt and task.sample(0) == sample
    assert len(task.samples()) == len(task) == 2 and len(task.samples(limit=1)) == 1


def test_next_item_prompt_in_semantic_id_form(tmp_path):
    data = toy_data()
    index_path = write(tmp_path / "sid.json", json.dumps({str(i): [f"<a_{i % 3}>", f"<b_{i}>"] for i in range(1, 9)}))
    form = SIDItemForm(load_sid_index(index_path))
    task = NextItemTask(data, leave_last_out(data), lambda m: m[1]["content"], form=form, history_len=2,
                        part="valid", with_user=False)
    sample = task.sample(0)  # u1's validation target: item 4 after items 2 and 3
    assert sample.metadata["answer"] == "<a_1><b_4>"
    assert "1. <a_2><b_2>\n2. <a_0><b_3>" in sample.prompt and "Movie " not in sample.prompt
    titled = SIDItemForm(form.index, data.items, with_title=True)
    assert titled(3) == "<a_0><b_3> Movie 3 (2000) [Drama]"


def test_byte_order_marks_are_ignored(tmp_path):
    table = tmp_path / "bom.csv"
    table.write_text("\ufeffuser_id,item_id\n1,2\n", encoding="utf-8")
    assert load_interactions(table)[0].item_id == 2
    doc = tmp_path / "bom.json"
    doc.write_text('\ufeff[{"item_id": 3, "title": "T"}]', encoding="utf-8")
    assert load_items(doc)[3].title == "T"
