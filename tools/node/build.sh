#!/usr/bin/env bash
# Build (or reuse) the node-side binaries of the e2e test cluster, each from its own
# released source module on the Go module proxy:
#   containerd, containerd-shim-runc-v2, ctr   github.com/containerd/containerd/v2
#   runc (cgo, seccomp)                         github.com/opencontainers/runc
#   crictl                                      sigs.k8s.io/cri-tools (removes pods on stop)
#   coredns                                     github.com/coredns/coredns
#   training-operator (+ its manifests/)        github.com/kubeflow/training-operator
#   pause                                       tools/node/pause (the sandbox image's binary)
# kubelet, kube-proxy and kube-scheduler come from tools/controlplane/build.sh (same
# Kubernetes module as the API server); CNI plugins from Debian (containernetworking-plugins).
#
# Output: the bin dir on stdout (one line); build logs go to stderr.
# Cache:  ${KUBETUNE_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/node}/<hash>/, where
#         <hash> covers the versions below, this script and pause/main.go. Complete when
#         every binary and the `.complete` marker (written last) exist.
# Needs:  Go >= 1.26, gcc, pkg-config and libseccomp-dev (runc's seccomp support is cgo).
set -euo pipefail

CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.3.0          # v1.3.3's go.mod replaces into a folder its module zip lacks
COREDNS_VERSION=v1.14.7
CRICTL_VERSION=v1.37.0
TRAINING_OPERATOR_VERSION=v1.9.3

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BINARIES=(containerd containerd-shim-runc-v2 ctr runc crictl coredns training-operator pause)

if [ -z "${HOME:-}" ]; then
  HOME=$(getent passwd "$(id -u)" | cut -d: -f6)
  export HOME
fi
log() { printf 'node/build.sh: %s\n' "$*" >&2; }

HASH=$(cat "${BASH_SOURCE[0]}" "$here/pause/main.go" | sha256sum | cut -c1-12)
CACHE_ROOT=${KUBETUNE_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/node}
OUT=$CACHE_ROOT/$HASH

complete() {
  [ -f "$OUT/.complete" ] && [ -d "$OUT/training-operator-manifests" ] || return 1
  local b
  for b in "${BINARIES[@]}"; do [ -x "$OUT/$b" ] || return 1; done
}
if complete; then
  touch "$OUT/.complete" 2>/dev/null || true
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9
if complete; then
  echo "$OUT"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  [ -x /usr/local/go/bin/go ] || { log "Go not found: install Go >= 1.26 and put it on PATH"; exit 3; }
  PATH=$PATH:/usr/local/go/bin
fi
for tool in gcc pkg-config; do
  command -v "$tool" >/dev/null || { log "$tool not found: apt-get install gcc pkg-config libseccomp-dev"; exit 3; }
done
pkg-config --exists libseccomp || { log "libseccomp not found: apt-get install libseccomp-dev"; exit 3; }

export GOTOOLCHAIN=local GOFLAGS=-trimpath
log "building containerd $CONTAINERD_VERSION, runc $RUNC_VERSION, crictl $CRICTL_VERSION, coredns $COREDNS_VERSION," \
    "training-operator $TRAINING_OPERATOR_VERSION into $OUT ($(go version))"
log "a cold build takes about 10 min on 2 cores; later runs reuse the cache"
rm -rf "$OUT"
mkdir -p "$OUT"
start=$SECONDS
{
  # `go install pkg@version` builds a module exactly as released (its own go.mod and go.sum).
  CGO_ENABLED=0 GOBIN=$OUT go install -ldflags "-s -w \
    -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
  log "containerd done after $((SECONDS - start)) s"
  # Debian's runc 1.1.5 fails every pod sandbox under containerd 2; seccomp needs cgo.
  CGO_ENABLED=1 GOBIN=$OUT go install -tags seccomp -ldflags "-X main.version=${RUNC_VERSION#v}" \
    "github.com/opencontainers/runc@$RUNC_VERSION"
  log "runc done after $((SECONDS - start)) s"
  CGO_ENABLED=0 GOBIN=$OUT go install -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  CGO_ENABLED=0 GOBIN=$OUT go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  log "coredns done after $((SECONDS - start)) s"
  # The training-operator's main package lives in cmd/training-operator.v1 of a module whose
  # go.mod has replace directives, which `go install pkg@version` refuses: build it inside a
  # copy of the released module instead (the module cache is read-only).
  src=$(mktemp -d)
  trap 'chmod -R u+w "$src"; rm -rf "$src"' EXIT
  moddir=$(cd "$src" && go mod download -json "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION" |
           sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  cp -r "$moddir/." "$src/"
  chmod -R u+w "$src"
  (cd "$src" && CGO_ENABLED=0 go build -ldflags "-s -w" -o "$OUT/training-operator" ./cmd/training-operator.v1)
  cp -r "$src/manifests" "$OUT/training-operator-manifests"
  log "training-operator done after $((SECONDS - start)) s"
  CGO_ENABLED=0 go build -ldflags "-s -w" -o "$OUT/pause" "$here/pause/main.go"
} >&2

"$OUT/containerd" --version >&2
"$OUT/runc" --version | sed -n 1p >&2  # sed, not head: runc must not get SIGPIPE under pipefail
touch "$OUT/.complete"
for d in "$CACHE_ROOT"/*/; do # keep the 2 most recently used builds
  d=${d%/}
  [ "$d" = "$OUT" ] || [ -f "$d/.complete" ] || rm -rf "$d"
done
ls -1dt "$CACHE_ROOT"/*/.complete 2>/dev/null | tail -n +3 | while read -r m; do rm -rf "${m%/.complete}"; done
log "build complete in $((SECONDS - start)) s: $OUT"
echo "$OUT"
