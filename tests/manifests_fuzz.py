"""Hypothesis strategies: the example manifests, mutated the ways users (and attackers) break them.

Shared by the property tests of `kubetune validate` (tests/cli) and of the admission webhook
(tests/handlers). Every manifest starts as a document of `examples/` and gets one to three
mutations: a value replaced by any JSON value (wrong types, lists or mappings where a scalar
goes, huge and negative numbers, unicode), a key removed, an unknown key added, or a value
wrapped in a list or a mapping. Whole random documents are mixed in too.

The profile is fixed (derandomized, no example database), so a run is reproducible and a
failure reproduces on the next run; KUBETUNE_FUZZ_EXAMPLES changes the number of examples.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kubetune.cli.documents import KubeYamlLoader

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_DOCUMENTS: list[dict[str, Any]] = [
    body
    for path in sorted(EXAMPLES.glob("*.yaml"))
    for body in yaml.load_all(path.read_text(encoding="utf-8"), Loader=KubeYamlLoader)
    if isinstance(body, dict)
]
EXAMPLE_JOBS = [body for body in EXAMPLE_DOCUMENTS if body.get("kind") == "CustomizationJob"]
EXAMPLE_OBJECTS = [body for body in EXAMPLE_DOCUMENTS if body.get("kind") in ("Model", "FileSet")]

FUZZ_EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "10000"))

settings.register_profile(
    "kubetune-fuzz",
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SETTINGS = settings.get_profile("kubetune-fuzz")

# Words a user might type where the schema expects something else: enum values of the
# other backend, field names of the other backend, names with dots and unicode.
_WORDS = st.sampled_from(
    [
        "lora",
        "all_weights",
        "distillation",
        "sft",
        "merged_16bit",
        "per_device_train_batch_size",
        "llama-3.1-8b-instruct",
        "team-a/qwen3-1-7b",
        "/",
        "/var/run/containerd/containerd.sock",
        "hf://org/name",
        "ünïcødé-✓",
        "",
        "5e-6",
        "1e400",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30]),
    st.text(max_size=40),
    _WORDS,
)


def json_values(*, finite: bool) -> st.SearchStrategy[Any]:
    """Any JSON value, nested two deep; `finite` leaves out NaN and infinities (JSON on the
    wire has none). Not `st.recursive`: its retries made generation most of the run time."""
    scalars = st.one_of(_SCALARS, st.floats(allow_nan=not finite, allow_infinity=not finite))
    keys = st.one_of(_WORDS, st.text(max_size=12))
    flat = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(keys, scalars, max_size=3))
    return st.one_of(scalars, flat, st.lists(flat, max_size=2), st.dictionaries(keys, flat, max_size=2))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    node = root
    for part in path[:-1]:
        node = node[part]
    return node


@st.composite
def mutated(draw: st.DrawFn, bases: list[dict[str, Any]], *, finite: bool = False) -> Any:
    """One of `bases` with one to three mutations (or, now and then, any JSON value at all)."""
    values = json_values(finite=finite)
    if draw(st.integers(0, 19)) == 0:
        return draw(values)
    document: Any = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(document))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap"]))
        if not path:
            if action == "replace":
                document = draw(values)
            continue
        parent = _parent(document, path)
        leaf = path[-1]
        if action == "replace":
            parent[leaf] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[leaf]
        elif action == "add" and isinstance(parent[leaf], dict):
            parent[leaf][draw(st.one_of(_WORDS, st.text(max_size=12)))] = draw(values)
        elif action == "wrap":
            parent[leaf] = draw(st.sampled_from([[parent[leaf]], {"value": parent[leaf]}]))
    return document
