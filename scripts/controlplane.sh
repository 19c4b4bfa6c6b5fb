#!/usr/bin/env bash
# Debug session: run the e2e control plane (etcd, kube-apiserver, kube-controller-manager)
# in the foreground until Ctrl-C, and print the KUBECONFIG to use from another shell.
#   scripts/controlplane.sh up [--workdir DIR] [--crds]
# Binaries: $KUBETUNE_CP_BIN, else tools/controlplane/build.sh (cached; cold ~15-20 min).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" -m tests.e2e.controlplane "$@"
