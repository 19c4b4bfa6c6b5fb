#!/usr/bin/env bash
# Regenerate go.mod/go.sum of the control-plane wrapper module.
#
# k8s.io/kubernetes cannot be built with `go install pkg@version`: its go.mod
# replaces every staging module (k8s.io/api, k8s.io/apiserver, ...) with
# ./staging/src/... and requires them at v0.0.0, which no proxy serves. Replace
# directives of a dependency are ignored, so this wrapper (the main module)
# supplies one `replace k8s.io/X => k8s.io/X v0.<minor>.<patch>` per staging
# module, read from the real k8s.io/kubernetes go.mod.
#
# Usage: KVER=1.37.2 bash tools/controlplane/gen-gomod.sh   (then commit go.mod, go.sum)
set -euo pipefail
KVER=${KVER:-1.37.2}
SVER=0.${KVER#1.}                      # 1.37.2 -> 0.37.2
ETCD_VER=${ETCD_VER:-}                 # empty: the version k8s.io/apiserver requires
cd "$(dirname "$0")"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
KMOD=$(cd "$tmp" && go mod download -json "k8s.io/kubernetes@v$KVER" |
       python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
echo "k8s.io/kubernetes v$KVER go.mod: $KMOD" >&2
grep -E '^(go|toolchain|godebug) ' "$KMOD" >&2 || true

printf 'module kubetune.local/tools/controlplane\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes v%s\n' "$KVER" > go.mod
rm -f go.sum
n=0
while read -r m; do
  go mod edit -replace "$m=$m@v$SVER"
  n=$((n + 1))
done < <(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$KMOD")
echo "staging replaces: $n" >&2
if [ -n "$ETCD_VER" ]; then
  go mod edit -require "go.etcd.io/etcd/server/v3@$ETCD_VER"
fi
go mod tidy >&2                        # the real "is every module served?" test
grep -E '^go ' go.mod >&2
go list -m k8s.io/kubernetes go.etcd.io/etcd/server/v3 >&2
