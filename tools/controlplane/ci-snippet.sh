# Lines for .ci/run (source this file from the repo root, or paste them):
# build the e2e control plane once per machine and reuse it afterwards.
#
# - Cache: ~/.cache/kubetune/controlplane/<k8s version>-<hash>/ is outside the clone, so a
#   fresh CI clone on the same machine reuses it (build.sh then takes < 0.1 s).
# - Cold, on a new machine: measured 16.6 min with all modules to download, on a machine
#   busy with other jobs (7 min with modules already downloaded, idle). Disk: GOMODCACHE
#   ~1.1 GB, GOCACHE ~4.8 GB, binaries ~380 MB. `timeout` keeps a stuck build from
#   eating the whole 90-min CI budget.
# - GOTOOLCHAIN=local: never download a Go toolchain; Go >= 1.26 must be installed
#   (build.sh also looks in /usr/local/go/bin).
export GOTOOLCHAIN=local
KUBETUNE_CP_BIN=$(timeout 40m bash tools/controlplane/build.sh)
export KUBETUNE_CP_BIN
