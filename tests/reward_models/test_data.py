import re

import pytest
from rm_helpers import CHAT_PROMPT, separable_rows, write_jsonl

from reward_models.config import PreferenceDataConfig
from reward_models.data import build_pairs, load_pairs, load_preference_dataset, render
from reward_models.tasks import PREFERENCE_TASKS
from rlhf.data.prompts import DataError
from rlhf.data.tasks import TASKS
from rlhf.rewards.rules import first_number_matches


def pairs_from(rows, tmp_path, tokenizer, **cfg):
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    return build_pairs(load_preference_dataset(str(path)), tokenizer, PreferenceDataConfig(**cfg), name=str(path))


def test_missing_column_names_file_and_column(tmp_path, tokenizer):
    rows = [{"prompt": "a", "chosen": "yes"}]
    with pytest.raises(DataError, match=r"prefs\.jsonl: no column 'rejected' \(columns: prompt, chosen\)"):
        pairs_from(rows, tmp_path, tokenizer)
    with pytest.raises(DataError, match=r"no column 'score'"):
        pairs_from(separable_rows(), tmp_path, tokenizer, margin_column="score")


@pytest.mark.parametrize("row, match", [
    ({"chosen": "yes", "rejected": "  "}, r"prefs\.jsonl: row 2, column 'rejected': is empty"),
    ({"chosen": "", "rejected": "no"}, r"prefs\.jsonl: row 2, column 'chosen': is empty"),
    ({"prompt": CHAT_PROMPT, "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "no"}]},
     r"row 2, column 'chosen': message 0 \(assistant\) has empty content"),
    ({"prompt": CHAT_PROMPT, "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "no"}]},
     r"row 2, column 'chosen': message 0 must be a dict with string 'role' and 'content'"),
])
def test_bad_rows_name_file_row_and_column(tmp_path, tokenizer, row, match):
    conversational = "prompt" in row
    good = separable_rows(conversational)[:2]
    if not conversational:
        good = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in good]
    with pytest.raises(DataError, match=match):
        pairs_from(good + [row], tmp_path, tokenizer)


def test_mixed_formats_in_a_row_are_rejected(tmp_path, tokenizer):
    from reward_models.data import check_row

    row = {"prompt": CHAT_PROMPT, "chosen": "yes", "rejected": "no"}
    with pytest.raises(DataError,
                       match=r"x: row 0: 'chosen' is a string, 'rejected' is a string, 'prompt' is chat messages"):
        check_row(row, 0, "x", PreferenceDataConfig())


def test_margin_must_be_a_number(tmp_path, tokenizer):
    rows = [dict(r, margin=1.5) for r in separable_rows()]
    rows[1]["margin"] = None
    with pytest.raises(DataError, match=r"row 1, column 'margin': margin must be a finite number, got None"):
        pairs_from(rows, tmp_path, tokenizer, margin_column="margin")
    rows[1]["margin"] = 0.5
    assert pairs_from(rows, tmp_path, tokenizer, margin_column="margin").margins == [1.5, 0.5, 1.5, 1.5]


def test_rendering_standard_conversational_and_implicit_prompt(tmp_path, tokenizer):
    std = pairs_from(separable_rows(conversational=False), tmp_path, tokenizer)
    assert std.chosen_ids[0] == tokenizer("What is the answer ? yes")["input_ids"]
    conv = pairs_from(separable_rows(), tmp_path, tokenizer)
    text = tokenizer.apply_chat_template(CHAT_PROMPT + [{"role": "assistant", "content": "yes"}], tokenize=False)
    assert conv.chosen_ids[0] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "<|assistant|>" in tokenizer.decode(conv.rejected_ids[0])
    implicit = pairs_from([{"chosen": "yes yes", "rejected": "no"}], tmp_path, tokenizer)
    assert implicit.chosen_ids == [tokenizer("yes yes")["input_ids"]]
    # The scorer's case: a chat prompt with a plain-string completion renders as the same conversation.
    assert render(tokenizer, CHAT_PROMPT, "yes") == (text, False)


def test_long_pairs_error_or_are_filtered(tmp_path, tokenizer):
    rows = separable_rows(conversational=False)
    rows[2]["rejected"] = " ".join(["no"] * 40)
    with pytest.raises(DataError, match=r"row 2, column 'rejected': \d+ tokens with the prompt > data.max_length=20"):
        pairs_from(rows, tmp_path, tokenizer, max_length=20)
    pairs = pairs_from(rows, tmp_path, tokenizer, max_length=20, on_long_pair="filter")
    assert pairs.rows == [0, 1, 3] and pairs.stats == {"pairs/too_long": 1, "pairs/filtered": 1}


def test_unknown_source_and_eval_fraction_split(tmp_path, tokenizer):
    with pytest.raises(DataError, match="'nope.jsonl' is neither a built-in preference task"):
        load_preference_dataset("nope.jsonl")
    rows = [dict(r) for r in separable_rows() * 5]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, held = load_pairs(PreferenceDataConfig(train=str(path), eval_fraction=0.2), tokenizer, seed=0)
    assert (len(train), len(held)) == (16, 4) and sorted(train.rows + held.rows) == list(range(20))
    again, _ = load_pairs(PreferenceDataConfig(train=str(path), eval_fraction=0.2), tokenizer, seed=0)
    assert again.rows == train.rows  # seeded
    rows[17]["chosen"] = [{"role": "assistant", "content": " "}]  # errors name the file's row, not a split's
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"row 17, column 'chosen'"):
        load_pairs(PreferenceDataConfig(train=str(path), eval_fraction=0.2), tokenizer, seed=0)


