"""Both backends' main process reports to the job's status when the operator asks for it."""

from __future__ import annotations

import torch

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.layout import compute_layout
from kubetune.planning.resolved import JobIdentity, ResolvedJob, ResolvedPaths, resolve
from kubetune_trainer.backends.automodel.engine import make_reporter
from kubetune_trainer.backends.unsloth.reporting import make_reporter as make_unsloth_reporter
from kubetune_trainer.config import RunOptions
from kubetune_trainer.distributed import World
from kubetune_trainer.kube_status import KubernetesStatusReporter


def _job(section: AutomodelSpec | UnslothSpec) -> ResolvedJob:
    return resolve(
        section,
        compute_layout(section),
        JobIdentity(name="j", namespace="ns"),
        ResolvedPaths(model="/m", training="/d", output="/o"),
    )


def test_automodel_rank0_reports_to_the_job_status(in_cluster: None) -> None:
    job = _job(AutomodelSpec.model_validate({"model": "m", "dataset": {"training": "d"}}))
    reporter = make_reporter(
        job, World(rank=0, local_rank=0, size=1, device=torch.device("cpu")), RunOptions(progress_bar=False)
    )
    [cluster] = [r for r in reporter.reporters if isinstance(r, KubernetesStatusReporter)]  # type: ignore[attr-defined]
    assert cluster.url == "https://10.0.0.1:443/apis/kubetune.io/v1alpha1/namespaces/ns/customizationjobs/j/status"


def test_unsloth_reports_to_the_job_status(in_cluster: None) -> None:
    job = _job(UnslothSpec.model_validate({"model": {"name": "m"}, "dataset": {"path": "d"}}))
    reporter = make_unsloth_reporter(job, RunOptions(progress_bar=False))
    assert any(isinstance(r, KubernetesStatusReporter) for r in reporter.reporters)
