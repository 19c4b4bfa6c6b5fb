#!/usr/bin/env bash
# Run a built image the way its pod runs it, without a container runtime (crun refuses this
# VM's hybrid cgroups; containerd is not needed): the image's root filesystem read-only
# (readOnlyRootFilesystem), fresh tmpfs on /tmp, /cache and /dev/shm (the pods' emptyDirs),
# the image's USER, environment and WORKDIR, and a network namespace with loopback only.
#
#   tools/images/check.sh [-v SRC:DST[:ro]]... [-e KEY=VALUE]... IMAGE [COMMAND...]
#
# Without COMMAND: the standard checks for a kubetune operator or trainer image. Needs root.
set -euo pipefail

main() {
  volumes=
  extra_env=()
  while [ $# -gt 0 ]; do
    case $1 in
    -v) volumes+=$2$'\n' && shift 2 ;;
    -e) extra_env+=("$2") && shift 2 ;;
    *) break ;;
    esac
  done
  [ $# -ge 1 ] || {
    echo "usage: $0 [-v SRC:DST[:ro]]... [-e KEY=VALUE]... IMAGE [COMMAND...]" >&2
    exit 2
  }
  image=$1
  shift

  if [ $# -eq 0 ]; then
    case $image in
    */operator:*)
      set -- sh -c 'kubetune --help >/dev/null && echo "kubetune --help: ok"
        python -c "import kopf, kubernetes, kubetune.handlers; print(\"operator imports: ok, kopf\", kopf.__version__)"'
      ;;
    */trainer:*)
      # unsloth first: it patches transformers, trl and peft as they import (like the trainer does).
      set -- sh -c 'python -c "import unsloth, torch, transformers, peft, trl, bitsandbytes, kubetune_trainer; \
print(\"trainer imports: ok, torch\", torch.__version__, \"unsloth\", unsloth.__version__)"
        python -m kubetune_trainer --help >/dev/null && echo "python -m kubetune_trainer --help: ok"'
      ;;
    *)
      echo "check.sh: no standard check for $image; give a COMMAND" >&2
      exit 2
      ;;
    esac
  fi

  fmt() { buildah inspect --type image --format "$1" "$image"; }
  mapfile -t env < <(fmt '{{range .OCIv1.Config.Env}}{{println .}}{{end}}')
  user=$(fmt '{{.OCIv1.Config.User}}')
  workdir=$(fmt '{{.OCIv1.Config.WorkingDir}}')

  ctr=$(buildah from --pull=never --quiet "$image")
  trap 'buildah rm "$ctr" >/dev/null' EXIT
  trap 'exit 143' TERM # run the EXIT trap when stopped too
  trap 'exit 130' INT
  root=$(buildah mount "$ctr")

  echo "check.sh: $image as user ${user:-0}, read-only root, tmpfs /tmp /cache /dev/shm, loopback only" >&2
  # Private mount, PID, UTS and network namespaces: nothing mounted here is seen outside, and the
  # throwaway container's own layer only receives the mount points for -v.
  # shellcheck disable=SC2016 # the inner bash expands its own arguments
  VOLUMES=$volumes unshare --mount --pid --net --uts --fork --propagation private bash -euo pipefail -c '
    root=$1 user=$2 workdir=$3
    shift 3
    while IFS=: read -r src dst mode; do
      if [ -n "$src" ]; then mkdir -p "$root$dst"; fi
    done <<<"$VOLUMES"
    mount --bind "$root" "$root"
    mount -o remount,bind,ro "$root"
    mount --rbind /dev "$root/dev"
    mount -t proc proc "$root/proc"
    mount -t sysfs -o ro sysfs "$root/sys"
    for dir in tmp cache dev/shm; do
      if [ -d "$root/$dir" ]; then mount -t tmpfs -o mode=1777 tmpfs "$root/$dir"; fi
    done
    while IFS=: read -r src dst mode; do
      [ -n "$src" ] || continue
      mount --bind "$src" "$root$dst"
      if [ "$mode" = ro ]; then mount -o remount,bind,ro "$root$dst"; fi
    done <<<"$VOLUMES"
    # torchrun resolves its own host name: a pod finds it in /etc/hosts, here it is localhost.
    hostname localhost
    ip link set lo up
    exec chroot --userspec="${user:-0:0}" "$root" /usr/bin/env -i -C "${workdir:-/}" "$@"
  ' check "$root" "$user" "$workdir" "${env[@]}" "${extra_env[@]}" "$@"
}

# On one line, so bash has read it before main runs: editing this file while a long check
# runs cannot change what the running check executes next.
main "$@"; exit
