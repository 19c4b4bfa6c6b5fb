"""Datasets: formats, files, completion-only labels, truncation, and errors with file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune.api.resources import DATA_FILE_SUFFIXES, Source
from kubetune_trainer.data import (
    IGNORE_INDEX,
    ChatSample,
    DataError,
    PromptSample,
    TextSample,
    data_files,
    load_samples,
    parse_rows,
    read_rows,
    split_files,
    tokenize,
)
from kubetune_trainer.models import load_tokenizer

CHAT = {"messages": [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}]}
PROMPT = {"prompt": "add 2 and 3", "completion": "5"}
TEXT = {"text": "red fox blue bird"}
CUSTOM = {"question": "add 2 and 3", "answer": "5"}
TEMPLATE = "Q: {question}\nA: |||{answer}"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(str(tiny_model))


def write(path: Path, rows: list[dict[str, Any]], kind: str) -> Path:
    if kind == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled_text(tokenizer: Any, example: Any) -> str:
    ids = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    text: str = tokenizer.decode(ids)
    return text


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize(
    ("row", "template", "sample_type", "trained"),
    [
        (CHAT, None, ChatSample, "5<|im_end|>\n"),
        (PROMPT, None, PromptSample, "5<|im_end|>"),
        (TEXT, None, TextSample, "red fox blue bird<|im_end|>"),
        (CUSTOM, TEMPLATE, PromptSample, "5<|im_end|>"),
    ],
    ids=["messages", "prompt-completion", "text", "prompt_template"],
)
def test_formats_train_only_on_the_completion_and_end_with_eos(
    tmp_path: Path,
    tokenizer: Any,
    kind: str,
    row: dict[str, Any],
    template: str | None,
    sample_type: type,
    trained: str,
) -> None:
    path = write(tmp_path / "data.jsonl", [row, row], kind)
    samples = parse_rows(read_rows(data_files(path, "training")), template)
    assert all(isinstance(s, sample_type) for s in samples)
    example = tokenize(samples, tokenizer, 64).examples[0]
    assert labelled_text(tokenizer, example) == trained
    assert example.input_ids[-1] == tokenizer.eos_token_id or example.input_ids[-2] == tokenizer.eos_token_id
    if template:
        assert tokenizer.decode(example.input_ids).startswith("Q: add 2 and 3\nA: ")


def test_chat_trains_on_every_assistant_turn_only(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "count to 2"},
            {"role": "assistant", "content": "1 2"},
            {"role": "user", "content": "count to 3"},
            {"role": "assistant", "content": "1 2 3"},
        ]
    }
    from kubetune_trainer.data import Row, parse_row

    (example,) = tokenize([parse_row(Row("x", row))], tokenizer, 128).examples
    assert labelled_text(tokenizer, example) == "1 2<|im_end|>\n1 2 3<|im_end|>\n"
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(row["messages"], tokenize=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "completion": ', "invalid JSON"),
        ("[1, 2]", "a row must be a JSON object"),
        ('{"prompt": "a"}', "`completion` must be a string, but it is missing"),
        ('{"prompt": "a", "completion": 5}', "`completion` must be a string, but it is a int"),
        ('{"prompt": "a", "completion": ""}', "`completion` is empty"),
        ('{"question": "a"}', "a row needs `messages`, `prompt` and `completion`, or `text` (found keys: question)"),
        ('{"messages": []}', "`messages` must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role must be one of"),
        ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
        ('{"text": ""}', "`text` must be a non-empty string"),
    ],
)
def test_malformed_rows_fail_with_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(PROMPT) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        parse_rows(read_rows([path]))
    assert str(caught.value).startswith(f"{path}:3: ")
    assert message in str(caught.value)


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    path = write(tmp_path / "d", [PROMPT, {"prompt": "a", "completion": None}], "parquet")
    with pytest.raises(DataError, match=r"d\.parquet:row 2: `completion` must be a string"):
        parse_rows(read_rows([path]))


def test_prompt_template_missing_column_and_bad_template(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [CUSTOM, {"question": "q"}], "jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl:2: dataset.prompt_template needs column\(s\) answer"):
        parse_rows(read_rows([path]), TEMPLATE)
    with pytest.raises(DataError, match="is not a column name"):
        parse_rows(read_rows([path]), "Q: {0}|||{answer}")
    with pytest.raises(DataError, match="not a valid template"):
        parse_rows(read_rows([path]), "Q: {question|||{answer}")


def test_chat_rows_need_a_chat_template(tmp_path: Path, tiny_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = None
    path = write(tmp_path / "d.jsonl", [PROMPT, CHAT], "jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl:2: rows in `messages` format need the tokenizer's chat template"):
        tokenize(parse_rows(read_rows([path])), tokenizer, 64)


def test_truncation_cuts_the_prompt_first_then_the_completion(tokenizer: Any) -> None:
    long_prompt = PromptSample("x", "count " * 40, "1 2 3")
    (example,) = tokenize([long_prompt], tokenizer, 12).examples
    assert len(example) == 12
    assert labelled_text(tokenizer, example) == "1 2 3<|im_end|>"
    result = tokenize([PromptSample("x", "a", "1 2 3 4 5 6 7 8 9 " * 4)], tokenizer, 6)
    assert len(result.examples[0]) == 6 and result.truncated == 1
    assert all(label != IGNORE_INDEX for label in result.examples[0].labels[1:])
    chat = ChatSample("x", [{"role": "user", "content": "count " * 40}, {"role": "assistant", "content": "1"}])
    skipped = tokenize([chat], tokenizer, 10)
    assert skipped.examples == [] and skipped.skipped == 1 and "skipped" in skipped.warnings[-1]


def test_folder_layouts_and_held_out_validation(tmp_path: Path) -> None:
    rows = [PROMPT] * 20
    nemo = tmp_path / "nemo"
    for split, count in (("training", 20), ("validation", 3)):
        (nemo / split).mkdir(parents=True)
        write(nemo / split / f"{split}.jsonl", rows[:count], "jsonl")
    train, val = split_files(str(nemo), None)
    assert [p.name for p in train] == ["training.jsonl"]
    assert val is not None and [p.name for p in val] == ["validation.jsonl"]
    flat = tmp_path / "flat"
    flat.mkdir()
    write(flat / "a.jsonl", rows, "jsonl")
    write(flat / "b.jsonl", rows, "parquet")
    assert split_files(str(flat), None) == ([flat / "a.jsonl", flat / "b.parquet"], None)
    train_samples, val_samples = load_samples(str(flat), None, None, seed=3)
    assert (len(train_samples), len(val_samples)) == (36, 4)  # 10% held out
    with pytest.raises(DataError, match=r"no data files found \(\.jsonl, \.json, \.parquet\)"):
        data_files(_empty(tmp_path), "training")
    with pytest.raises(DataError, match="no such file or folder"):
        data_files(tmp_path / "missing", "training")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


JSON_WRITERS = {
    ".jsonl": lambda rows: "".join(json.dumps(r) + "\n" for r in rows),
    ".json": lambda rows: json.dumps(rows, indent=1),  # an array of rows
    ".parquet": None,
}


@pytest.mark.parametrize("suffix", DATA_FILE_SUFFIXES)
def test_every_suffix_the_operator_mounts_is_read(suffix: str, tmp_path: Path) -> None:
    """One list (kubetune.api.resources.DATA_FILE_SUFFIXES): render mounts such a path as a data
    file, and the trainer reads the file itself and finds it in folders."""
    rows = [PROMPT, TEXT, CHAT]
    path = tmp_path / f"data{suffix}"
    writer = JSON_WRITERS[suffix]
    if writer is None:
        pq.write_table(pa.Table.from_pylist([PROMPT, PROMPT]), path)
        rows = [PROMPT, PROMPT]
    else:
        path.write_text(writer(rows), encoding="utf-8")
    assert [row.data for row in read_rows(data_files(path, "training"))] == rows
    assert data_files(tmp_path, "training") == [path]
    from kubetune.render.children import Mount

    assert Mount(
        "training", Source.model_validate({"pvc": {"claimName": "c", "path": f"/x/data{suffix}"}}), "/d"
    ).is_file


def test_json_lines_under_a_json_name_and_bad_json_rows(tmp_path: Path) -> None:
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(PROMPT) + "\n" + json.dumps(TEXT) + "\n", encoding="utf-8")
    assert [row.data for row in read_rows([lines])] == [PROMPT, TEXT]
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([PROMPT, "not a row"]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json:row 2: a row must be a JSON object, got str"):
        read_rows([array])
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported data file type; use one of .jsonl, .json, .parquet"):
        data_files(tmp_path / "data.csv", "training")
