"""`kubetune validate [-o json] FILE...`: check jobs the way the operator will.

Exit 0 when every job (and every Model/FileSet in the input) is valid, 1 when any is
invalid, 2 on usage, file or YAML errors. Models and FileSets in the input resolve the
jobs' references; references that are not in the input are warnings, not errors.
"""

from __future__ import annotations

import json
from typing import TextIO

from kubetune.cli.bundle import Bundle, sort_manifests
from kubetune.cli.documents import Document
from kubetune.planning.layout import Layout
from kubetune.planning.validation import JobReport, validate_job

EXIT_VALID, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def validate_documents(
    documents: list[Document], gpu_type: str | None = None
) -> tuple[Bundle, list[tuple[Document, JobReport]]]:
    bundle = sort_manifests([document.body for document in documents])
    reports = [(documents[index], validate_job(manifest, bundle.catalog, gpu_type)) for index, manifest in bundle.jobs]
    return bundle, reports


def run_validate(documents: list[Document], output: str, out: TextIO, gpu_type: str | None = None) -> int:
    bundle, reports = validate_documents(documents, gpu_type)
    objects_valid = all(not report.errors for _, report in bundle.objects)
    if output == "json":
        json.dump([report.to_json() for _, report in reports], out, indent=2)
        out.write("\n")
    else:
        _print_human(documents, bundle, reports, out)
    if not reports and not bundle.objects:
        if output != "json":
            out.write("no CustomizationJob, Model or FileSet found in the input\n")
        return EXIT_USAGE
    return EXIT_VALID if objects_valid and all(report.valid for _, report in reports) else EXIT_INVALID


def _print_human(
    documents: list[Document], bundle: Bundle, reports: list[tuple[Document, JobReport]], out: TextIO
) -> None:
    for index, obj in bundle.objects:
        if obj.errors:
            out.write(f"{documents[index].source}: {obj.kind} {obj.namespace}/{obj.name}: invalid\n")
            for error in obj.errors:
                out.write(f"  error: {error.path}: {error.message}\n")
    for document, report in reports:
        title = f"{document.source}: CustomizationJob {report.namespace}/{report.name or '?'}"
        backend = f" ({report.backend})" if report.backend else ""
        if report.valid:
            out.write(f"{title}{backend}: valid\n")
        else:
            count = len(report.errors)
            out.write(f"{title}{backend}: {count} error{'s' if count != 1 else ''}\n")
        for error in report.errors:
            out.write(f"  error: {error.path}: {error.message}\n")
        for warning in report.warnings:
            out.write(f"  warning: {warning.path}: {warning.message}\n")
        if report.layout:
            out.write(f"  layout: {describe_layout(report.layout)}\n")
    for index, description in bundle.ignored:
        out.write(f"{documents[index].source}: skipped: {description}\n")


def describe_layout(layout: Layout) -> str:
    return (
        f"{layout.total_gpus} GPU{'s' if layout.total_gpus != 1 else ''} = DP {layout.data_parallel_size} × "
        f"TP {layout.tensor_parallel_size} × PP {layout.pipeline_parallel_size} × "
        f"CP {layout.context_parallel_size} (EP {layout.expert_parallel_size}); "
        f"gradient accumulation {layout.gradient_accumulation_steps}"
    )
