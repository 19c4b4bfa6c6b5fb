"""The unsloth backend, for real: unsloth's CPU fallback trains tiny Llama models here.

Training tests run the trainer in this process (unsloth is imported once per session;
its CPU patches are instance-level or on TRL/TrainingArguments, which the automodel
backend does not use). The field-group tests load a model and build the trainer's
arguments exactly as the backend does, and check what each field changed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import merge  # tests/trainer/conftest.py (rootdir-relative import, no package)

from kubetune.api.unsloth import UNSLOTH_TARGET_MODULES
from kubetune.planning.resolved import JobIdentity, ResolvedJob, ResolvedPaths, resolve
from kubetune.planning.validation import validate_job
from kubetune_trainer.backends.unsloth import arguments
from kubetune_trainer.backends.unsloth.dataset import load_sft_data, to_sample
from kubetune_trainer.config import ConfigError, RunOptions
from kubetune_trainer.data import IGNORE_INDEX, ChatSample, DataError, PromptSample, Row, TextSample
from kubetune_trainer.outputs import read_result
from kubetune_trainer.progress import read_events

BASE: dict[str, Any] = {
    "model": {"name": "tiny", "max_seq_length": 64, "load_in_4bit": False, "dtype": "float32"},
    "dataset": {"path": "train"},
    "training": {"finetuning_type": "lora", "lora": {"rank": 8, "alpha": 16}, "use_gradient_checkpointing": False},
    "schedule": {"epochs": 1, "max_steps": 16, "logging_steps": 1, "seed": 1},
    "batch": {"per_device_train_batch_size": 8},
    "optimizer": {"learning_rate": 0.02, "optim": "adamw_torch"},
}


def unsloth_job(
    output: Path, model: Path, training: Path, spec: dict[str, Any] | None = None, validation: Path | None = None
) -> ResolvedJob:
    """Validate a CustomizationJob as the operator does and resolve it to local paths."""
    section = merge(BASE, spec or {})
    if section["training"]["finetuning_type"] == "all_weights":
        section["training"].pop("lora", None)
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": "tiny-unsloth", "namespace": "default"},
        "spec": {"unsloth": section},
    }
    report = validate_job(manifest)
    assert report.valid, report.errors
    assert report.section is not None and report.layout is not None
    paths = ResolvedPaths(
        model=str(model),
        training=str(training),
        validation=str(validation) if validation else None,
        output=str(output),
    )
    return resolve(report.section, report.layout, JobIdentity(name="tiny-unsloth", uid="t"), paths)


@pytest.fixture
def train_unsloth(tmp_path: Path, tiny_model: Path, task_data: Path) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """Run an unsloth job through the trainer's entry point; return (result folder, kubetune.json)."""

    def run(spec: dict[str, Any] | None = None, output: str = "out", **kwargs: Any) -> tuple[Path, dict[str, Any]]:
        from kubetune_trainer.__main__ import run_job

        job = unsloth_job(tmp_path / output, tiny_model, kwargs.pop("training", task_data), spec, **kwargs)
        folder = run_job(job, RunOptions(progress_bar=False, progress_file=str(tmp_path / output / "progress.jsonl")))
        return folder, read_result(folder)

    return run


def events(folder: Path) -> list[Any]:
    return read_events(folder.parent / "progress.jsonl")


def notes(folder: Path) -> str:
    return "\n".join(e.message or "" for e in events(folder) if e.kind == "start")


def assert_loss_falls(info: dict[str, Any]) -> None:
    metrics = info["metrics"]
    assert metrics["train_loss"] < metrics["first_loss"] - 0.3, metrics


def generate(model: Any, tokenizer: Any) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "add 2 and 3"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]  # it generated tokens
    text: str = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    return text


def module_types(model: Any) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


# --------------------------------------------------------------------------- training, per mode and save method


