"""Every default of NeMo Customizer's Training Configuration tables, per backend.

They differ between the backends: alpha 32 vs 16, lr 5e-6 vs 2e-4...
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.common import Section
from kubetune.api.unsloth import UNSLOTH_TARGET_MODULES, UnslothSpec
from kubetune.cli.main import main

AUTOMODEL = AutomodelSpec.model_validate({"model": "m", "dataset": {"training": "d"}})
UNSLOTH = UnslothSpec.model_validate({"model": {"name": "m"}, "dataset": {"path": "d"}})


def _get(section: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        section = getattr(section, part)
    return section


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("dataset.validation", None),
        ("dataset.prompt_template", None),
        ("training.training_type", "sft"),
        ("training.finetuning_type", "lora"),
        ("training.lora.rank", 16),
        ("training.lora.alpha", 32),
        ("training.lora.merge", False),
        ("training.lora.target_modules", None),
        ("training.max_seq_length", 2048),
        ("training.teacher_model", None),
        ("training.teacher_precision", "bf16"),
        ("training.distillation_ratio", 0.5),
        ("training.distillation_temperature", 1.0),
        ("training.offload_teacher", False),
        ("schedule.epochs", 1),
        ("schedule.max_steps", None),
        ("schedule.val_check_interval", None),
        ("schedule.seed", None),
        ("batch.global_batch_size", 8),
        ("batch.micro_batch_size", 1),
        ("batch.sequence_packing", False),
        ("optimizer.learning_rate", 5e-6),
        ("optimizer.weight_decay", 0.01),
        ("optimizer.warmup_steps", 0),
        ("parallelism.num_nodes", 1),
        ("parallelism.num_gpus_per_node", 1),
        ("parallelism.tensor_parallel_size", 1),
        ("parallelism.pipeline_parallel_size", 1),
        ("parallelism.context_parallel_size", 1),
        ("parallelism.expert_parallel_size", None),
        ("output", None),
        ("integrations", None),
    ],
)
def test_automodel_defaults(path: str, expected: Any) -> None:
    assert _get(AUTOMODEL, path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("model.max_seq_length", 2048),
        ("model.load_in_4bit", True),
        ("model.load_in_8bit", False),
        ("model.dtype", "auto"),
        ("model.trust_remote_code", False),
        ("dataset.text_field", "text"),
        ("dataset.apply_chat_template", False),
        ("dataset.validation_path", None),
        ("dataset.packing", False),
        ("training.training_type", "sft"),
        ("training.finetuning_type", "lora"),
        ("training.lora.rank", 16),
        ("training.lora.alpha", 16),
        ("training.lora.dropout", 0.0),
        ("training.lora.target_modules", list(UNSLOTH_TARGET_MODULES)),
        ("training.lora.bias", "none"),
        ("training.lora.use_rslora", False),
        ("training.lora.random_state", 3407),
        ("training.use_gradient_checkpointing", "unsloth"),
        ("schedule.epochs", 1),
        ("schedule.max_steps", None),
        ("schedule.warmup_steps", 0),
        ("schedule.warmup_ratio", None),
        ("schedule.lr_scheduler_type", "linear"),
        ("schedule.logging_steps", 1),
        ("schedule.save_steps", None),
        ("schedule.eval_steps", None),
        ("schedule.seed", 3407),
        ("batch.per_device_train_batch_size", 1),
        ("batch.gradient_accumulation_steps", 1),
        ("optimizer.learning_rate", 2e-4),
        ("optimizer.weight_decay", 0.0),
        ("optimizer.optim", "adamw_8bit"),
        ("hardware.gpus", None),
        ("hardware.precision", "bf16"),
        ("output.name", None),
        ("output.save_method", "lora"),
        ("integrations", None),
    ],
)
def test_unsloth_defaults(path: str, expected: Any) -> None:
    assert _get(UNSLOTH, path) == expected


def test_unsloth_target_modules_are_the_seven_projections() -> None:
    assert UNSLOTH_TARGET_MODULES == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (AutomodelSpec, {"training": {"finetuning_type": "all_weights"}}),
        (UnslothSpec, {"training": {"finetuning_type": "all_weights"}, "model": {"name": "m", "load_in_4bit": False}}),
    ],
)
def test_lora_is_not_filled_for_full_weights(
    model: type[AutomodelSpec] | type[UnslothSpec], data: dict[str, Any]
) -> None:
    base = (
        {"model": "m", "dataset": {"training": "d"}}
        if model is AutomodelSpec
        else {"model": {"name": "m"}, "dataset": {"path": "d"}}
    )
    assert model.model_validate({**base, **data}).training.lora is None


@pytest.mark.parametrize("value", [True, 1.5, "16"])
def test_types_are_strict(value: Any) -> None:
    with pytest.raises(ValidationError):
        AutomodelSpec.model_validate(
            {"model": "m", "dataset": {"training": "d"}, "training": {"lora": {"rank": value}}}
        )


def test_integrations_fields() -> None:
    spec = AutomodelSpec.model_validate(
        {
            "model": "m",
            "dataset": {"training": "d"},
            "integrations": {
                "wandb": {
                    "project": "p",
                    "entity": "e",
                    "tags": ["a"],
                    "api_key_secret": "wandb-key",
                    "name": "r",
                    "notes": "n",
                    "base_url": "https://wandb.example",
                },
                "mlflow": {
                    "experiment_name": "x",
                    "tracking_uri": "http://mlflow:5000",
                    "name": "r",
                    "tags": {"team": "a"},
                    "description": "d",
                },
            },
        }
    )
    assert spec.integrations is not None and spec.integrations.mlflow is not None
    assert spec.integrations.mlflow.tags == {"team": "a"}


def _leaf_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """Every property path of a JSON schema (through $refs and nullable anyOfs) to its schema node."""
    definitions = schema.get("$defs", {})
    found: dict[str, Any] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        for name, prop in node.get("properties", {}).items():
            found[f"{path}{name}"] = prop
            for branch in [prop, *prop.get("anyOf", [])]:
                if "$ref" in branch:
                    walk(definitions[branch["$ref"].split("/")[-1]], f"{path}{name}.")

    walk(schema, "")
    return found


REQUIRED = {  # fields NeMo Customizer gives no default
    AutomodelSpec: {"model", "dataset.training", "output.name"},
    UnslothSpec: {"model.name", "dataset.path"},
}


@pytest.mark.parametrize("spec", [AutomodelSpec, UnslothSpec], ids=["automodel", "unsloth"])
def test_live_schema_shows_every_field_default(spec: type[AutomodelSpec] | type[UnslothSpec]) -> None:
    """`kubetune schema <backend>` lists each leaf field's default, as NeMo Customizer's tables do."""
    out = io.StringIO()
    with redirect_stdout(out):
        main(["schema", "automodel" if spec is AutomodelSpec else "unsloth"])
    properties = _leaf_defaults(json.loads(out.getvalue()))
    instance = AUTOMODEL if spec is AutomodelSpec else UNSLOTH
    missing = []
    for path, node in properties.items():
        try:
            value = _get(instance, path)
        except AttributeError:  # below a null section (output, integrations)
            continue
        if isinstance(value, Section) or path in REQUIRED[spec]:
            continue
        if node.get("default", "<absent>") != (list(value) if isinstance(value, list) else value):
            missing.append(f"{path}: schema {node.get('default', '<absent>')!r}, model {value!r}")
    assert not missing
    assert properties["training.lora.target_modules"].get("default") == (
        None if spec is AutomodelSpec else list(UNSLOTH_TARGET_MODULES)
    )
