import json

import datasets
import pytest

from rlhf.data import TASKS, DataError, PromptSource, load_prompt_dataset

ROWS = [{"prompt": "What is 1 + 2 ?", "answer": 3}, {"prompt": "What is 4 + 5 ?", "answer": 9}]


def write_formats(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds.to_csv(tmp_path / "p.csv")
    ds.to_parquet(tmp_path / "p.parquet")
    ds.save_to_disk(tmp_path / "saved")
    return ["p.jsonl", "p.csv", "p.parquet", "saved"]


def test_every_format_loads_with_extra_columns(tmp_path):
    for name in write_formats(tmp_path):
        ds = load_prompt_dataset(str(tmp_path / name))
        assert ds["prompt"] == [r["prompt"] for r in ROWS] and [int(a) for a in ds["answer"]] == [3, 9], name


def test_arithmetic_task_is_seeded_with_disjoint_splits():
    train, ev = TASKS.get("arithmetic")("train", seed=1), TASKS.get("arithmetic")("eval", seed=1)
    assert len(train) == 80 and len(ev) == 20
    key = lambda d: {m[-1]["content"] for m in d["prompt"]}  # noqa: E731
    assert not key(train) & key(ev)
    assert train["prompt"] == TASKS.get("arithmetic")("train", seed=1)["prompt"]
    assert train["prompt"] != TASKS.get("arithmetic")("train", seed=2)["prompt"]
    row = train[0]
    a, b = [int(x) for x in row["prompt"][-1]["content"].removeprefix("What is ").rstrip("?").split(" + ")]
    assert row["answer"] == a + b


def test_conversational_prompts_use_the_chat_template(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 1 + 2 ?"}]], "answer": [3]})
    src = PromptSource(ds, tokenizer, name="mem")
    ids = src.get([0]).prompt_ids[0]
    text = tokenizer.decode(ids)
    assert text.startswith("<|user|>") and text.rstrip().endswith("<|assistant|>")


def test_batches_are_seeded_resumable_and_sharded(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": [f"What is {i} + 1 ?" for i in range(10)], "answer": list(range(10))})
    a = PromptSource(ds, tokenizer, name="mem", seed=3)
    seen = [a.batch(4).rows for _ in range(3)]  # crosses an epoch boundary
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))
    b = PromptSource(ds, tokenizer, name="mem", seed=3)
    b.batch(4)
    state = b.state()
    c = PromptSource(ds, tokenizer, name="mem", seed=3)
    c.load_state(state)
    assert c.batch(4).rows == seen[1] and c.batch(4).rows == seen[2]
    r0 = PromptSource(ds, tokenizer, name="mem", seed=3).batch(4, rank=0, world_size=2)
    r1 = PromptSource(ds, tokenizer, name="mem", seed=3).batch(4, rank=1, world_size=2)
    assert r0.rows + r1.rows == seen[0]
    assert r0.columns["answer"] == [int(x) for x in r0.rows]


def test_bad_data_names_file_row_and_column(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no prompt column 'prompt' \\(columns: question"):
        PromptSource(datasets.Dataset.from_dict({"question": ["x"]}), tokenizer, name="f.jsonl")
    with pytest.raises(DataError, match="f.jsonl: row 1, column 'prompt': prompt is empty"):
        PromptSource(datasets.Dataset.from_dict({"prompt": ["What", "  "]}), tokenizer, name="f.jsonl")
    with pytest.raises(DataError, match="neither a built-in task"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl: cannot read prompts"):
        load_prompt_dataset(str(bad))


def test_long_prompts_error_filter_or_truncate(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["What is 1 ?", "What is 1 + 2 + 3 + 4 + 5 ?"]})
    with pytest.raises(DataError, match="row 1.*tokens > data.max_prompt_tokens=6"):
        PromptSource(ds, tokenizer, name="mem", max_prompt_tokens=6)
    f = PromptSource(ds, tokenizer, name="mem", max_prompt_tokens=6, on_long_prompt="filter")
    assert len(f) == 1 and f.stats["prompts/filtered"] == 1
    t = PromptSource(ds, tokenizer, name="mem", max_prompt_tokens=6, on_long_prompt="truncate")
    assert len(t) == 2 and len(t.get([1]).prompt_ids[0]) == 6 and t.stats["prompts/truncated"] == 1


@pytest.mark.parametrize("prompt, problem", [
    (None, "prompt must be a non-empty string or a list of chat messages, got None"),
    (7, "prompt must be a non-empty string or a list of chat messages, got 7"),
    ("", "prompt is empty"),
    ([], "prompt must be a non-empty string or a list of chat messages, got \\[\\]"),
    ([{"role": "user"}], "message 0 must be a dict with string 'role' and 'content'"),
])
def test_empty_or_non_string_prompts_name_file_row_and_column(tmp_path, tokenizer, prompt, problem):
    path = tmp_path / "rows.jsonl"
    rows = [{"question": "What is 1 ?"}, {"question": "What is 2 ?"}, {"question": prompt}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_prompt_dataset(str(path))
    with pytest.raises(DataError, match=f"{path}: row 2, column 'question': {problem}"):
        PromptSource(ds, tokenizer, name=str(path), prompt_column="question")


def test_unreadable_files_name_the_file_and_the_bad_line(tmp_path):
    cases = {
        "bad.jsonl": ('{"prompt": "a"}\n{"prompt": "b"}\n{not json\n',
                      r"bad.jsonl: cannot read prompts: line 3 \(row 2\): invalid JSON"),
        "list.jsonl": ('{"prompt": "a"}\n["prompt"]\n',
                       r"list.jsonl: cannot read prompts: line 2 \(row 1\): expected a JSON object"),
        "binary.jsonl": (b"\xff\xfe\x00\x01garbage", r"binary.jsonl: cannot read prompts: UnicodeDecodeError"),
        "broken.parquet": (b"PAR1 not really", r"broken.parquet: cannot read prompts: ArrowInvalid"),
        "quote.csv": ('prompt,answer\n"a",1\n"b,2\n', r"quote.csv: cannot read prompts: ParserError: .*row 2"),
        "prompts.txt": ("What is 1 ?\n", r"prompts.txt: unsupported file type '.txt'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError, match=message):
            load_prompt_dataset(str(path))


def test_a_directory_without_a_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir: cannot read prompts"):
        load_prompt_dataset(str(tmp_path / "empty_dir"))


def test_saved_dataset_dict_gives_its_eval_split(tmp_path):
    import datasets

    from rlhf.data import DataError, load_prompt_dataset

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a", "b"]}),
                          "test": datasets.Dataset.from_dict({"prompt": ["c"]})}).save_to_disk(str(path))
    assert load_prompt_dataset(str(path), "train")["prompt"] == ["a", "b"]
    assert load_prompt_dataset(str(path), "eval")["prompt"] == ["c"]
    only_train = tmp_path / "only"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"]})}).save_to_disk(str(only_train))
    with pytest.raises(DataError, match="no 'eval' / 'test' / 'validation' split"):
        load_prompt_dataset(str(only_train), "eval")
