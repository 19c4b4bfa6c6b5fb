"""Datasets: find the files, read and check every row, tokenize with completion-only labels.

Backend-neutral (both trainer backends use it). Everything here runs before a model is
loaded, so a malformed row fails in seconds with `file:line: what is wrong`.

Files (`kubetune.api.resources.DATA_FILE_SUFFIXES`, the list the operator mounts by): JSON
Lines (`.jsonl`, one object per line), JSON (`.json`: an array of row objects, or one object
per line as JSON Lines) and Parquet (`.parquet`). A data path is
a file, or a folder: the files under its `training/` (or `validation/`) subfolder when it
has one, else the data files at its root — the layout NeMo Customizer filesets use.

Row formats (detected per row):

- `messages`: a chat, `[{"role": "system"|"user"|"assistant", "content": str}, ...]`,
  rendered with the tokenizer's chat template. Loss on the assistant turns only.
- `prompt` + `completion`: strings, concatenated as `prompt + completion + EOS`. Loss on
  the completion (and EOS) only.
- `text`: a string; loss on every token, EOS appended.
- `dataset.prompt_template` (any columns): `"<prompt template>|||<completion template>"`,
  each a Python format string whose `{column}` placeholders are filled from the row
  (`{{` and `}}` are literal braces). Without `|||` the template is the prompt and the
  completion is the row's `completion` column. Example: `Q: {question}\\nA: |||{answer}`.

Truncation (NeMo's default `truncation_field: input`, method `right`): when a
prompt/completion example is longer than `max_seq_length`, tokens are removed from the end
of the prompt first, then from the end of the completion. Chats and text are cut at the
end. An example left with no completion token is skipped and counted.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune.api.resources import DATA_FILE_SUFFIXES

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
COMPLETION_SEPARATOR = "|||"
VALIDATION_FRACTION = 0.1


class DataError(ValueError):
    """A problem with the data; the message names the file and line (or row)."""


class DataTooSmall(DataError):
    """Fewer training sequences than one global batch."""


# --------------------------------------------------------------------------- files


def data_files(path: str | Path, subfolder: Literal["training", "validation"]) -> list[Path]:
    """The data files a path stands for (see the module docstring)."""
    root = Path(path)
    if root.is_file():
        if root.suffix not in DATA_FILE_SUFFIXES:
            raise DataError(f"{root}: unsupported data file type; use one of {', '.join(DATA_FILE_SUFFIXES)}")
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder")
    base = root / subfolder if (root / subfolder).is_dir() else root
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in DATA_FILE_SUFFIXES)
    if base == root:  # files at the root: a sibling validation/ folder is not training data
        files = [p for p in files if "validation" not in p.relative_to(root).parts[:-1]]
    if not files:
        raise DataError(f"{base}: no data files found ({', '.join(DATA_FILE_SUFFIXES)})")
    return files


def split_files(training: str, validation: str | None) -> tuple[list[Path], list[Path] | None]:
    """Training files, and validation files (None = hold out a share of training)."""
    train = data_files(training, "training")
    if validation is not None:
        return train, data_files(validation, "validation")
    root = Path(training)
    if root.is_dir() and (root / "training").is_dir() and (root / "validation").is_dir():
        return train, data_files(root, "validation")
    return train, None


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    where: str
    """`file:line` (JSONL) or `file:row N` (Parquet), for error messages."""
    data: Mapping[str, Any]


def read_rows(files: Sequence[Path]) -> list[Row]:
    rows: list[Row] = []
    for path in files:
        if path.suffix == ".parquet":
            rows.extend(_read_parquet(path))
        elif path.suffix == ".json":
            rows.extend(_read_json(path))
        else:
            rows.extend(_read_jsonl(path))
    return rows


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(data, dict):
                raise DataError(f"{where}: a row must be a JSON object, got {type(data).__name__}")
            yield Row(where, data)


def _read_json(path: Path) -> Iterator[Row]:
    """A `.json` file: an array of row objects, or JSON Lines under a .json name (both are common)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _read_jsonl(path)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    for number, item in enumerate(data, start=1):
        where = f"{path}:row {number}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: a row must be a JSON object, got {type(item).__name__}")
        yield Row(where, item)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # imported here: only Parquet users pay for it

    try:
        table = pq.read_table(path)
    except Exception as error:
        raise DataError(f"{path}: cannot read Parquet: {error}") from None
    for number, data in enumerate(table.to_pylist(), start=1):
        yield Row(f"{path}:row {number}", data)


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class ChatSample:
    where: str
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class PromptSample:
    where: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class TextSample:
    where: str
    text: str


