"""Names of a job's children and of its output Model: the one place they are made.

Rendering names the children with these, and the operator finds them again with these
(after a restart it reads the workload by name), so a rule changed here changes both.

A job name is a DNS-1123 label of at most 63 characters, unique in its namespace. Each
child name must be valid for the object that carries it and unique per job:

- ServiceAccount, Role, RoleBinding, ConfigMap, PersistentVolumeClaim and the output Model
  take DNS-1123 subdomains (at most 253 characters), so `<job>-<suffix>` always fits and is
  unique because the job name is.
- The workload (PyTorchJob or batch Job) is stricter. The training-operator requires a
  DNS-1035 label (letter first) and names a Service and a pod after each replica,
  `<workload>-master-0` and `<workload>-worker-<i>`, which must fit in 63 characters; a
  batch Job's name goes into its pods' `job-name` label (at most 63). Where `<job>-train`
  breaks these rules (a job name of more than 45 characters, or one starting with a digit)
  the name is cut and carries a short hash of the whole job name, so two jobs whose names
  differ only past the cut still get different workloads: `<head>-<hash>-train`, with
  `kt-` in front of a digit-first name.

Were two jobs still to meet on a name, the operator refuses to adopt a child another job
owns (it checks the owner reference), so a collision is an error, never a takeover.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kubetune.api.common import DNS1035_LABEL_PATTERN, MAX_NAME_LENGTH, MAX_NODES

# Worker replica indices go up to MAX_NODES - 2 (the master is node 0).
REPLICA_SUFFIX = f"-worker-{MAX_NODES - 2}"
"""The longest suffix the training-operator adds to the workload's name (Services, pods)."""
MAX_WORKLOAD_LENGTH = MAX_NAME_LENGTH - len(REPLICA_SUFFIX)
HASH_LENGTH = 8
DIGIT_FIRST_PREFIX = "kt-"


def name_hash(job: str) -> str:
    """A short, stable hash of a job name (hex: 8 characters, 32 bits)."""
    return hashlib.sha256(job.encode("utf-8")).hexdigest()[:HASH_LENGTH]


def child_name(job: str, suffix: str) -> str:
    """`<job>-<suffix>`: a DNS-1123 subdomain (at most 63 + 1 + len(suffix) characters)."""
    return f"{job}-{suffix}"


def workload_name(job: str, suffix: str = "train") -> str:
    """The PyTorchJob / batch Job name: a DNS-1035 label of at most MAX_WORKLOAD_LENGTH characters."""
    plain = f"{job}-{suffix}"
    if len(plain) <= MAX_WORKLOAD_LENGTH and re.fullmatch(DNS1035_LABEL_PATTERN, plain):
        return plain
    prefix = "" if job[:1].isalpha() else DIGIT_FIRST_PREFIX
    room = MAX_WORKLOAD_LENGTH - len(prefix) - HASH_LENGTH - len(suffix) - 2
    head = job[:room].rstrip("-")
    return f"{prefix}{head}-{name_hash(job)}-{suffix}"


def default_output_name(job: str) -> str:
    """The output Model's name when the job gives none: `<job>-output` (a DNS-1123 subdomain)."""
    return child_name(job, "output")


@dataclass(frozen=True)
class ChildNames:
    """Deterministic names of a job's children (see the module docstring for the rules)."""

    job: str

    @property
    def config_map(self) -> str:
        return child_name(self.job, "config")

    @property
    def service_account(self) -> str:
        return child_name(self.job, "trainer")

    @property
    def role(self) -> str:
        """The Role and its RoleBinding (different kinds may share a name)."""
        return child_name(self.job, "progress")

    @property
    def output_claim(self) -> str:
        return child_name(self.job, "output")

    @property
    def workload(self) -> str:
        """The PyTorchJob or Job; pods (and the training-operator's Services) are named after it."""
        return workload_name(self.job)
