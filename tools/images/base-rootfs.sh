#!/bin/sh
# Runs inside the freshly debootstrapped rootfs (`buildah run`, see build.sh) to make it a
# fair stand-in for python:3.11-slim-bookworm: slim dpkg excludes, the same apt sources
# (point release, updates, security) and current security updates. Argument: the mirror.
# build.sh hashes this file: editing it rebuilds the base (and so every image layer).
set -eu
mirror=$1

# Like debian:bookworm-slim: no docs, man pages or translations, now and for packages a
# Dockerfile installs later (the trainer's gcc).
cat >/etc/dpkg/dpkg.cfg.d/slim <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
find /usr/share/doc -type f ! -name copyright -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian/*

# debootstrap wrote only "bookworm main"; the official image also follows updates and security.
rm -f /etc/apt/sources.list
cat >/etc/apt/sources.list.d/debian.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get -y upgrade
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old
