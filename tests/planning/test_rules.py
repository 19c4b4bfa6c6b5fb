"""The rule table through the Python validator: one row per case (tests/cases.py)."""

from __future__ import annotations

import pytest

from kubetune.planning.rules import RULES
from kubetune.planning.validation import validate_job
from tests.cases import RULE_CASES, UNKNOWN_FIELD_CASES, Case, automodel, unsloth


@pytest.mark.parametrize("case", RULE_CASES + UNKNOWN_FIELD_CASES, ids=lambda c: c.id)
def test_case(case: Case) -> None:
    report = validate_job(case.manifest)
    if case.valid:
        assert report.errors == [], report.errors
        assert report.layout is not None
        return
    paths = [error.path for error in report.errors]
    assert paths == [case.path], report.errors
    if case.rule is not None:
        error = report.errors[0]
        assert error.reason == case.rule
        assert error.message == next(r.message for r in RULES if r.name == case.rule and r.path == case.path)


def test_every_rule_has_an_invalid_and_a_valid_case() -> None:
    fired = {case.rule for case in RULE_CASES if case.rule}
    job_rules = {rule.name for rule in RULES if rule.kind == "CustomizationJob"}
    assert job_rules <= fired, f"rules without a failing case: {job_rules - fired}"
    # every section a rule sits on has valid rows too
    sections = {next(iter(case.manifest["spec"]), "") for case in RULE_CASES if case.valid}
    assert {"automodel", "unsloth"} <= sections


def test_all_errors_are_reported_at_once() -> None:
    manifest = unsloth(
        model={"load_in_8bit": True},
        schedule={"warmup_ratio": 0.1, "warmup_steps": 5},
        training={"finetuning_type": "all_weights", "use_gradient_checkpointing": "yes"},
        output={"save_method": "merged_4bit"},
        optimizer={"learning_rate": "fast"},
    )
    report = validate_job(manifest)
    assert sorted(error.path for error in report.errors) == sorted(
        [
            "spec.unsloth.training.use_gradient_checkpointing",
            "spec.unsloth.optimizer.learning_rate",
            "spec.unsloth.model.load_in_8bit",
            "spec.unsloth.model.load_in_4bit",
            "spec.unsloth.output.save_method",
            "spec.unsloth.schedule.warmup_ratio",
        ]
    )


def test_a_rule_is_not_judged_on_a_broken_field() -> None:
    # micro_batch_size is broken: the batch rule must not guess a value for it
    report = validate_job(automodel(parallelism={"num_gpus_per_node": 8}, batch={"micro_batch_size": "2"}))
    assert [error.path for error in report.errors] == ["spec.automodel.batch.micro_batch_size"]


@pytest.mark.parametrize(
    ("manifest", "hint"),
    [
        (
            automodel(batch={"per_device_train_batch_size": 2}),
            "`per_device_train_batch_size` is an unsloth field; automodel uses `batch.micro_batch_size`",
        ),
        (automodel(hardware={"gpus": "0"}), "`hardware` is an unsloth field; automodel uses `parallelism`"),
        (automodel(model={"name": "x"}), "`model: {name: ...}` is the unsloth form"),
        (
            unsloth(training={"teacher_model": "big"}),
            "`teacher_model` is an automodel field with no unsloth equivalent; use the automodel backend for it",
        ),
        (unsloth(batch={"global_batch_size": 8}), "unsloth uses `batch.per_device_train_batch_size`"),
        (unsloth(dataset={"training": "d"}), "`training` is an automodel field; unsloth uses `dataset.path`"),
        (automodel(optimizer={"learnig_rate": 1e-4}), "did you mean `learning_rate`?"),
        (automodel(output_model="x"), "unknown field `output_model`"),
        (unsloth(training={"training_type": "distillation"}), "use the automodel backend for distillation"),
        (automodel(optimizer={"learning_rate": "5e-6"}), "a quoted string: remove the quotes"),
    ],
)
def test_error_messages_say_what_to_do(manifest: dict[str, object], hint: str) -> None:
    messages = [error.message for error in validate_job(manifest).errors]
    assert any(hint in message for message in messages), messages


@pytest.mark.parametrize(
    ("manifest", "path"),
    [
        ({"kind": "CustomizationJob", "metadata": {"name": "x"}, "spec": {"automodel": {}}}, "apiVersion"),
        ({**automodel(), "kind": "Job"}, "kind"),
        ({**automodel(), "metadata": {"name": "Bad_Name"}}, "metadata.name"),
        ({**automodel(), "spec": None}, "spec"),
    ],
)
def test_envelope_errors(manifest: dict[str, object], path: str) -> None:
    assert path in [error.path for error in validate_job(manifest).errors]


def test_not_a_mapping() -> None:
    report = validate_job(["not", "a", "job"])
    assert not report.valid and report.errors[0].reason == "NotAMapping"
