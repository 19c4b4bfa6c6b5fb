"""`kubetune validate`, `schema` and `crds`: exit codes, JSON shape, human output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.cli.documents import DocumentError, load_text
from kubetune.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))

THREE_RULES = """
apiVersion: kubetune.io/v1alpha1
kind: CustomizationJob
metadata: {name: broken, namespace: team-a}
spec:
  unsloth:
    model: {name: base, load_in_8bit: true}
    dataset: {path: data}
    schedule: {warmup_ratio: 0.1, warmup_steps: 5}
    output: {save_method: merged_4bit}
    training: {finetuning_type: all_weights, lora: {rank: 8}}
"""


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_examples_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert EXAMPLES
    code, out, _ = _run(capsys, "validate", *EXAMPLES)
    assert code == 0, out
    assert "error" not in out


def test_json_lists_every_broken_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(THREE_RULES)
    code, out, _ = _run(capsys, "validate", "-o", "json", str(path))
    assert code == 1
    [report] = json.loads(out)
    assert set(report) == {"name", "namespace", "backend", "valid", "errors", "warnings", "layout"}
    assert (report["name"], report["namespace"], report["backend"], report["valid"]) == (
        "broken",
        "team-a",
        "unsloth",
        False,
    )
    assert {e["path"] for e in report["errors"]} == {
        "spec.unsloth.model.load_in_8bit",
        "spec.unsloth.model.load_in_4bit",
        "spec.unsloth.schedule.warmup_ratio",
        "spec.unsloth.output.save_method",
        "spec.unsloth.training.lora",
    }
    assert all(set(e) == {"path", "message"} for e in report["errors"])
    assert report["layout"] is None


def test_json_layout_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "validate", "-o", "json", str(ROOT / "examples" / "01-lora-sft.yaml"))
    assert code == 0
    [report] = json.loads(out)
    assert report["layout"] == {
        "total_gpus": 16,
        "world_size": 16,
        "data_parallel_size": 8,
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "context_parallel_size": 1,
        "expert_parallel_size": 1,
        "gradient_accumulation_steps": 2,
    }
    assert report["warnings"] == []


def test_unresolved_references_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: CustomizationJob\nmetadata: {name: j}\n"
        "spec: {automodel: {model: m, dataset: {training: d}, optimizer: {learning_rate: 5e-6}}}\n"
    )
    code, out, _ = _run(capsys, "validate", str(path))
    assert code == 0
    assert "warning: spec.automodel.model: Model default/m was not found in the input" in out


def test_yaml_error_exits_2_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: v1\nkind: [unclosed\n")
    code, _, err = _run(capsys, "validate", str(path))
    assert code == 2
    assert f"{path}:3:1: invalid YAML" in err or f"{path}:2:" in err


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "validate", "/no/such/file.yaml")
    assert code == 2 and "/no/such/file.yaml: no such file" in err


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate"])
    assert exit_info.value.code == 2


def test_invalid_model_document_fails_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("apiVersion: kubetune.io/v1alpha1\nkind: Model\nmetadata: {name: m}\nspec: {source: {}}\n")
    code, out, _ = _run(capsys, "validate", str(path))
    assert code == 1
    assert "error: spec.source: set exactly one source" in out


@pytest.mark.parametrize(
    ("text", "value"), [("5e-6", 5e-6), ("1E3", 1000.0), ("1.0e-4", 1e-4), ("7", 7), ("'5e-6'", "5e-6")]
)
def test_yaml_numbers_follow_kubernetes(text: str, value: object) -> None:
    [document] = load_text(f"x: {text}\n")
    assert document.body["x"] == value and type(document.body["x"]) is type(value)


def test_multi_document_sources_are_numbered() -> None:
    documents = load_text("a: 1\n---\nb: 2\n", "f.yaml")
    assert [d.source for d in documents] == ["f.yaml#1", "f.yaml#2"]
    with pytest.raises(DocumentError):
        load_text("a: [1\n", "f.yaml")


@pytest.mark.parametrize("backend", ["automodel", "unsloth"])
def test_schema_prints_the_live_schema(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "schema", backend)
    schema = json.loads(out)
    assert code == 0 and schema["additionalProperties"] is False
    assert {"model", "dataset", "training", "schedule", "batch", "optimizer", "output", "integrations"} <= set(
        schema["properties"]
    )
    assert ("parallelism" in schema["properties"]) is (backend == "automodel")
    assert ("hardware" in schema["properties"]) is (backend == "unsloth")


def test_crds_in_the_repo_are_current(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, _ = _run(capsys, "crds", "--out-dir", str(tmp_path))
    assert code == 0
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    committed = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert generated == committed, "crds/ is stale: run `kubetune crds --out-dir crds`"
    code, out, _ = _run(capsys, "crds")
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(out)] == [
        "customizationjobs.kubetune.io",
        "models.kubetune.io",
        "filesets.kubetune.io",
    ]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "kubetune"
    result = subprocess.run([str(script), "validate", *EXAMPLES], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
