"""Experiment-tracking integrations, the same object for both backends.

Fields follow NeMo Customizer's job reference. A non-null block *requests* the
integration: the trainer image ships `wandb` and `mlflow` (the client), and the job fails
at start when the integration cannot be set up. Credentials come from a Secret in the
job's namespace (`api_key_secret`), passed to the trainer pod as a `secretKeyRef`
environment variable (`kubetune.planning.tracking`), never through the job's ConfigMap.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from kubetune.api.common import MAX_LIST_ITEMS, MAX_NAME_LENGTH, MAX_TEXT_LENGTH, Reference, Section

Tag = Annotated[str, StringConstraints(max_length=256)]


class WandbIntegration(Section):
    project: str | None = Field(
        None, max_length=MAX_NAME_LENGTH * 2, description="W&B project; defaults to output.name."
    )
    entity: str | None = Field(None, max_length=MAX_NAME_LENGTH * 2, description="W&B team or user.")
    tags: list[Tag] | None = Field(None, max_length=MAX_LIST_ITEMS, description="Tags attached to the W&B run.")
    api_key_secret: Reference | None = Field(
        None,
        description=(
            "Secret in the job's namespace (`name` or `workspace/name`) whose `WANDB_API_KEY` key holds the "
            "API key; it reaches the trainer as the WANDB_API_KEY environment variable."
        ),
    )
    name: str | None = Field(None, max_length=MAX_NAME_LENGTH * 2, description="Run name; defaults to the job name.")
    notes: str | None = Field(None, max_length=MAX_TEXT_LENGTH, description="Run notes.")
    base_url: str | None = Field(
        None, max_length=MAX_TEXT_LENGTH, description="Self-hosted W&B URL; omit for W&B cloud."
    )


class MlflowIntegration(Section):
    experiment_name: str | None = Field(
        None, max_length=MAX_NAME_LENGTH * 4, description="MLflow experiment; defaults to output.name."
    )
    tracking_uri: str | None = Field(
        None,
        max_length=MAX_TEXT_LENGTH,
        description="MLflow tracking server; can also come from the MLFLOW_TRACKING_URI environment variable.",
    )
    name: str | None = Field(None, max_length=MAX_NAME_LENGTH * 2, description="Run name; defaults to the job name.")
    tags: dict[str, Tag] | None = Field(None, max_length=MAX_LIST_ITEMS, description="Tags attached to the MLflow run.")
    description: str | None = Field(None, max_length=MAX_TEXT_LENGTH, description="Run description.")
    api_key_secret: Reference | None = Field(
        None,
        description=(
            "Secret in the job's namespace (`name` or `workspace/name`) whose `MLFLOW_TRACKING_TOKEN` key holds "
            "the tracking server's token; it reaches the trainer as the MLFLOW_TRACKING_TOKEN environment variable."
        ),
    )


class Integrations(Section):
    wandb: WandbIntegration | None = Field(None, description="Weights & Biases tracking (requested when present).")
    mlflow: MlflowIntegration | None = Field(None, description="MLflow tracking (requested when present).")
