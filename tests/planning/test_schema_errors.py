"""Error paths stay one readable line whatever keys a manifest holds."""

from __future__ import annotations

import pytest

from kubetune.planning.schema_errors import dotted
from kubetune.planning.validation import validate_job
from tests.cases import automodel


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("automodel", "batch", "global_batch_size"), "spec.automodel.batch.global_batch_size"),
        (("scheduling", "tolerations", 0, "key"), "spec.scheduling.tolerations[0].key"),
        (("automodel", "a b"), 'spec.automodel["a b"]'),
        (("automodel", "line\nbreak"), 'spec.automodel["line\\nbreak"]'),
        (("automodel", "sep\u2028\x85"), 'spec.automodel["sep\\u2028\\u0085"]'),
        (("automodel", 'quote"'), 'spec.automodel["quote\\""]'),
        (("automodel", "ünïcødé"), 'spec.automodel["ünïcødé"]'),
    ],
)
def test_paths_are_one_line(loc: tuple[int | str, ...], path: str) -> None:
    assert dotted(loc, "spec") == path
    assert len(path.splitlines()) == 1


def test_an_enum_given_a_list_is_an_error_not_a_crash() -> None:
    job = automodel(training={"finetuning_type": ["lora"]})
    errors = {e.path: e.message for e in validate_job(job).errors}
    assert errors["spec.automodel.training.finetuning_type"].startswith("must be one of")
