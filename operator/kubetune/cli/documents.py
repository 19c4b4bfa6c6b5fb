"""Read multi-document YAML the way Kubernetes does.

PyYAML implements YAML 1.1, where `5e-6` (no dot) is a string; Kubernetes reads YAML as
JSON numbers (YAML 1.2 core schema), so `learning_rate: 5e-6` is a number there. This
loader resolves floats the YAML 1.2 way so that `kubetune validate` agrees with
`kubectl apply`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_YAML12_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class KubeYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`5e-6`, `1E3` are numbers)."""


# Replace the YAML 1.1 float resolver with the 1.2 one (ints still win: they resolve first).
KubeYamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
KubeYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


class DocumentError(Exception):
    """A file that cannot be read or parsed; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    source: str
    """Where it came from: `file` or `file#N` (N = 1-based document index)."""
    body: Any


def load_text(text: str, source: str = "<input>") -> list[Document]:
    try:
        bodies = [body for body in yaml.load_all(text, Loader=KubeYamlLoader) if body is not None]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise DocumentError(f"{where}: invalid YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise DocumentError(f"{source}: invalid YAML: {error}") from None
    if len(bodies) == 1:
        return [Document(source, bodies[0])]
    return [Document(f"{source}#{index}", body) for index, body in enumerate(bodies, start=1)]


def load_files(paths: list[str]) -> list[Document]:
    documents: list[Document] = []
    for name in paths:
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DocumentError(f"{name}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise DocumentError(f"{name}: cannot read: {error}") from None
        documents.extend(load_text(text, name))
    return documents
