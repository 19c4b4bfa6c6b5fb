"""`kubetune render FILE`: the child objects the operator would create, as YAML (a dry run)."""

from __future__ import annotations

from typing import TextIO

from kubetune.cli.documents import Document
from kubetune.cli.validate import EXIT_INVALID, EXIT_USAGE, EXIT_VALID, validate_documents
from kubetune.planning.references import cluster_source_problem
from kubetune.render.children import JobInput, render_children
from kubetune.render.yamlout import dump_all

DRY_RUN_UID = "00000000-0000-0000-0000-000000000000"


def run_render(documents: list[Document], out: TextIO, err: TextIO) -> int:
    _, reports = validate_documents(documents)
    if not reports:
        err.write("kubetune render: no CustomizationJob in the input\n")
        return EXIT_USAGE
    rendered: list[dict[str, object]] = []
    status = EXIT_VALID
    for document, report in reports:
        missing = report.references.missing if report.references else []
        if not report.valid or missing or report.spec is None or report.layout is None:
            status = EXIT_INVALID
            err.write(f"{document.source}: CustomizationJob {report.namespace}/{report.name} cannot be rendered:\n")
            for error in report.errors:
                err.write(f"  error: {error.path}: {error.message}\n")
            for ref in missing:
                err.write(f"  error: {ref.path}: {ref.key} must be in the input to render its volumes\n")
            continue
        assert report.references is not None
        sources = {role: target.source for role, target in report.references.resolved.items()}
        problems = [p for p in map(cluster_source_problem, sources.values()) if p]
        if problems:
            status = EXIT_INVALID
            err.write(
                f"{document.source}: CustomizationJob {report.namespace}/{report.name} cannot run in a cluster:\n"
            )
            err.writelines(f"  error: {problem}\n" for problem in problems)
            continue
        job = JobInput(report.name, report.namespace, DRY_RUN_UID, report.spec, report.layout, sources)
        rendered.extend(render_children(job))
    if rendered:
        out.write(dump_all(rendered))
    return status
