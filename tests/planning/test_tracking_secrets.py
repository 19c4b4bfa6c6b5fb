"""`integrations.*.api_key_secret`: a Secret of the job's namespace, passed as a secretKeyRef."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli.documents import load_files
from kubetune.cli.render import run_render
from kubetune.planning.validation import validate_job

ROOT = Path(__file__).resolve().parents[2]


def _job(integrations: dict[str, Any], namespace: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": "tracked", "namespace": namespace},
        "spec": {"automodel": {"model": "m", "dataset": {"training": "d"}, "integrations": integrations}},
    }


@pytest.mark.parametrize("reference", ["wandb-key", "team-a/wandb-key"])
def test_secret_of_the_job_namespace_is_accepted(reference: str) -> None:
    report = validate_job(_job({"wandb": {"api_key_secret": reference}}))
    assert report.valid, report.errors


def test_secret_of_another_namespace_is_refused_with_the_field_path() -> None:
    report = validate_job(
        _job({"wandb": {"api_key_secret": "shared/wandb-key"}, "mlflow": {"api_key_secret": "ops/token"}})
    )
    found = {error.path: error.message for error in report.errors}
    assert set(found) == {
        "spec.automodel.integrations.wandb.api_key_secret",
        "spec.automodel.integrations.mlflow.api_key_secret",
    }
    assert (
        "a pod can only read Secrets of its own namespace" in found["spec.automodel.integrations.wandb.api_key_secret"]
    )
    assert (
        "create the Secret (key WANDB_API_KEY) in 'team-a'" in found["spec.automodel.integrations.wandb.api_key_secret"]
    )


def test_malformed_secret_reference_is_refused() -> None:
    report = validate_job(_job({"wandb": {"api_key_secret": "a/b/c"}}))
    assert [e.path for e in report.errors] == ["spec.automodel.integrations.wandb.api_key_secret"]


def test_keys_reach_the_pod_as_secret_refs_never_the_config_map(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((ROOT / "examples" / "01-lora-sft.yaml").read_text()))
    job = next(doc for doc in documents if doc["kind"] == "CustomizationJob")
    job["spec"]["automodel"]["integrations"] = {
        "wandb": {"project": "p", "api_key_secret": "team-a/wandb-key"},
        "mlflow": {"tracking_uri": "http://mlflow.team-a:5000", "api_key_secret": "mlflow-token"},
    }
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    out, err = io.StringIO(), io.StringIO()
    assert run_render(load_files([str(manifest)]), out, err) == 0, err.getvalue()
    children = {doc["kind"]: doc for doc in yaml.safe_load_all(out.getvalue())}
    for replica in ("Master", "Worker"):
        pod = children["PyTorchJob"]["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["WANDB_API_KEY"] == {
            "name": "WANDB_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "wandb-key", "key": "WANDB_API_KEY"}},
        }
        assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "mlflow-token",
            "key": "MLFLOW_TRACKING_TOKEN",
        }
    config = json.loads(children["ConfigMap"]["data"]["job.json"])
    assert "valueFrom" not in json.dumps(config) and "WANDB_API_KEY" not in json.dumps(config)


def test_hub_token_comes_from_the_models_secret(tmp_path: Path) -> None:
    """An `hf://` Model naming `source.tokenSecret` gives the pods HF_TOKEN from that Secret."""
    documents = list(yaml.safe_load_all((ROOT / "examples" / "04-full-weights-shared.yaml").read_text()))
    [hub_model] = [d for d in documents if d["kind"] == "Model" and "uri" in d["spec"]["source"]]

    def pod_env() -> dict[str, Any]:
        manifest = tmp_path / "job.yaml"
        manifest.write_text(yaml.safe_dump_all(documents))
        out, err = io.StringIO(), io.StringIO()
        assert run_render(load_files([str(manifest)]), out, err) == 0, err.getvalue()
        children = {doc["kind"]: doc for doc in yaml.safe_load_all(out.getvalue())}
        pod = children["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        return {e["name"]: e for e in pod["containers"][0]["env"]}

    assert "HF_TOKEN" not in pod_env()
    hub_model["spec"]["source"]["tokenSecret"] = "hub-token"
    env = pod_env()
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "HF_TOKEN"}},
    }
    assert env["HF_HOME"]["value"] == "/cache/huggingface"  # the download lands on the cache volume
