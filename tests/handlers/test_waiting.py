"""The registry of jobs waiting for a Model or FileSet (`kubetune.handlers.waiting`)."""

from __future__ import annotations

from kubetune.handlers.waiting import WaitingJobs
from kubetune.planning.references import ObjectKey

BASE = ObjectKey("Model", "team", "base")
TEACHER = ObjectKey("Model", "team", "teacher")
DATA = ObjectKey("FileSet", "team", "data")


def test_a_reference_nudges_exactly_the_jobs_waiting_for_it() -> None:
    waiting = WaitingJobs()
    waiting.wait(("team", "a"), [BASE, DATA])
    waiting.wait(("team", "b"), [BASE])
    waiting.wait(("other", "c"), [TEACHER])
    assert waiting.waiting_for(BASE) == [("team", "a"), ("team", "b")]
    assert waiting.waiting_for(DATA) == [("team", "a")]
    assert waiting.waiting_for(ObjectKey("Model", "other", "base")) == []
    assert len(waiting) == 3


def test_waiting_again_replaces_what_a_job_waited_for() -> None:
    waiting = WaitingJobs()
    waiting.wait(("team", "a"), [BASE, DATA])
    waiting.wait(("team", "a"), [DATA])  # the Model appeared; the FileSet is still missing
    assert waiting.waiting_for(BASE) == [] and waiting.waiting_for(DATA) == [("team", "a")]


def test_a_launched_failed_or_deleted_job_waits_for_nothing() -> None:
    waiting = WaitingJobs()
    waiting.wait(("team", "a"), [BASE])
    waiting.wait(("team", "b"), [BASE])
    waiting.done(("team", "a"))
    waiting.done(("team", "never-waited"))
    assert waiting.waiting_for(BASE) == [("team", "b")] and len(waiting) == 1
    waiting.wait(("team", "b"), [])
    assert waiting.waiting_for(BASE) == [] and len(waiting) == 0
