"""What to tell a user who wrote a field the backend does not have.

The two backends do not share field names (NeMo Customizer: "a field from one backend will not
validate against the other"), so the commonest mistake is the other backend's name for
the same thing. These tables map each such path to its equivalent, or say there is none.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

from pydantic import BaseModel

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.unsloth import UnslothSpec

_UNSLOTH_ONLY = "use the unsloth backend for it"
_AUTOMODEL_ONLY = "use the automodel backend for it"

# unsloth path -> what automodel uses instead
UNSLOTH_TO_AUTOMODEL: dict[str, str | None] = {
    "model.name": "`model` (a plain reference string)",
    "model.max_seq_length": "`training.max_seq_length`",
    "dataset.path": "`dataset.training`",
    "dataset.validation_path": "`dataset.validation`",
    "dataset.text_field": "`dataset.prompt_template`",
    "dataset.apply_chat_template": "nothing: rows with `messages` always use the chat template",
    "dataset.packing": "`batch.sequence_packing`",
    "batch.per_device_train_batch_size": "`batch.micro_batch_size`",
    "batch.gradient_accumulation_steps": (
        "`batch.global_batch_size` (accumulation = global / (micro × data parallel))"
    ),
    "schedule.warmup_steps": "`optimizer.warmup_steps`",
    "schedule.warmup_ratio": "`optimizer.warmup_steps`",
    "schedule.eval_steps": "`schedule.val_check_interval`",
    "training.use_gradient_checkpointing": None,
    "training.lora.dropout": None,
    "training.lora.bias": None,
    "training.lora.use_rslora": None,
    "training.lora.random_state": "`schedule.seed`",
    "hardware": "`parallelism`",
    "hardware.gpus": "`parallelism.num_gpus_per_node`",
    "hardware.precision": None,
    "output.save_method": "`training.finetuning_type` (`lora_merged` merges the adapter)",
    "optimizer.optim": None,
}

# automodel path -> what unsloth uses instead
AUTOMODEL_TO_UNSLOTH: dict[str, str | None] = {
    "dataset.training": "`dataset.path`",
    "dataset.validation": "`dataset.validation_path`",
    "dataset.prompt_template": "`dataset.text_field`",
    "training.max_seq_length": "`model.max_seq_length`",
    "training.lora.merge": "`output.save_method: merged_16bit`",
    "training.teacher_model": None,
    "training.teacher_precision": None,
    "training.distillation_ratio": None,
    "training.distillation_temperature": None,
    "training.offload_teacher": None,
    "schedule.val_check_interval": "`schedule.eval_steps`",
    "batch.global_batch_size": "`batch.per_device_train_batch_size` × `batch.gradient_accumulation_steps`",
    "batch.micro_batch_size": "`batch.per_device_train_batch_size`",
    "batch.sequence_packing": "`dataset.packing`",
    "optimizer.warmup_steps": "`schedule.warmup_steps`",
    "parallelism": "`hardware` (unsloth runs on a single GPU)",
}

_OTHER = {"automodel": "unsloth", "unsloth": "automodel"}
_EQUIVALENTS = {"automodel": UNSLOTH_TO_AUTOMODEL, "unsloth": AUTOMODEL_TO_UNSLOTH}
_SECTION_TYPES: dict[str, type[BaseModel]] = {"automodel": AutomodelSpec, "unsloth": UnslothSpec}


def schema_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every dotted field path of a section model, parents before children."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        for candidate in _nested_models(info.annotation):
            yield from schema_paths(candidate, path + ".")


def _nested_models(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in getattr(annotation, "__args__", ()):
        yield from _nested_models(arg)


def unknown_field_message(backend: str | None, path: str, key: str, siblings: list[str]) -> str:
    """The message for an unknown key: the other backend's name for it, or a near miss."""
    if backend in _OTHER:
        other = _OTHER[backend]
        if path in set(schema_paths(_SECTION_TYPES[other])):
            equivalent = _EQUIVALENTS[backend].get(path)
            if equivalent is None:
                where = _AUTOMODEL_ONLY if other == "automodel" else _UNSLOTH_ONLY
                return f"unknown field: `{key}` is an {other} field with no {backend} equivalent; {where}"
            return f"unknown field: `{key}` is an {other} field; {backend} uses {equivalent}"
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.7)
    if close:
        return f"unknown field `{key}`: did you mean `{close[0]}`?"
    if siblings:
        return f"unknown field `{key}`: allowed here are " + ", ".join(f"`{name}`" for name in siblings)
    return f"unknown field `{key}`: remove it"
