#!/usr/bin/env bash
# Build (or reuse) the Kubernetes binaries used by tests/e2e and scripts/cluster.sh:
#   kube-apiserver, kube-controller-manager, kube-scheduler,
#   kubelet, kube-proxy, kubectl                      (k8s.io/kubernetes, this module)
#   etcd                                              (go.etcd.io/etcd/server/v3, this module)
#   helm                                              (helm.sh/helm/v4, module ./helm)
#
# Output: the bin dir on stdout (one line); build logs go to stderr.
# Cache:  ${KUBETUNE_CP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/controlplane}/<k8s version>-<hash>/
#         <hash> covers go.mod/go.sum of both modules and this script, so any
#         change rebuilds into a new dir. A dir is complete when all binaries
#         and the `.complete` marker (written last) exist; then nothing is built
#         and Go is not needed at all.
# Needs:  Go >= 1.26 (GOTOOLCHAIN=local: never downloads a toolchain) and the Go
#         module proxy (or a filled GOMODCACHE). Cold build: see docs/testing.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd helm)

# CI may run without HOME; Go (GOCACHE, GOMODCACHE) and the cache path below need it.
if [ -z "${HOME:-}" ]; then
  HOME=$(getent passwd "$(id -u)" | cut -d: -f6)
  export HOME
fi

log() { printf 'controlplane/build.sh: %s\n' "$*" >&2; }

modver() { # modver <go.mod> <module path>: the required version, without Go
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' "$1"
}

KVER=$(modver "$here/go.mod" k8s.io/kubernetes)      # v1.37.2
HELM_VER=$(modver "$here/helm/go.mod" helm.sh/helm/v4) # v4.3.1
[[ $KVER =~ ^v1\.([0-9]+)\.[0-9]+$ ]] || { log "cannot read k8s.io/kubernetes version from go.mod"; exit 2; }
KMINOR=${BASH_REMATCH[1]}
HASH=$(cat "$here/go.mod" "$here/go.sum" "$here/helm/go.mod" "$here/helm/go.sum" "$here/build.sh" |
       sha256sum | cut -c1-12)
CACHE_ROOT=${KUBETUNE_CP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/controlplane}
OUT=$CACHE_ROOT/${KVER#v}-$HASH

complete() {
  [ -f "$OUT/.complete" ] || return 1
  local b
  for b in "${BINARIES[@]}"; do [ -x "$OUT/$b" ] || return 1; done
}

if complete; then
  touch "$OUT/.complete" 2>/dev/null || true # mark as recently used, for the pruning below
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE_ROOT"
# Serialize concurrent builds (two test runs starting at once) on one lock.
exec 9>"$CACHE_ROOT/.lock"
flock 9
if complete; then # another process finished it while we waited
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    PATH=$PATH:/usr/local/go/bin
  else
    log "Go not found. Install Go >= 1.26 (https://go.dev/dl) and put it on PATH, then run:"
    log "  bash tools/controlplane/build.sh"
    exit 3
  fi
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
log "building Kubernetes $KVER, etcd, helm $HELM_VER into $OUT ($(go version))"
log "a cold build takes about 7-10 min on 2 cores (plus module downloads); later runs reuse the cache"
rm -f "$OUT/.complete"
mkdir -p "$OUT"
start=$SECONDS

V=k8s.io/component-base/version
KLDF="-s -w -X $V.gitVersion=$KVER -X $V.gitMajor=1 -X $V.gitMinor=$KMINOR -X $V.gitTreeState=clean"
KLDF="$KLDF -X $V.buildDate=1970-01-01T00:00:00Z"
(
  cd "$here"
  # One `go build` for all of them: shared packages are compiled once.
  go build -trimpath -pgo=off -ldflags "$KLDF" -o "$OUT/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl
  log "kubernetes binaries done after $((SECONDS - start)) s"
  go build -trimpath -pgo=off -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
  log "etcd done after $((SECONDS - start)) s"
) >&2
(
  cd "$here/helm"
  go build -trimpath -pgo=off \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VER -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
    -o "$OUT/helm" helm.sh/helm/v4/cmd/helm
  log "helm done after $((SECONDS - start)) s"
) >&2

got=$("$OUT/kube-apiserver" --version)
if [ "$got" != "Kubernetes $KVER" ]; then
  log "unexpected kube-apiserver --version: '$got' (want 'Kubernetes $KVER')"
  exit 4
fi
log "$got; $("$OUT/etcd" --version | head -1); $("$OUT/helm" version --short)"
touch "$OUT/.complete"
# Keep the 3 most recently used builds (~380 MB each); drop older ones and broken ones.
for d in "$CACHE_ROOT"/*/; do
  d=${d%/}
  [ "$d" = "$OUT" ] || [ -f "$d/.complete" ] || { log "removing incomplete $d"; rm -rf "$d"; }
done
ls -1dt "$CACHE_ROOT"/*/.complete 2>/dev/null | tail -n +4 | while read -r m; do
  log "removing old build ${m%/.complete}"
  rm -rf "${m%/.complete}"
done
log "build complete in $((SECONDS - start)) s: $OUT"
echo "$OUT"
