"""`kubetune run FILE...`: run a CustomizationJob on this machine, without a cluster.

Same validation as `kubetune validate` and the operator, same layout, same trainer and
the same resolved job file: only the paths differ. The input holds the job and the
Model/FileSet documents it names; their sources must be `hostPath` (a path on this
machine; relative paths are relative to the YAML file, `~` is expanded) or, for models,
`uri: hf://org/name` (downloaded when the network allows).

The run writes into `--output` (default `runs/<namespace>/<job>/`): `job.json` (the
resolved job), `progress.jsonl`, `checkpoints/` and the result `<output name>/`. Running
the same job again resumes from its newest checkpoint (or, when it finished, just shows
the result again); a different job in the same folder is refused unless `--fresh`.

One process for one GPU (or CPU); `num_gpus_per_node > 1` starts torchrun with that many
processes on this machine (gloo on CPU). After training it prints a before/after
generation for a prompt from the data (`--no-sample` to skip).

Exit status: 0 done, 1 invalid job or failed training, 2 usage/file/YAML error,
143 stopped by a signal after writing a checkpoint (run again to resume).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.resources import FileSetSpec, ModelSpec
from kubetune.cli.bundle import sort_manifests
from kubetune.cli.documents import Document
from kubetune.cli.validate import EXIT_INVALID, EXIT_USAGE, EXIT_VALID, describe_layout
from kubetune.planning.references import reference_uses
from kubetune.planning.resolved import JobIdentity, ResolvedJob, ResolvedPaths, resolve
from kubetune.planning.validation import validate_job

EXIT_PREEMPTED = 143


class RunError(Exception):
    """The job cannot run here; exit with `code`."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.code = code


def run_command(
    documents: list[Document],
    job_name: str | None,
    output: str | None,
    fresh: bool,
    sample: bool,
    out: TextIO,
) -> int:
    try:
        job, config = prepare(documents, job_name, output, fresh, out)
        return execute(job, config, sample, out)
    except RunError as error:
        print(f"kubetune run: {error}", file=sys.stderr)
        return error.code


def prepare(
    documents: list[Document], job_name: str | None, output: str | None, fresh: bool, out: TextIO
) -> tuple[ResolvedJob, Path]:
    """Validate, plan and resolve the job; write `job.json`; return it and its path."""
    bundle = sort_manifests([document.body for document in documents])
    jobs = [(index, manifest) for index, manifest in bundle.jobs if job_name in (None, _name(manifest))]
    if len(jobs) != 1:
        names = ", ".join(_name(m) for _, m in bundle.jobs) or "none"
        which = f"named {job_name!r}" if job_name else "(pick one with --job)"
        raise RunError(f"need exactly one CustomizationJob {which}; found: {names}", EXIT_USAGE)
    index, manifest = jobs[0]
    for obj_index, obj in bundle.objects:
        for error in obj.errors:
            out.write(f"{documents[obj_index].source}: {obj.kind} {obj.name}: {error.path}: {error.message}\n")
    report = validate_job(manifest, bundle.catalog)
    for error in report.errors:
        out.write(f"  error: {error.path}: {error.message}\n")
    if not report.valid or report.section is None or report.layout is None:
        raise RunError(f"{documents[index].source}: CustomizationJob {report.name or '?'} is invalid")
    section = report.section
    if isinstance(section, AutomodelSpec) and section.parallelism.num_nodes != 1:
        raise RunError("kubetune run uses this machine only: set parallelism.num_nodes to 1")
    out.write(f"job {report.namespace}/{report.name}: {describe_layout(report.layout)}\n")

    base_dir = _base_dir(documents[index].source)
    paths: dict[str, str] = {}
    for use in reference_uses(section, report.namespace):
        target = report.references.resolved.get(use.role) if report.references else None
        if target is None:
            raise RunError(f"{use.path}: {use.key} must be in the input (kubetune run has no cluster to look it up)")
        paths[use.role] = _local_path(target, str(use.key), base_dir, use.kind == "Model")
    folder = Path(output) if output else Path("runs") / report.namespace / report.name
    job = resolve(
        section,
        report.layout,
        JobIdentity(name=report.name, namespace=report.namespace),
        ResolvedPaths(
            model=paths["model"],
            teacher_model=paths.get("teacher"),
            training=paths["training"],
            validation=paths.get("validation"),
            output=str(folder.resolve()),
        ),
    )
    config = folder / "job.json"
    text = job.model_dump_json(indent=2)
    if config.is_file() and config.read_text(encoding="utf-8") != text and not fresh:
        raise RunError(f"{folder} holds a different job's run; pass --fresh to delete it, or --output another folder")
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(text, encoding="utf-8")
    return job, config