Sample = ChatSample | PromptSample | TextSample


def parse_rows(rows: Sequence[Row], prompt_template: str | None = None) -> list[Sample]:
    """Check every row and turn it into a sample; the first bad row raises DataError."""
    template = PromptTemplate(prompt_template) if prompt_template else None
    if not rows:
        raise DataError("the dataset has no rows")
    return [template.apply(row) if template else parse_row(row) for row in rows]


def parse_row(row: Row) -> Sample:
    data, where = row.data, row.where
    if "messages" in data:
        return ChatSample(where, _check_messages(data["messages"], where))
    if "prompt" in data or "completion" in data:
        prompt, completion = data.get("prompt"), data.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                got = "missing" if value is None else f"a {type(value).__name__}"
                raise DataError(f"{where}: `{name}` must be a string, but it is {got}")
        assert isinstance(prompt, str) and isinstance(completion, str)
        if not completion:
            raise DataError(f"{where}: `completion` is empty: there is nothing to learn from this row")
        return PromptSample(where, prompt, completion)
    if "text" in data:
        if not isinstance(data["text"], str) or not data["text"]:
            raise DataError(f"{where}: `text` must be a non-empty string")
        return TextSample(where, data["text"])
    keys = ", ".join(sorted(data)) or "none"
    raise DataError(
        f"{where}: a row needs `messages`, `prompt` and `completion`, or `text` (found keys: {keys}); "
        "for other columns set dataset.prompt_template"
    )


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    checked = []
    for index, message in enumerate(messages):
        at = f"{where}: messages[{index}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{at} must be an object with `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}.role must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{at}.content must be a string; got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: `messages` has no assistant turn: there is nothing to learn from this row")
    return checked


class PromptTemplate:
    """`dataset.prompt_template`: `"<prompt>|||<completion>"` format strings over row columns."""

    def __init__(self, template: str) -> None:
        prompt, separator, completion = template.partition(COMPLETION_SEPARATOR)
        self.prompt = prompt
        self.completion = completion if separator else "{completion}"
        self.columns = _template_fields(self.prompt) + _template_fields(self.completion)

    def apply(self, row: Row) -> PromptSample:
        missing = [column for column in self.columns if column not in row.data]
        if missing:
            found = ", ".join(sorted(row.data)) or "none"
            raise DataError(
                f"{row.where}: dataset.prompt_template needs column(s) {', '.join(missing)}, "
                f"which this row lacks (found: {found})"
            )
        values = {key: "" if value is None else str(value) for key, value in row.data.items()}
        completion = self.completion.format_map(values)
        if not completion:
            raise DataError(f"{row.where}: the completion is empty: there is nothing to learn from this row")
        return PromptSample(row.where, self.prompt.format_map(values), completion)


def _template_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise DataError(
            f"dataset.prompt_template is not a valid template: {error}; write {{{{ for a literal brace"
        ) from None
    for name in names:
        if not name or name.isdigit() or any(char in name for char in ".[]"):
            raise DataError(f"dataset.prompt_template: {{{name}}} is not a column name; use {{column}}")
    return names


# --------------------------------------------------------------------------- tokenization


