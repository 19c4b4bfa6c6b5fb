"""`kubetune run` end to end on a tiny model: validate, resolve, train, write, sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from kubetune.cli.main import main


def manifests(model: Path, data: str, extra: str = "", fileset_source: str | None = None) -> str:
    source = fileset_source or f"{{hostPath: {{path: {data}}}}}"
    return f"""
apiVersion: kubetune.io/v1alpha1
kind: Model
metadata: {{name: tiny}}
spec: {{source: {{hostPath: {{path: {model}}}}}}}
---
apiVersion: kubetune.io/v1alpha1
kind: FileSet
metadata: {{name: tasks}}
spec: {{source: {source}}}
---
apiVersion: kubetune.io/v1alpha1
kind: CustomizationJob
metadata: {{name: tiny-run}}
spec:
  automodel:
    model: tiny
    dataset: {{training: tasks}}
    training: {{finetuning_type: lora, lora: {{rank: 8}}, max_seq_length: 64}}
    schedule: {{max_steps: 6, seed: 3{extra}}}
    batch: {{global_batch_size: 8, micro_batch_size: 8}}
    optimizer: {{learning_rate: 1.0e-2}}
"""


@pytest.fixture
def example(tmp_path: Path, tiny_model: Path, task_data: Path) -> Path:
    (tmp_path / "data").mkdir()
    shutil.copy(task_data, tmp_path / "data" / "train.jsonl")
    path = tmp_path / "job.yaml"
    path.write_text(manifests(tiny_model, "data"), encoding="utf-8")  # a path relative to the YAML file
    return path


def test_kubetune_run_trains_writes_and_samples(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", str(example), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "job default/tiny-run: 1 GPU = DP 1" in printed
    assert f"result (adapter): {out.resolve() / 'tiny-run-output'}" in printed
    assert "--- sample (greedy) ---" in printed and "\nbefore: " in printed and "\nafter: " in printed
    assert (out / "tiny-run-output" / "adapter_model.safetensors").is_file()
    job = yaml.safe_load((out / "job.json").read_text())
    assert job["paths"]["training"] == str(example.parent / "data") and job["output"]["type"] == "adapter"
    assert '"kind": "end"' in (out / "progress.jsonl").read_text()

    # The same job again: already finished, nothing retrained.
    assert main(["run", str(example), "--output", str(out), "--no-sample"]) == 0
    # A different job into the same folder is refused unless --fresh.
    example.write_text(
        manifests(Path(yaml.safe_load((out / "job.json").read_text())["paths"]["model"]), "data", ", epochs: 2"),
        encoding="utf-8",
    )
    assert main(["run", str(example), "--output", str(out), "--no-sample"]) == 1
    assert "holds a different job's run; pass --fresh" in capsys.readouterr().err
    assert main(["run", str(example), "--output", str(out), "--no-sample", "--fresh"]) == 0


@pytest.mark.parametrize(
    ("fileset_source", "message"),
    [
        ("{pvc: {claimName: data}}", "kubetune run needs a hostPath source"),
        ("{hostPath: {path: /does/not/exist}}", "source.hostPath /does/not/exist does not exist"),
    ],
)
def test_kubetune_run_needs_local_sources(
    tmp_path: Path, tiny_model: Path, fileset_source: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(manifests(tiny_model, "", fileset_source=fileset_source), encoding="utf-8")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err


def test_kubetune_run_reports_an_invalid_job(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(manifests(tiny_model, "data").replace("global_batch_size: 8", "global_batch_size: 7"), "utf-8")
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 1
    captured = capsys.readouterr()
    assert "spec.automodel.batch.global_batch_size" in captured.out and "is invalid" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parallelism", "layout"),
    [
        ("{num_gpus_per_node: 2}", "2 GPUs = DP 2 × TP 1"),
        ("{num_gpus_per_node: 2, tensor_parallel_size: 2}", "2 GPUs = DP 1 × TP 2"),
    ],
)
def test_kubetune_run_starts_torchrun_for_several_processes(
    tmp_path: Path,
    tiny_model: Path,
    task_data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    parallelism: str,
    layout: str,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "job.yaml"
    text = (
        manifests(tiny_model, str(task_data))
        .replace(
            "optimizer: {learning_rate: 1.0e-2}",
            f"optimizer: {{learning_rate: 1.0e-2}}\n    parallelism: {parallelism}",
        )
        .replace("micro_batch_size: 8", "micro_batch_size: 2")
    )
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert layout in printed
    # The adapter gathered from the split model loads and generates (the sample after training).
    assert (out / "tiny-run-output" / "adapter_model.safetensors").is_file()
    assert "--- sample (greedy) ---" in printed and "\nafter: " in printed
    steps = [line for line in (out / "progress.jsonl").read_text().splitlines() if '"kind": "step"' in line]
    assert len(steps) == 6  # one reporter (rank 0), every step
