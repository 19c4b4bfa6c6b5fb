#!/usr/bin/env bash
# Build kubetune's container images with buildah: no Docker engine, no registry needed.
#
#   tools/images/build.sh base|trainer|operator|all    build (cached); stdout: one image ref per line
#   tools/images/build.sh archive IMAGE FILE            write IMAGE as a docker-archive, for
#                                                       `ctr -n k8s.io images import FILE`
# All progress goes to stderr. See docs/images.md.
#
# Environment: BASE (a base image to use instead of the stand-in, e.g. the official
# python:3.11.14-slim-bookworm where a registry is reachable), CA_BUNDLE (mounted into RUN
# steps so pip and apt trust an intercepting proxy; never baked into an image), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE_REF=localhost/kubetune/base:bookworm-py311
# python3-venv: the Dockerfiles make a venv; python-is-python3: they run `python`;
# netbase, tzdata: present in the official image, read by sockets and time zone code.
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
KEEP=2 # tags kept per image in buildah's storage: the current one and the previous one

log() { printf '[images %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Removed on exit, so a build stopped half-way leaves no working container or ticker behind.
containers=()
ticker=
partial=
# shellcheck disable=SC2317 # run by the traps below
cleanup() {
  [ -z "$ticker" ] || kill "$ticker" 2>/dev/null || true
  [ -z "$partial" ] || rm -f "$partial"
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
trap 'exit 143' TERM # run cleanup when stopped too
trap 'exit 130' INT

# Multi-GB layer commits and archive writes print nothing for minutes: say it is alive.
# The ticker takes its sleep down with it: a leftover sleep would hold stdout open, and
# `build.sh ... | while read` would wait for it.
tick() {
  local what=$1 start
  start=$(date +%s)
  trap 'kill $! 2>/dev/null; exit' TERM
  while :; do
    sleep 60 &
    wait $!
    log "$what: still working ($(($(date +%s) - start)) s)"
  done
}
start_ticker() {
  tick "$1" >&2 &
  ticker=$!
}
stop_ticker() {
  kill "$ticker" 2>/dev/null || true
  ticker=
}

# RUN steps and `buildah run` in a chroot (with namespaces), not through an OCI runtime: no
# runc/crun to install, and crun refuses this VM's hybrid cgroup v1/v2 layout.
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

require() {
  command -v buildah >/dev/null || die "buildah not found: apt-get install buildah debootstrap"
}

label() { buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

# Everything the base is made from (the settings, build_base's own text, the script it runs
# inside the rootfs); a change rebuilds it (and, through FROM, every image layer).
base_inputs() {
  { echo "$MIRROR $BASE_PACKAGES"; declare -f build_base; cat tools/images/base-rootfs.sh; } | sha256sum | cut -c1-16
}

# The stand-in for python:3.11-slim-bookworm: no registry is reachable here, but Debian's
# archive is, and bookworm's python3 is 3.11 like the official image.
build_base() {
  local want ctr mnt t0=$SECONDS
  want=$(base_inputs)
  if [ "$(label "$BASE_REF" io.kubetune.base.inputs)" = "$want" ]; then
    log "base: $BASE_REF is current (inputs $want)"
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install buildah debootstrap"
  [ "$(id -u)" = 0 ] || die "building the base runs debootstrap, which needs root"
  log "base: debootstrap bookworm minbase + $BASE_PACKAGES from $MIRROR (about 2 min)"
  ctr=$(buildah from scratch)
  containers+=("$ctr")
  mnt=$(buildah mount "$ctr")
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$mnt" "$MIRROR" >&2
  buildah umount "$ctr" >/dev/null
  log "base: slim excludes, apt sources, security updates"
  buildah run --network host "$ctr" -- sh -c "$(cat tools/images/base-rootfs.sh)" base-rootfs "$MIRROR" >&2
  # debootstrap copied this host's name and resolver; a container runtime provides its own.
  mnt=$(buildah mount "$ctr")
  rm -f "$mnt/etc/hostname" "$mnt/etc/resolv.conf"
  buildah umount "$ctr" >/dev/null
  # As the official image: PATH (a scratch image has none, and the Dockerfiles extend it),
  # UTF-8 locale, `python3` as the default command.
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' \
    --label io.kubetune.base.inputs="$want" \
    --label org.opencontainers.image.description="Debian bookworm + python3 (3.11): stand-in for python:3.11-slim-bookworm" \
    "$ctr"
  buildah commit --rm --quiet "$ctr" "$BASE_REF" >/dev/null
  log "base: $BASE_REF built in $((SECONDS - t0)) s, $(buildah images --format '{{.Size}}' "$BASE_REF")"
}

# Build Dockerfile.<name> with the layer cache, tag it by its image ID (each distinct build
# gets a distinct tag, so a node never runs a stale image under a reused tag).
build_image() {
  local name=$1 base=${BASE:-$BASE_REF} iid id ref t0=$SECONDS
  [ -n "${BASE:-}" ] || build_base
  [ -r "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE not readable (set CA_BUNDLE)"
  log "$name: buildah bud --layers -f Dockerfile.$name, base $base (cold: minutes; cached layers: seconds)"
  iid=$(mktemp)
  start_ticker "$name build"
  # The CA bundle is a volume, not a COPY: RUN steps trust the proxy, the image does not
  # contain it, and the layer cache does not depend on it. --force-rm: a failed RUN's
  # container (GBs for the trainer's pip install) is removed too.
  buildah bud --layers --force-rm --network host --build-arg BASE="$base" \
    --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
    --iidfile "$iid" -f "Dockerfile.$name" . >&2
  stop_ticker
  id=$(sed 's/^sha256://' "$iid")
  rm -f "$iid"
  ref=localhost/kubetune/$name:${id:0:12}
  buildah tag "$id" "$ref"
  log "$name: $ref built in $((SECONDS - t0)) s, $(buildah images --format '{{.Size}}' "$ref")"

  echo "$ref"
}

# Write image $1 as a docker-archive to $2, for `ctr images import`: only when a node lacks
# the image (the trainer's archive is 7 GB; the node deletes it after the import).
write_archive() {
  local ref=$1 archive=$2 need free t0=$SECONDS
  buildah inspect --type image "$ref" >/dev/null 2>&1 || die "no image $ref in buildah's storage: build it first"
  mkdir -p "$(dirname "$archive")"
  # buildah stages each layer in /var/tmp while writing, so a write needs twice the image
  # free. Refuse rather than fill the disk that the node's containerd and kubelet live on.
  need=$(($(buildah images --format '{{.Size}}' "$ref" | to_bytes) * 2))
  free=$(df --output=avail -B1 "$(dirname "$archive")" | tail -1)
  [ "$free" -ge "$need" ] ||
    die "writing $archive needs about $((need / 1000000)) MB free, $((free / 1000000)) MB left (old images in containerd or buildah?)"
  log "writing docker-archive $archive of $ref"
  start_ticker "$ref archive"
  # Written under a temporary name, so that an existing archive is always a complete one.
  partial=$archive.$$.part
  buildah push --quiet "$ref" "docker-archive:$partial:$ref" >&2
  mv "$partial" "$archive"
  partial=
  stop_ticker
  log "archive written in $((SECONDS - t0)) s, $(du -h "$archive" | cut -f1)"
  echo "$archive"
}

# Keep the newest $2 tags of localhost/kubetune/$1 in buildah's storage (older ones only
# hold their own small layers; the shared dependency layer stays while one tag uses it).
prune_tags() {
  # "<created>|<name:tag>" sorts newest first by its timestamp prefix.
  buildah images --noheading --filter "reference=localhost/kubetune/$1" --format '{{.CreatedAtRaw}}|{{.Name}}:{{.Tag}}' |
    sort -r | tail -n +$(($2 + 1)) | while IFS='|' read -r _ old; do
      log "$1: removing old image $old"
      buildah rmi "$old" >/dev/null 2>&1 || true
    done
}

# "7.15 GB" (buildah's sizes are decimal) -> bytes; %.0f, as mawk's %d stops at 2^31.
to_bytes() { awk '{ m = $2 == "GB" ? 1e9 : $2 == "MB" ? 1e6 : $2 == "kB" ? 1e3 : 1; printf "%.0f\n", $1 * m }'; }

main() {
  require
  case ${1:-} in
  base) build_base ;;
  trainer | operator) build_image "$1" && prune_tags "$1" "$KEEP" ;;
  all)
    [ -n "${BASE:-}" ] || build_base
    build_image trainer && prune_tags trainer "$KEEP"
    build_image operator && prune_tags operator "$KEEP"
    ;;
  archive)
    [ $# -eq 3 ] || { echo "usage: $0 archive IMAGE FILE" >&2; exit 2; }
    write_archive "$2" "$3"
    ;;
  *)
    echo "usage: $0 base|trainer|operator|all | archive IMAGE FILE" >&2
    exit 2
    ;;
  esac
}

# On one line, so bash has read it before main runs: editing this file during a long build
# cannot change what the running build executes next.
main "$@"; exit