@dataclass
class Example:
    """One tokenized sample: labels are IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Tokenized:
    examples: list[Example]
    truncated: int = 0
    skipped: int = 0
    """Examples with no completion token left after truncation (not trained on)."""
    warnings: list[str] = field(default_factory=list)


def tokenize(samples: Sequence[Sample], tokenizer: Any, max_seq_length: int) -> Tokenized:
    if any(isinstance(s, ChatSample) for s in samples) and not getattr(tokenizer, "chat_template", None):
        first = next(s for s in samples if isinstance(s, ChatSample))
        raise DataError(
            f"{first.where}: rows in `messages` format need the tokenizer's chat template, but this "
            "model's tokenizer has none; use prompt/completion rows or a model with a chat template"
        )
    result = Tokenized([])
    for sample in samples:
        segments = _segments(sample, tokenizer)
        example, truncated = _build(segments, tokenizer, max_seq_length, sample)
        result.truncated += truncated
        if all(label == IGNORE_INDEX for label in example.labels):
            result.skipped += 1
            continue
        result.examples.append(example)
    if result.truncated:
        result.warnings.append(f"{result.truncated} example(s) were longer than max_seq_length and were truncated")
    if result.skipped:
        result.warnings.append(f"{result.skipped} example(s) had no completion token left and were skipped")
    return result


Segment = tuple[list[int], bool]
"""Token ids, and whether loss is taken on them."""


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=special)["input_ids"]
    if special and ids and ids[-1] == tokenizer.eos_token_id and len(ids) > 1:
        ids = ids[:-1]  # some tokenizers append EOS; we place EOS ourselves
    return ids


def _segments(sample: Sample, tokenizer: Any) -> list[Segment]:
    eos = tokenizer.eos_token_id
    if isinstance(sample, TextSample):
        return [([*_encode(tokenizer, sample.text, special=True), eos], True)]
    if isinstance(sample, PromptSample):
        prompt = _encode(tokenizer, sample.prompt, special=True)
        return [(prompt, False), ([*_encode(tokenizer, sample.completion), eos], True)]
    return _chat_segments(sample, tokenizer)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text


def _chat_segments(sample: ChatSample, tokenizer: Any) -> list[Segment]:
    """Loss on every assistant turn, when the template renders conversations incrementally.

    Some templates (e.g. ones that drop earlier turns' reasoning) render a turn
    differently once later turns follow; then only the last assistant turn is trained.
    """
    messages = sample.messages
    full = _render(tokenizer, messages, False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], True) if index else ""
        answer = _render(tokenizer, messages[: index + 1], False)
        if not (prompt.startswith(full[:done]) and answer.startswith(prompt) and full.startswith(answer)):
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = _render(tokenizer, messages[:last], True)
            answer = _render(tokenizer, messages[: last + 1], False)
            pieces, done = [], 0
            if not answer.startswith(prompt):
                raise DataError(f"{sample.where}: the chat template renders the assistant turn inconsistently")
        pieces += [(prompt[done:], False), (answer[len(prompt) :], True)]
        done = len(answer)
    pieces.append((full[done:], False))
    segments = [(_encode(tokenizer, text), train) for text, train in pieces if text]
    eos = tokenizer.eos_token_id
    if eos is not None and not any(eos in ids for ids, train in segments if train):
        segments.insert(_last_trained(segments) + 1, ([eos], True))
    return segments


def _last_trained(segments: list[Segment]) -> int:
    return max(i for i, (_, train) in enumerate(segments) if train)


def _build(segments: list[Segment], tokenizer: Any, limit: int, sample: Sample) -> tuple[Example, int]:
    total = sum(len(ids) for ids, _ in segments)
    truncated = int(total > limit)
    if truncated and isinstance(sample, PromptSample):
        (prompt, _), (completion, _) = segments
        keep_prompt = max(0, limit - len(completion))
        segments = [(prompt[:keep_prompt], False), (completion[: limit - keep_prompt], True)]
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, train in segments:
        input_ids += ids
        labels += ids if train else [IGNORE_INDEX] * len(ids)
    return Example(input_ids[:limit], labels[:limit], sample.where), truncated


# --------------------------------------------------------------------------- splits


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    train_samples: list[Sample]
    warnings: list[str] = field(default_factory=list)


def hold_out(count: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (train, validation) when 10% of the training rows are held out."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(count * VALIDATION_FRACTION)) if count >= 2 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def load_samples(
    training: str, validation: str | None, prompt_template: str | None, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Read and check all rows (no tokenizer needed) and split off validation."""
    train_files, val_files = split_files(training, validation)
    train = parse_rows(read_rows(train_files), prompt_template)
    if val_files is not None:
        return train, parse_rows(read_rows(val_files), prompt_template)
    train_idx, val_idx = hold_out(len(train), seed)
    return [train[i] for i in train_idx], [train[i] for i in val_idx]


def load_splits(
    training: str,
    validation: str | None,
    tokenizer: Any,
    max_seq_length: int,
    prompt_template: str | None,
    seed: int,
) -> Splits:
    train_samples, val_samples = load_samples(training, validation, prompt_template, seed)
    train = tokenize(train_samples, tokenizer, max_seq_length)
    val = tokenize(val_samples, tokenizer, max_seq_length)
    if not train.examples:
        raise DataError(f"{training}: no training example has a completion token within max_seq_length")
    return Splits(
        train.examples,
        val.examples,
        train_samples,
        [f"training: {w}" for w in train.warnings] + [f"validation: {w}" for w in val.warnings],
    )


def prompt_of(sample: Sample) -> tuple[list[dict[str, str]] | str, str]:
    """(prompt, reference answer) of a sample: the conversation up to its first assistant turn."""
    if isinstance(sample, ChatSample):
        first = next(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
        return sample.messages[:first], sample.messages[first]["content"]
    if isinstance(sample, PromptSample):
        return sample.prompt, sample.completion
    return sample.text[: len(sample.text) // 2], sample.text[len(sample.text) // 2 :]
