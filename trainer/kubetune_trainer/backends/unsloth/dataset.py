"""The unsloth job's rows as tokenized datasets for TRL's SFTTrainer.

Files, JSON/Parquet reading, row checks (with `file:line`), the validation split and
tokenization with completion-only labels all come from `kubetune_trainer.data`; this
module only decides, per row, what `dataset.text_field` and `dataset.apply_chat_template`
make of it:

- `apply_chat_template: true`: a chat in `row[text_field]` (a list of messages) or in
  `row["messages"]` is rendered with the tokenizer's chat template, loss on the assistant
  turns; a `prompt`/`completion` row becomes a user turn and an assistant turn.
- `apply_chat_template: false`: `row[text_field]` as a string is plain text (loss on every
  token); otherwise a `prompt`/`completion` row is trained on its completion. A chat
  without the template is refused (it has no text form of its own).

The result has `input_ids` and `labels` columns, so TRL neither templates nor
re-tokenizes. With `dataset.packing` the examples are packed here, by the packer both
backends share (`kubetune_trainer.batching.pack`), and TRL's padding-free collator lays
the packed rows out; TRL's own packing stays off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.unsloth import UnslothSpec
from kubetune_trainer.batching import as_sequences
from kubetune_trainer.data import (
    ChatSample,
    DataError,
    Example,
    PromptSample,
    Row,
    Sample,
    TextSample,
    hold_out,
    parse_row,
    read_rows,
    split_files,
    tokenize,
)


@dataclass
class SftData:
    train: Any
    """datasets.Dataset with input_ids and labels (and seq_lengths when packed): one row per
    example, or per packed sequence."""
    validation: Any | None
    train_samples: list[Sample]
    held_out: bool
    """True when validation rows were split off the training set (no validation FileSet)."""
    warnings: list[str] = field(default_factory=list)


def to_sample(row: Row, text_field: str, apply_chat_template: bool) -> Sample:
    data, where = row.data, row.where
    value = data.get(text_field)
    if apply_chat_template:
        chat = value if isinstance(value, list) else data.get("messages")
        if chat is not None:
            return parse_row(Row(where, {"messages": chat}))
        if "prompt" in data or "completion" in data:
            prompt = parse_row(Row(where, {"prompt": data.get("prompt"), "completion": data.get("completion")}))
            assert isinstance(prompt, PromptSample)
            messages = [{"role": "user", "content": prompt.prompt}, {"role": "assistant", "content": prompt.completion}]
            return ChatSample(where, messages)
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: `{text_field}` (dataset.text_field) is empty")
        return TextSample(where, value)
    if isinstance(value, list) or (value is None and isinstance(data.get("messages"), list)):
        name = text_field if isinstance(value, list) else "messages"
        raise DataError(
            f"{where}: `{name}` holds a chat (a list of messages); set dataset.apply_chat_template: true "
            "to render it with the model's chat template"
        )
    if "prompt" in data or "completion" in data:
        return parse_row(Row(where, {"prompt": data.get("prompt"), "completion": data.get("completion")}))
    keys = ", ".join(sorted(data)) or "none"
    got = "missing" if value is None else f"a {type(value).__name__}"
    raise DataError(
        f"{where}: dataset.text_field is `{text_field}`, but that field is {got} (found keys: {keys}); "
        "set dataset.text_field to the column holding the text, or use prompt/completion or messages rows"
    )


def to_samples(rows: Sequence[Row], text_field: str, apply_chat_template: bool) -> list[Sample]:
    if not rows:
        raise DataError("the dataset has no rows")
    return [to_sample(row, text_field, apply_chat_template) for row in rows]


def load_samples(
    section: UnslothSpec, training: str, validation: str | None
) -> tuple[list[Sample], list[Sample], bool]:
    """(training samples, validation samples, held_out) — validation from the job, else 10% held out."""
    dataset = section.dataset
    train_files, val_files = split_files(training, validation)
    train = to_samples(read_rows(train_files), dataset.text_field, dataset.apply_chat_template)
    if val_files is not None:
        return train, to_samples(read_rows(val_files), dataset.text_field, dataset.apply_chat_template), False
    train_idx, val_idx = hold_out(len(train), section.schedule.seed)
    return [train[i] for i in train_idx], [train[i] for i in val_idx], True


def as_dataset(examples: Sequence[Example], packing: bool, max_length: int, seed: int) -> Any:
    """One row per example; packed, one row per sequence of `batching.pack` (the automodel
    backend's packer too) in TRL's packed-row form: the examples' tokens end to end and
    `seq_lengths`, from which TRL's padding-free collator restarts the positions per example
    (and masks each example's first label)."""
    from datasets import Dataset

    rows = as_sequences(examples, packing, max_length, seed)
    columns: dict[str, list[Any]] = {
        "input_ids": [[token for e in row for token in e.input_ids] for row in rows],
        "labels": [[label for e in row for label in e.labels] for row in rows],
    }
    if packing:
        columns["seq_lengths"] = [[len(e) for e in row] for row in rows]
    return Dataset.from_dict(columns)


def load_sft_data(section: UnslothSpec, training: str, validation: str | None, tokenizer: Any) -> SftData:
    train_samples, val_samples, held_out = load_samples(section, training, validation)
    length = section.model.max_seq_length
    train = tokenize(train_samples, tokenizer, length)
    val = tokenize(val_samples, tokenizer, length)
    if not train.examples:
        raise DataError(f"{training}: no training example has a token to learn within model.max_seq_length {length}")
    warnings = [f"training: {w}" for w in train.warnings] + [f"validation: {w}" for w in val.warnings]
    packing, seed = section.dataset.packing, section.schedule.seed
    return SftData(
        as_dataset(train.examples, packing, length, seed),
        as_dataset(val.examples, packing, length, seed) if val.examples else None,
        train_samples,
        held_out,
        warnings,
    )