def test_arithmetic_preferences_are_seeded_correct_and_split_by_pair():
    make = PREFERENCE_TASKS.get("arithmetic_preferences")
    train, held = make("train", seed=3), make("eval", seed=3)
    assert train.to_list() == make("train", seed=3).to_list()
    assert train.to_list() != make("train", seed=4).to_list()
    assert len(train) == 80 * 8 and len(held) == 20 * 8

    def questions(ds):
        return {p[-1]["content"] for p in ds["prompt"]}

    assert not questions(train) & questions(held), "an eval (a, b) pair was seen in training"
    assert questions(held) == questions(TASKS.get("arithmetic")("eval", seed=3)), "not the RL task's eval split"
    for ds in (train, held):
        assert first_number_matches(ds["chosen"], ds["answer"]) == [1.0] * len(ds)
        assert first_number_matches(ds["rejected"], ds["answer"]) == [0.0] * len(ds)
    rejected = [r[0]["content"] for r in train["rejected"]]
    echo = [r for r, p in zip(rejected, train["prompt"]) if r.startswith(p[-1]["content"][8:-1])]  # "a + b = ..."
    assert len(echo) > 40, "the base model's typical 'a + b = x' mistakes are missing"
    shape = lambda text: re.sub(r"\d+", "#", text)  # noqa: E731
    same = [shape(c[0]["content"]) == shape(r[0]["content"]) for c, r in zip(train["chosen"], train["rejected"])]
    kinds = train["kind"]
    assert all(k == "typical_mistake" or s for k, s in zip(kinds, same)), "a 'same_phrasing' pair differs in phrasing"
    assert 0.4 * len(train) < kinds.count("same_phrasing") < 0.6 * len(train), "hard_fraction=0.5 not honoured"


def test_saved_dataset_dict_splits(tmp_path, tokenizer):
    import datasets

    rows = separable_rows()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(tmp_path / "dd")
    train, held = load_pairs(PreferenceDataConfig(train=str(tmp_path / "dd"), eval=str(tmp_path / "dd")), tokenizer)
    assert (len(train), len(held)) == (4, 2)
    datasets.DatasetDict({"other": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "bad")
    with pytest.raises(DataError, match=r"bad: saved DatasetDict has no 'train' split \(splits: other\)"):
        load_preference_dataset(str(tmp_path / "bad"))


def test_arithmetic_preferences_wider_train_operands_never_touch_eval():
    make = PREFERENCE_TASKS.get("arithmetic_preferences")
    train, held = (make("train", train_max_operand=12, pairs_per_prompt=1),
                   make("eval", train_max_operand=12, pairs_per_prompt=1))
    questions = lambda ds: {p[-1]["content"] for p in ds["prompt"]}  # noqa: E731
    assert len(questions(train)) == 80 + (13 * 13 - 100) and len(held) == 20
    assert held.to_list() == make("eval", pairs_per_prompt=1).to_list()  # eval is unchanged
    assert not questions(train) & questions(held)
    assert ("What is 12 + 3?" in questions(train)
            and first_number_matches(train["chosen"], train["answer"]) == [1.0] * len(train))


def test_arithmetic_preferences_canonical_answer_form():
    make = PREFERENCE_TASKS.get("arithmetic_preferences")
    ds = make("train", answer_forms=["The answer is {n}."])
    chosen = [c[0]["content"] for c in ds["chosen"]]
    assert chosen == [f"The answer is {s}." for s in ds["answer"]]
    for r, kind, s in zip(ds["rejected"], ds["kind"], ds["answer"]):
        text = r[0]["content"]
        if kind == "same_phrasing":
            assert re.fullmatch(r"The answer is (\d+)\.", text) and text != f"The answer is {s}.", text
    assert first_number_matches(ds["rejected"], ds["answer"]) == [0.0] * len(ds)
    with pytest.raises(ValueError, match=r"answer_forms must be a non-empty list of strings containing '\{n\}'"):
        make("train", answer_forms=["The answer is x."])
