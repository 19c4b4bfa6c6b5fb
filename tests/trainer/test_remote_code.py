"""`model.trust_remote_code` reaches every load: the data tokenizer as well as the model.

A model folder whose tokenizer is a class defined in the folder itself (`auto_map`, as
checkpoints with custom code ship) loads only with trust_remote_code; without it
transformers refuses. Before this, the unsloth backend loaded the tokenizer that prepares
the data without the flag, so such a job failed before training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import merge  # tests/trainer/conftest.py

from kubetune.api.unsloth import UnslothSpec
from kubetune_trainer.backends.unsloth import arguments
from kubetune_trainer.backends.unsloth.dataset import load_sft_data
from kubetune_trainer.models import load_tokenizer

CUSTOM_TOKENIZER = '''
from transformers import PreTrainedTokenizerFast


class KubetuneTestTokenizer(PreTrainedTokenizerFast):
    """A checkpoint-defined tokenizer class (loads only with trust_remote_code)."""
'''


@pytest.fixture(scope="module")
def remote_code_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("remote") / "custom-code-model"
    shutil.copytree(tiny_model, folder)
    (folder / "tokenization_kubetune_test.py").write_text(CUSTOM_TOKENIZER, encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_kubetune_test.KubetuneTestTokenizer"]}
    config["tokenizer_class"] = "KubetuneTestTokenizer"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return folder


def _section(trust: bool) -> UnslothSpec:
    body = merge(
        {"model": {"name": "m", "load_in_4bit": False, "max_seq_length": 64}, "dataset": {"path": "d"}},
        {"model": {"trust_remote_code": trust}},
    )
    return UnslothSpec.model_validate(body)


def test_custom_tokenizer_needs_trust(remote_code_model: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(str(remote_code_model))
    assert type(load_tokenizer(str(remote_code_model), trust_remote_code=True)).__name__ == "KubetuneTestTokenizer"


def test_unsloth_data_tokenizer_follows_trust_remote_code(remote_code_model: Path, task_data: Path) -> None:
    tokenizer = arguments.data_tokenizer(_section(True), str(remote_code_model))
    assert type(tokenizer).__name__ == "KubetuneTestTokenizer"
    data = load_sft_data(_section(True), str(task_data), None, tokenizer)
    assert len(data.train) > 0
    with pytest.raises(ValueError, match="trust_remote_code"):
        arguments.data_tokenizer(_section(False), str(remote_code_model))
    kwargs = arguments.from_pretrained_kwargs(_section(True), str(remote_code_model))
    assert kwargs["trust_remote_code"] is True
