"""Names vulture counts as unused that a library calls or reads (scripts/test.sh runs vulture).

Each line is an attribute access vulture reads as a use; each group says who uses the names.
Add a name here only when a library, not our code, is its reader.
"""

# ruff: noqa: B018  (bare expressions are the point: vulture reads them as uses)
from types import SimpleNamespace

_ = SimpleNamespace()

# kopf reads its settings after the startup handler sets them (handlers/operator.py).
_.finalizer
_.diffbase_storage
_.progress_storage
_.level
_.server_timeout
_.lifetime
_.max_workers
_.worker_limit
_.idle_timeout

# transformers calls TrainerCallback hooks and reads TrainerControl flags
# (backends/unsloth/callbacks.py, bench/trainer_throughput.py).
_.on_train_begin
_.on_train_end
_.on_step_begin
_.on_log
_.on_save
_.should_save
_.should_training_stop

# transformers reads model config and tokenizer attributes we set.
_.use_cache
_.tie_word_embeddings
_.eos_token
_.pad_token
_.clean_up_tokenization_spaces

# The tokenizers library reads a tokenizer's pipeline stages (tests/fixtures/tiny_models.py).
_.pre_tokenizer
_.post_processor

# torch prints it in a module's repr (parallel/experts.py).
_.extra_repr

# tarfile writes a symlink's target from it (tests/e2e/images.py).
_.linkname

# The kubernetes client's Configuration reads it (tests/e2e/test_controlplane.py).
_.ssl_ca_cert

# Read by a test through a subprocess's JSON (tests/e2e/test_progress.py).
_.failures