def _name(manifest: Any) -> str:
    metadata = manifest.get("metadata") if isinstance(manifest, dict) else None
    return str(metadata.get("name", "")) if isinstance(metadata, dict) else ""


def _base_dir(source: str) -> Path:
    file = source.rsplit("#", 1)[0]
    return Path(file).resolve().parent if Path(file).exists() else Path.cwd()


def _local_path(spec: ModelSpec | FileSetSpec, key: str, base_dir: Path, model: bool) -> str:
    source = spec.source
    if source.hostPath is not None:
        path = Path(os.path.expanduser(source.hostPath.path))
        path = path if path.is_absolute() else base_dir / path
        if not path.exists():
            hint = " (for the quickstart model run scripts/fetch-smollm2.py first)" if "kubetune" in str(path) else ""
            raise RunError(f"{key}: source.hostPath {path} does not exist{hint}")
        return str(path)
    if source.uri is not None and model:
        return source.uri
    raise RunError(f"{key}: kubetune run needs a hostPath source (a path on this machine); this one has {source}")


def execute(job: ResolvedJob, config: Path, sample: bool, out: TextIO) -> int:
    """Run the trainer (in this process, or torchrun for several processes) and show the result."""
    folder = config.parent
    progress = folder / "progress.jsonl"
    processes = job.layout.world_size
    code = _train_here(job, progress) if processes == 1 else _train_torchrun(job, config, progress, processes)
    if code != EXIT_VALID:
        return code
    result = Path(job.paths.output) / job.output.name
    out.write(f"result ({job.output.type}): {result}\n")
    if sample:
        _show_sample(job, result, out)
    return EXIT_VALID


def _trainer() -> Any:
    try:
        import kubetune_trainer.__main__ as trainer
    except ImportError as error:
        raise RunError(f"kubetune run needs the trainer: pip install 'kubetune[trainer]' ({error})") from None
    return trainer


def _train_here(job: ResolvedJob, progress: Path) -> int:
    trainer = _trainer()
    from kubetune_trainer.checkpoint import Preempted
    from kubetune_trainer.config import ConfigError, RunOptions
    from kubetune_trainer.data import DataError
    from kubetune_trainer.models import ModelError

    try:
        trainer.run_job(job, RunOptions.from_environment(progress_file=str(progress)))
    except (ConfigError, DataError, ModelError) as error:
        raise RunError(str(error)) from None
    except Preempted as error:
        raise RunError(f"{error}; run the same command again to resume", EXIT_PREEMPTED) from None
    return EXIT_VALID


def _train_torchrun(job: ResolvedJob, config: Path, progress: Path, processes: int) -> int:
    _trainer()
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise RunError(f"the job needs {processes} GPUs per node; this machine has {torch.cuda.device_count()}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "kubetune_trainer",
        "--config",
        str(config),
        "--progress-file",
        str(progress),
    ]
    env = dict(os.environ)
    if not torch.cuda.is_available():  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    code = subprocess.call(command, env=env)
    if code == EXIT_PREEMPTED:
        raise RunError("stopped after writing a checkpoint; run the same command again to resume", code)
    if code != 0:
        raise RunError(f"the trainer failed (exit status {code}); see its messages above")
    return EXIT_VALID


def _show_sample(job: ResolvedJob, result: Path, out: TextIO) -> None:
    from kubetune_trainer.data import load_samples, prompt_of
    from kubetune_trainer.models import local_model_path
    from kubetune_trainer.outputs import read_result
    from kubetune_trainer.sample import before_after

    seed = int(read_result(result)["seed"])  # the seed the run used: the same validation split
    if job.unsloth is not None:  # text_field / apply_chat_template decide what a row is
        from kubetune_trainer.backends.unsloth.dataset import load_samples as load_unsloth_samples

        train, validation, _ = load_unsloth_samples(job.unsloth, job.paths.training, job.paths.validation)
    else:
        assert job.automodel is not None
        prompt_template = job.automodel.dataset.prompt_template
        train, validation = load_samples(job.paths.training, job.paths.validation, prompt_template, seed)
    prompt, reference = prompt_of((validation or train)[0])
    before, after = before_after(local_model_path(job.paths.model), result, job.output.type == "adapter", prompt)
    shown = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    out.write("\n--- sample (greedy) ---\n")
    out.write(f"prompt:    {shown}\n")
    out.write(f"reference: {reference}\n")
    out.write(f"before:    {before}\n")
    out.write(f"after:     {after}\n")
    out.flush()
