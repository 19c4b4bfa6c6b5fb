"""The operator's settings from the environment: names, parsing, and errors that name the variable."""

from __future__ import annotations

import pytest

from kubetune.handlers.settings import SettingsError
from tests.helmchart import settings_for


@pytest.mark.parametrize(
    ("env", "path", "expected"),
    [
        ({}, "watch.workers", 16),
        ({"KUBETUNE_WORKERS": ""}, "watch.workers", 16),  # empty is unset, as the chart writes it
        ({"KUBETUNE_WORKERS": "4"}, "watch.workers", 4),
        ({"KUBETUNE_NAMESPACES": " a, b ,,"}, "watch.namespaces", ("a", "b")),
        ({"KUBETUNE_ALLOWED_HOST_PATHS": "/models,/data"}, "cluster.allowed_host_paths", ("/models", "/data")),
        ({"KUBETUNE_GPU_MEMORY_GIB": "79.6"}, "cluster.gpu_memory_gib", 79.6),
        ({"KUBETUNE_WEBHOOK_ENABLED": "true"}, "webhook.enabled", True),
        ({"KUBETUNE_HEALTH_PORT": "0"}, "endpoints.health_port", 0),
        ({"KUBETUNE_TRAINER_SHM_SIZE": "32Gi"}, "trainer.shm_size", "32Gi"),
        (
            {"KUBETUNE_TRAINER_RESOURCES": '{"requests": {"cpu": 8, "memory": "64Gi"}}'},
            "trainer.resources",
            {"requests": {"cpu": "8", "memory": "64Gi"}},
        ),
    ],
)
def test_a_variable_sets_its_field(env: dict[str, str], path: str, expected: object) -> None:
    group, field = path.split(".")
    assert getattr(getattr(settings_for(env), group), field) == expected


@pytest.mark.parametrize(
    ("env", "messages"),
    [
        ({"KUBETUNE_WORKERS": "many"}, ["KUBETUNE_WORKERS='many'", "integer"]),
        ({"KUBETUNE_WORKERS": "0"}, ["KUBETUNE_WORKERS='0'", "greater than or equal to 1"]),
        (
            {"KUBETUNE_ALLOWED_HOST_PATHS": "/ok,relative"},
            ["KUBETUNE_ALLOWED_HOST_PATHS", "relative is not an absolute"],
        ),
        ({"KUBETUNE_WEBHOOK_ENABLED": "maybe"}, ["KUBETUNE_WEBHOOK_ENABLED='maybe'", "boolean"]),
        ({"KUBETUNE_TRAINER_IMAGE_PULL_POLICY": "Sometimes"}, ["KUBETUNE_TRAINER_IMAGE_PULL_POLICY", "IfNotPresent"]),
        ({"KUBETUNE_TRAINER_PROGRESS_INTERVAL_SECONDS": "0"}, ["KUBETUNE_TRAINER_PROGRESS_INTERVAL_SECONDS"]),
        ({"KUBETUNE_TRAINER_RESOURCES": '{"spare": {}}'}, ["KUBETUNE_TRAINER_RESOURCES", "spare"]),
        ({"KUBETUNE_TRAINER_RESOURCES": "{not json"}, ["KUBETUNE_TRAINER_RESOURCES='{not json'", "not JSON"]),
        # Every bad variable at once, not the first only.
        ({"KUBETUNE_WORKERS": "x", "KUBETUNE_GPU_MEMORY_GIB": "-1"}, ["KUBETUNE_WORKERS", "KUBETUNE_GPU_MEMORY_GIB"]),
    ],
)
def test_a_bad_variable_is_named(env: dict[str, str], messages: list[str]) -> None:
    with pytest.raises(SettingsError) as error:
        settings_for(env)
    for message in messages:
        assert message in str(error.value)
