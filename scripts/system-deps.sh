#!/usr/bin/env bash
# Install the Debian packages the test cluster needs, when any is missing:
#   buildah, debootstrap         build the images (no Docker engine, no registry)
#   containernetworking-plugins  the CNI plugins (bridge, host-local, loopback, portmap)
#   libseccomp-dev, pkg-config   runc's seccomp support (built from source, cgo)
#   iptables, conntrack          kube-proxy's Service routing
#   busybox-static               the training-operator's worker init container (sh, nslookup)
# Idempotent and quiet when everything is there.
set -euo pipefail
PACKAGES=(buildah debootstrap containernetworking-plugins libseccomp-dev pkg-config gcc iptables conntrack busybox-static)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing Debian packages: ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
