"""`hf://org/name` model sources: one download per node, into the cache volume.

In a pod HF_HOME is on the cache volume (`/cache/huggingface`), so the download lands there.
Under torchrun only the first process of each node (local rank 0) downloads; the others
wait at a barrier and then open the same snapshot from the cache without touching the
network. A failure (an offline cluster, a gated model without a token) becomes a
`ModelError` that says how to pre-load the model. `HF_TOKEN` comes from the Secret the
Model names (`source.tokenSecret`), set on the pod as a secretKeyRef.
"""

from __future__ import annotations

from kubetune_trainer.distributed import World, barrier
from kubetune_trainer.models import HF_SCHEME, ModelError


def snapshot_download(repo_id: str, local_files_only: bool) -> str:
    """The one call that may reach the network (tests replace it with a fake hub)."""
    from huggingface_hub import snapshot_download as download

    return str(download(repo_id, local_files_only=local_files_only))


def unreachable(uri: str, error: Exception) -> ModelError:
    repo_id = uri[len(HF_SCHEME) :]
    return ModelError(
        f"cannot download {uri}: {type(error).__name__}: {error}. The model hub may be unreachable from here "
        "(an offline cluster, HF_HUB_OFFLINE=1) or the model gated (name a Secret with HF_TOKEN in the Model's "
        f"source.tokenSecret). To pre-load it: where the hub is reachable run `hf download {repo_id} "
        "--local-dir <folder>`, copy the folder onto a volume and use a Model with source.pvc or source.hostPath "
        "instead"
    )


def hub_model_path(uri: str, world: World) -> str:
    """The local snapshot of `hf://org/name`, downloaded once per node (local rank 0)."""
    repo_id = uri[len(HF_SCHEME) :]
    folder: str | None = None
    failure: Exception | None = None
    if world.local_rank == 0:
        try:
            folder = snapshot_download(repo_id, local_files_only=False)
        except Exception as error:  # re-raised after the barrier, so the other ranks do not wait forever
            failure = error
    barrier(world)
    if failure is not None:
        raise unreachable(uri, failure) from None
    if folder is None:
        try:
            folder = snapshot_download(repo_id, local_files_only=True)
        except Exception as error:
            raise unreachable(uri, error) from None
    return folder
