"""Experiment-tracking integrations, the same object for both backends.

Fields follow NeMo Customizer's job reference. A non-null block *requests* the
integration; the trainer activates it only when its credentials or URI are present.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from kubetune.api.common import MAX_LIST_ITEMS, MAX_NAME_LENGTH, MAX_TEXT_LENGTH, DnsLabel, Section

Tag = Annotated[str, StringConstraints(max_length=256)]


class WandbIntegration(Section):
    project: str | None = Field(
        None, max_length=MAX_NAME_LENGTH * 2, description="W&B project; defaults to output.name."
    )
    entity: str | None = Field(None, max_length=MAX_NAME_LENGTH * 2, description="W&B team or user.")
    tags: list[Tag] | None = Field(None, max_length=MAX_LIST_ITEMS, description="Tags attached to the W&B run.")
    api_key_secret: DnsLabel | None = Field(
        None,
        description="Name of a Secret in the job's namespace whose `WANDB_API_KEY` key holds the API key.",
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


class Integrations(Section):
    wandb: WandbIntegration | None = Field(None, description="Weights & Biases tracking (requested when present).")
    mlflow: MlflowIntegration | None = Field(None, description="MLflow tracking (requested when present).")
