"""`kubetune validate` never crashes: every mutated manifest gets a report, never a traceback.

A property test over FUZZ_EXAMPLES (10,000) generated and mutated manifests (tests/manifests_fuzz.py),
run through the same code as `kubetune validate` (documents in, report out), in both output
formats. About 75 s of CPU (measured: 338 s wall on this 2-core machine under a load of ~10).
"""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kubetune.cli.documents import Document
from kubetune.cli.validate import EXIT_INVALID, EXIT_USAGE, EXIT_VALID, run_validate, validate_documents

from ..manifests_fuzz import EXAMPLE_JOBS, EXAMPLE_OBJECTS, FUZZ_SETTINGS, mutated

# One mutated job (or any document) next to up to two Models/FileSets, mutated or not.
_DOCUMENTS = st.tuples(
    mutated(EXAMPLE_JOBS),
    st.lists(st.one_of(mutated(EXAMPLE_OBJECTS), st.sampled_from(EXAMPLE_OBJECTS)), max_size=2),
).map(lambda drawn: [drawn[0], *drawn[1]])


def _assert_findings(findings: list[Any]) -> None:
    for finding in findings:
        assert isinstance(finding.path, str) and finding.path, finding
        assert isinstance(finding.message, str) and finding.message, finding


@FUZZ_SETTINGS
@given(_DOCUMENTS)
def test_every_manifest_gets_a_report(bodies: list[Any]) -> None:
    documents = [Document(f"fuzz#{index}", body) for index, body in enumerate(bodies, start=1)]
    bundle, reports = validate_documents(documents)
    for _, obj in bundle.objects:
        _assert_findings(obj.errors)
    for _, report in reports:
        assert report.valid == (not report.errors)
        _assert_findings(report.errors)
        _assert_findings(report.warnings)

    out = io.StringIO()
    code = run_validate(documents, "json", out)
    assert code in (EXIT_VALID, EXIT_INVALID, EXIT_USAGE)
    printed = json.loads(out.getvalue())
    assert len(printed) == len(reports)
    for job in printed:
        assert job["valid"] == (not job["errors"])
        assert all(error["path"] and error["message"] for error in job["errors"])
    assert run_validate(documents, "text", io.StringIO()) == code
