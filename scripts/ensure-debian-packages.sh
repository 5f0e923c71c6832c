#!/usr/bin/env bash
# Make sure Debian packages that the tests use are installed: COMMAND=PACKAGE pairs.
#
#   scripts/ensure-debian-packages.sh chromium=chromium protoc-gen-swagger=golang-grpc-gateway
#
#   - every COMMAND already on PATH -> exit 0, no output
#   - some missing and we are root  -> apt-get install their packages (waiting for dpkg's lock,
#                                      which other agents or CI steps may hold)
#   - some missing and not root     -> one-line error, exit 1
#
# Idempotent; concurrent callers serialise on a lock file.
set -euo pipefail

LOCK=/var/run/jobwire-ensure-debian-packages.lock
say() { echo "ensure-debian-packages: $*" >&2; }

missing() {
    local pair packages=()
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null 2>&1 || packages+=("${pair#*=}")
    done
    echo "${packages[@]:-}"
}

packages=$(missing "$@")
[ -z "$packages" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    say "missing Debian packages: $packages (run as root, or apt-get install them)"
    exit 1
fi

exec 9>"$LOCK"
flock -w 900 9 || { say "timed out waiting for another run (lock $LOCK)"; exit 1; }
packages=$(missing "$@")
[ -z "$packages" ] && exit 0

say "installing $packages"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
# shellcheck disable=SC2086
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $packages >/dev/null
