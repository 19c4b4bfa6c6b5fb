# Lines for .ci/run (source this file from the repo root, or paste them):
# build the e2e control plane once per machine and reuse it afterwards.
#
# - Cache: ~/.cache/kubetune/controlplane/<k8s version>-<hash>/ (outside the clone, so a
#   fresh CI clone on the same machine reuses it: build.sh then takes well under 1 s).
# - Cold (new machine): about 7 min on 2 cores, plus the module downloads from the Go
#   module proxy (GOMODCACHE, ~0.8 GB). The `timeout` keeps a stuck build from eating
#   the whole 90-min CI budget.
# - GOTOOLCHAIN=local: never download a Go toolchain; Go 1.26+ must be installed
#   (build.sh also looks in /usr/local/go/bin).
export GOTOOLCHAIN=local
KUBETUNE_CP_BIN=$(timeout 40m bash tools/controlplane/build.sh)
export KUBETUNE_CP_BIN