def test_lora_adapter_trains_reloads_and_reports(
    train_unsloth: Callable[..., tuple[Path, dict[str, Any]]], tiny_model: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, info = train_unsloth({"model": {"trust_remote_code": True}})
    assert_loss_falls(info)
    assert info["save_route"] == "unsloth save_pretrained_merged(lora)"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    assert model.peft_config["default"].r == 8
    generate(model, AutoTokenizer.from_pretrained(folder))

    seen = events(folder)
    kinds = {e.kind for e in seen}
    assert {"start", "step", "validation", "checkpoint", "end"} <= kinds
    steps = [e.step for e in seen if e.kind == "step"]
    assert steps == list(range(1, 17)) and all(e.max_steps == 16 for e in seen if e.kind == "step")
    assert "trust_remote_code is on" in notes(folder)
    assert "CPU (unsloth CPU fallback" in notes(folder) and "weights torch.float32" in notes(folder)
    # save_steps null: about ten checkpoints per run, the Trainer's own, marked complete.
    assert [e.step for e in seen if e.kind == "checkpoint"] == [2, 4, 6, 8, 10, 12, 14, 16]


def test_qlora_4bit_merged_4bit_reloads_quantized(
    train_unsloth: Callable[..., tuple[Path, dict[str, Any]]],
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, info = train_unsloth(
        {"model": {"load_in_4bit": True}, "output": {"save_method": "merged_4bit"}, "schedule": {"max_steps": 20}}
    )
    assert_loss_falls(info)
    assert "model: LlamaForCausalLM, 4-bit" in notes(folder)
    assert info["save_route"].startswith("kubetune merge (merged_4bit")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert "Linear4bit" in module_types(model) and type(model.lm_head).__name__ == "Linear"
    generate(model, AutoTokenizer.from_pretrained(folder))


def test_qlora_8bit_merged_16bit(train_unsloth: Callable[..., tuple[Path, dict[str, Any]]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from unsloth import is_bfloat16_supported

    folder, info = train_unsloth(
        {"model": {"load_in_8bit": True}, "output": {"save_method": "merged_16bit"}, "schedule": {"max_steps": 20}}
    )
    assert_loss_falls(info)
    assert "model: LlamaForCausalLM, 8-bit" in notes(folder) and "load_in_8bit on CPU" in notes(folder)
    assert info["save_route"].startswith("kubetune merge (merged_16bit")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == (torch.bfloat16 if is_bfloat16_supported() else torch.float16)
    assert not {"Linear8bitLt", "Linear4bit"} & module_types(model)
    generate(model, AutoTokenizer.from_pretrained(folder))


def test_lora_merged_16bit_through_unsloth_equals_base_plus_adapter(
    train_unsloth: Callable[..., tuple[Path, dict[str, Any]]], tiny_model: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, info = train_unsloth({"output": {"save_method": "merged_16bit"}})
    assert_loss_falls(info)
    assert info["save_route"] == "unsloth save_pretrained_merged(merged_16bit)"
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    # The merge changed the weights (training did something) and the result is a plain model.
    assert (merged(ids).logits - base(ids).logits).abs().max() > 0.05
    generate(merged, AutoTokenizer.from_pretrained(folder))


def test_all_weights_trains_full_model(
    train_unsloth: Callable[..., tuple[Path, dict[str, Any]]], tiny_model: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, info = train_unsloth(
        {"training": {"finetuning_type": "all_weights"}, "optimizer": {"learning_rate": 0.005}}
    )
    assert_loss_falls(info)
    assert info["save_route"] == "save_pretrained (full weights)" and info["output"]["type"] == "model"
    assert "all_weights: trainable parameters 139,584 of 139,584" in notes(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    changed = (model.model.embed_tokens.weight - base.model.embed_tokens.weight).abs().max()
    assert changed > 0  # embeddings train too: not an adapter
    generate(model, AutoTokenizer.from_pretrained(folder))


# --------------------------------------------------------------------------- checkpoints, SIGTERM, resume


def test_sigterm_checkpoints_and_restart_resumes(
    train_unsloth: Callable[..., tuple[Path, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubetune_trainer.backends.unsloth import callbacks
    from kubetune_trainer.checkpoint import Preempted

    original = callbacks.ProgressCallback.on_step_end

    def kill_at_step_5(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        original(self, args, state, control, **kwargs)
        if state.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, caught by checkpoint.Preemption

    spec = {"schedule": {"max_steps": 10, "save_steps": 3}}
    monkeypatch.setattr(callbacks.ProgressCallback, "on_step_end", kill_at_step_5)
    with pytest.raises(Preempted, match="step 5"):
        train_unsloth(spec)
    monkeypatch.setattr(callbacks.ProgressCallback, "on_step_end", original)
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
    assert (checkpoints / "checkpoint-5" / callbacks.MARKER).is_file()
    (checkpoints / "checkpoint-8").mkdir()  # a save the crash interrupted: no marker, never resumed

    folder, info = train_unsloth(spec)
    assert f"removed {checkpoints / 'checkpoint-8'}: a save that did not finish" in notes(folder)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-9"]
    resumed = [e for e in events(folder) if e.message and e.message.startswith("resuming from")]
    assert len(resumed) == 1 and resumed[0].step == 5 and "checkpoint-5" in resumed[0].message
    steps_after = [e.step for e in events(folder) if e.kind == "step" and e.time >= resumed[0].time]
    assert steps_after == [6, 7, 8, 9, 10]
    assert info["metrics"]["steps"] == 10


# --------------------------------------------------------------------------- field groups


@pytest.fixture(scope="module")
def fast_language_model() -> Any:
    from kubetune_trainer.backends.unsloth.reporting import Notes
    from kubetune_trainer.backends.unsloth.sft import import_unsloth

    return import_unsloth(Notes())


def load(fast: Any, job: ResolvedJob) -> Any:
    from kubetune_trainer.backends.unsloth.reporting import Notes
    from kubetune_trainer.backends.unsloth.sft import _eight_bit_on_cpu

    section = arguments.section_of(job)
    with _eight_bit_on_cpu(section.model.load_in_8bit, Notes()):
        model, _ = fast.from_pretrained(**arguments.from_pretrained_kwargs(section, job.paths.model))
    return model


def test_model_fields_change_the_loaded_model(
    fast_language_model: Any, tmp_path: Path, tiny_model: Path, task_data: Path
) -> None:
    from unsloth import is_bfloat16_supported

    def loaded(model_spec: dict[str, Any]) -> Any:
        return load(fast_language_model, unsloth_job(tmp_path, tiny_model, task_data, {"model": model_spec}))

    four = loaded({"load_in_4bit": True})
    assert "Linear4bit" in module_types(four) and type(four.lm_head).__name__ == "Linear"
    eight = loaded({"load_in_8bit": True})
    assert "Linear8bitLt" in module_types(eight) and "Linear4bit" not in module_types(eight)
    plain = loaded({"max_seq_length": 48})
    assert not {"Linear4bit", "Linear8bitLt"} & module_types(plain)
    assert plain.max_seq_length == 48 and plain.dtype == torch.float32
    assert loaded({"dtype": "bfloat16"}).dtype == torch.bfloat16
    # auto = unsloth's auto-detect: bf16 where the CPU has native bf16, else fp32 (logged by the trainer).
    assert loaded({"dtype": "auto"}).dtype == (torch.bfloat16 if is_bfloat16_supported() else torch.float32)
    assert (
        arguments.from_pretrained_kwargs(
            arguments.section_of(unsloth_job(tmp_path, tiny_model, task_data, {"model": {"trust_remote_code": True}})),
            "m",
        )["trust_remote_code"]
        is True
    )


def test_lora_fields_reach_peft(fast_language_model: Any, tmp_path: Path, tiny_model: Path, task_data: Path) -> None:
    lora = {"rank": 4, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "bias": "lora_only"}

    def adapted(lora_spec: dict[str, Any], checkpointing: Any = False) -> Any:
        spec = {"training": {"lora": lora_spec, "use_gradient_checkpointing": checkpointing}}
        job = unsloth_job(tmp_path, tiny_model, task_data, spec)
        model = load(fast_language_model, job)
        kwargs = arguments.peft_kwargs(arguments.section_of(job))
        assert kwargs is not None
        return fast_language_model.get_peft_model(model, **kwargs)

    model = adapted({**lora, "use_rslora": True, "random_state": 7})
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (4, 32, 0.1, "lora_only")
    assert config.use_rslora is True and set(config.target_modules) == {"q_proj", "v_proj"}
    layer = model.base_model.model.model.layers[0].self_attn
    assert hasattr(layer.q_proj, "lora_A") and not hasattr(layer.k_proj, "lora_A")
    assert layer.q_proj.scaling["default"] == pytest.approx(32 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    default = adapted({})
    assert set(default.peft_config["default"].target_modules) == set(UNSLOTH_TARGET_MODULES)
    assert default.peft_config["default"].use_rslora is False

    def lora_a(random_state: int) -> torch.Tensor:
        m = adapted({"random_state": random_state})
        return m.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    assert torch.equal(lora_a(1), lora_a(1)) and not torch.equal(lora_a(1), lora_a(2))
    for mode, on in ((False, False), (True, True), ("unsloth", True)):
        assert adapted({}, mode).base_model.model.is_gradient_checkpointing is on, mode


def sft_args(job: ResolvedJob, rows: int = 100, has_validation: bool = True) -> Any:
    from trl import SFTConfig

    section = arguments.section_of(job)
    plan = arguments.step_plan(section, rows, None)
    args = SFTConfig(**arguments.sft_config_kwargs(section, "/tmp/unused", plan, has_validation, 2))
    arguments.restore_job_arguments(args, section, on_cpu=True)
    return args


def test_schedule_batch_optimizer_fields_reach_the_trainer(
    fast_language_model: Any, tmp_path: Path, tiny_model: Path, task_data: Path
) -> None:
    from unsloth import is_bfloat16_supported

    spec = {
        "schedule": {
            "epochs": 3,
            "max_steps": None,
            "warmup_ratio": 0.25,
            "lr_scheduler_type": "cosine",
            "logging_steps": 5,
            "save_steps": 7,
            "eval_steps": 4,
            "seed": 99,
        },
        "batch": {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2},
        "optimizer": {"learning_rate": 0.003, "weight_decay": 0.05, "optim": "adamw_8bit"},
        "hardware": {"precision": "fp16"},
        "model": {"max_seq_length": 48},
    }
    args = sft_args(unsloth_job(tmp_path, tiny_model, task_data, spec))
    assert (args.num_train_epochs, args.max_steps, args.warmup_steps) == (3, -1, 0.25)
    assert str(args.lr_scheduler_type.value) == "cosine" and args.logging_steps == 5
    assert (args.save_steps, args.eval_steps, str(args.eval_strategy.value)) == (7, 4, "steps")
    assert (args.seed, args.data_seed) == (99, 99)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 2)
    assert (args.learning_rate, args.weight_decay) == (0.003, 0.05)
    assert str(args.optim.value if hasattr(args.optim, "value") else args.optim) == "adamw_8bit"  # kept on CPU
    assert args.max_length == 48 and args.report_to in ([], ["none"], "none")
    # fp16 on CPU: unsloth's fallback uses bf16 autocast where the CPU has it, else fp32 (logged).
    assert (args.bf16, args.fp16) == ((True, False) if is_bfloat16_supported() else (False, False))
    assert arguments.step_plan(arguments.section_of(unsloth_job(tmp_path, tiny_model, task_data, spec)), 100, None) == (
        arguments.StepPlan(total_steps=51, steps_per_epoch=17, save_steps=7)
    )
    steps = sft_args(unsloth_job(tmp_path, tiny_model, task_data, {"schedule": {"max_steps": 9, "warmup_steps": 3}}))
    assert (steps.max_steps, steps.warmup_steps, str(steps.eval_strategy.value)) == (9, 3, "no")

    # adamw_8bit really is bitsandbytes' 8-bit AdamW on CPU (unsloth would have swapped it).
    from trl import SFTTrainer

    job = unsloth_job(tmp_path, tiny_model, task_data, {"optimizer": {"optim": "adamw_8bit"}})
    model = fast_language_model.get_peft_model(load(fast_language_model, job), r=4)
    data = load_sft_data(arguments.section_of(job), str(task_data), None, _tokenizer(tiny_model))
    trainer = SFTTrainer(
        model=model, args=sft_args(job), train_dataset=data.train, processing_class=_tokenizer(tiny_model)
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.args.optim_bits == 8


def test_packing_packs_without_crossing_examples(
    fast_language_model: Any, tmp_path: Path, tiny_model: Path, task_data: Path
) -> None:
    from trl import SFTTrainer

    job = unsloth_job(tmp_path, tiny_model, task_data, {"dataset": {"packing": True}})
    args = sft_args(job)
    # unsloth's CPU fallback turns padding-free rows off; kubetune keeps them for packed rows.
    assert args.padding_free is True and args.packing is False  # kubetune packs, not TRL
    model = fast_language_model.get_peft_model(load(fast_language_model, job), r=4)
    data = load_sft_data(arguments.section_of(job), str(task_data), None, _tokenizer(tiny_model))
    lengths = data.train["seq_lengths"]  # tokens of each example in each packed row
    examples = sum(len(row) for row in lengths)
    assert len(data.train) < examples / 3  # many short examples per 64-token row (batching.pack)
    assert all(sum(row) <= 64 for row in lengths)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, processing_class=_tokenizer(tiny_model))
    assert len(trainer.train_dataset) == len(data.train)  # TRL did not pack again
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch  # padding-free packed rows
    starts = batch["position_ids"][0] == 0  # positions restart at each example...
    assert int(starts.sum()) > args.per_device_train_batch_size  # ...several per packed row
    assert (batch["labels"][0][starts] == -100).all()  # no example predicts the next one's first token
    # Packed rows must not attend across examples: logits equal those of the examples alone.
    base = model.get_base_model().eval()
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    with torch.no_grad():
        alone = base(input_ids=b, use_cache=False).logits[0]
        packed = base(
            input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]), use_cache=False
        ).logits[0, 5:]
    assert (alone - packed).abs().max() < 1e-4


def test_a_packed_job_reports_the_steps_it_runs(train_unsloth: Callable[..., tuple[Path, dict[str, Any]]]) -> None:
    # Two epochs by count, not max_steps: the steps are counted on the packed rows, the ones the
    # Trainer iterates (unpacked, 2 epochs of the 144 training rows would be 2 × 18 steps of 8).
    folder, info = train_unsloth({"dataset": {"packing": True}, "schedule": {"epochs": 2, "max_steps": None}})
    seen = events(folder)
    steps = [e.step for e in seen if e.kind == "step"]
    assert 2 <= len(steps) < 18 and steps == list(range(1, len(steps) + 1))
    assert all(e.max_steps == len(steps) for e in seen if e.kind == "step")
    assert math.isfinite(info["metrics"]["train_loss"])
    assert "packing True" in notes(folder) and "padding_free=True (packed rows)" in notes(folder)


def test_paged_adamw_8bit_is_refused_on_cpu(train_unsloth: Callable[..., tuple[Path, dict[str, Any]]]) -> None:
    with pytest.raises(ConfigError, match=r"paged_adamw_8bit needs a GPU.*adamw_8bit"):
        train_unsloth({"optimizer": {"optim": "paged_adamw_8bit"}})


def test_gpus_set_cuda_visible_devices(
    train_unsloth: Callable[..., tuple[Path, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env: dict[str, str] = {}
    assert arguments.select_gpus(None, env) is None and env == {}
    assert arguments.select_gpus("1,0", env) == "1,0" and env["CUDA_VISIBLE_DEVICES"] == "1,0"
    narrowed = {"CUDA_VISIBLE_DEVICES": "4,6"}
    assert arguments.select_gpus("1", narrowed) == "6"  # indices pick from what the container may use
    with pytest.raises(ConfigError, match="only 2 GPU"):
        arguments.select_gpus("2", {"CUDA_VISIBLE_DEVICES": "4,6"})

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    folder, _ = train_unsloth({"hardware": {"gpus": "0"}, "schedule": {"max_steps": 2}})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert "hardware.gpus '0': CUDA_VISIBLE_DEVICES=0" in notes(folder)


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------- dataset fields


def test_text_field_and_chat_template_pick_the_text(tiny_model: Path, tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": "3"}]
    assert isinstance(to_sample(Row("f:1", {"body": "a cat"}), "body", False), TextSample)
    assert isinstance(to_sample(Row("f:1", {"prompt": "p", "completion": "c"}), "text", False), PromptSample)
    assert isinstance(to_sample(Row("f:1", {"prompt": "p", "completion": "c"}), "text", True), ChatSample)
    assert isinstance(to_sample(Row("f:1", {"conversation": chat}), "conversation", True), ChatSample)
    assert isinstance(to_sample(Row("f:1", {"messages": chat, "text": "x"}), "text", True), ChatSample)
    with pytest.raises(DataError, match=r"f:1: `messages` holds a chat.*apply_chat_template: true"):
        to_sample(Row("f:1", {"messages": chat}), "text", False)
    with pytest.raises(DataError, match=r"f:7: dataset.text_field is `text`.*found keys: body"):
        to_sample(Row("f:7", {"body": "a cat"}), "text", False)

    # Tokenized: chat rows train on the assistant turn only; text rows on every token.
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"conversation": chat, "body": "red cat"}) + "\n" for _ in range(4)))
    job_chat = unsloth_job(
        tmp_path, tiny_model, rows, {"dataset": {"text_field": "conversation", "apply_chat_template": True}}
    )
    job_text = unsloth_job(tmp_path, tiny_model, rows, {"dataset": {"text_field": "body"}})
    tokenizer = _tokenizer(tiny_model)
    as_chat = load_sft_data(arguments.section_of(job_chat), str(rows), str(rows), tokenizer).train[0]
    as_text = load_sft_data(arguments.section_of(job_text), str(rows), str(rows), tokenizer).train[0]
    assert "<|im_start|>user" in tokenizer.decode(as_chat["input_ids"])
    assert tokenizer.decode([t for t in as_chat["labels"] if t != IGNORE_INDEX]).startswith("3")
    assert tokenizer.decode(as_text["input_ids"]).startswith("red cat")
    assert IGNORE_INDEX not in as_text["labels"]


def test_validation_path_is_used_instead_of_a_hold_out(tiny_model: Path, task_data: Path, tmp_path: Path) -> None:
    validation = tmp_path / "val.jsonl"
    validation.write_text(json.dumps({"prompt": "add 1 and 1", "completion": "2"}) + "\n")
    tokenizer = _tokenizer(tiny_model)
    given = load_sft_data(
        arguments.section_of(unsloth_job(tmp_path, tiny_model, task_data)), str(task_data), str(validation), tokenizer
    )
    held = load_sft_data(
        arguments.section_of(unsloth_job(tmp_path, tiny_model, task_data)), str(task_data), None, tokenizer
    )
    assert (len(given.train), len(given.validation), given.held_out) == (160, 1, False)
    assert (len(held.train), len(held.validation), held.held_out) == (144, 16, True)


# --------------------------------------------------------------------------- kubetune run


def test_kubetune_run_completes_a_tiny_unsloth_job(tiny_model: Path, task_data: Path, tmp_path: Path) -> None:
    manifest = f"""
apiVersion: kubetune.io/v1alpha1
kind: Model
metadata: {{name: tiny}}
spec: {{source: {{hostPath: {{path: {tiny_model}}}}}}}
---
apiVersion: kubetune.io/v1alpha1
kind: FileSet
metadata: {{name: train}}
spec: {{source: {{hostPath: {{path: {task_data}}}}}}}
---
apiVersion: kubetune.io/v1alpha1
kind: CustomizationJob
metadata: {{name: tiny-unsloth}}
spec:
  unsloth:
    model: {{name: tiny, max_seq_length: 64, dtype: float32}}
    dataset: {{path: train}}
    training: {{lora: {{rank: 8, alpha: 16}}}}
    schedule: {{max_steps: 12}}
    batch: {{per_device_train_batch_size: 8}}
    optimizer: {{learning_rate: 0.02}}
"""
    (tmp_path / "job.yaml").write_text(manifest)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    kubetune = Path(sys.executable).parent / "kubetune"
    done = subprocess.run(
        [str(kubetune), "run", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = tmp_path / "run" / "tiny-unsloth-output"
    info = read_result(result)
    assert info["backend"] == "unsloth" and info["save_method"] == "lora"
    assert "model: LlamaForCausalLM, 4-bit" in done.stderr  # NeMo Customizer's default: load_in_4bit
    assert "--- sample (greedy) ---" in done.stdout and "after:" in done.stdout
    assert info["metrics"]["train_loss"] < info["metrics"]["first_loss"]
