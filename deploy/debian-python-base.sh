#!/usr/bin/env bash
# Build a Debian base image with Python (python3, python3-venv) from Debian's packages, for
# machines that reach a Debian mirror but no container registry (where python:3.x-slim cannot be
# pulled). Then: podman build --build-arg PYTHON_IMAGE=localhost/debian-python:bookworm .
#
# Usage: deploy/debian-python-base.sh [image-name]   (default localhost/debian-python:bookworm)
# Needs mmdebstrap and podman; uses the mirror this machine's apt already uses.
set -euo pipefail
image="${1:-localhost/debian-python:bookworm}"
mirror=""
if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
mirror="${mirror:-http://deb.debian.org/debian}"
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$workdir/rootfs.tar" "$mirror"
podman import --quiet "$workdir/rootfs.tar" "$image" >/dev/null
echo "$image"
