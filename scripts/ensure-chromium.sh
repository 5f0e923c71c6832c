#!/usr/bin/env bash
# Debian's Chromium for the browser tests: playwright-core drives /usr/bin/chromium (no browser
# download is possible here). Installs the package as root when it is missing.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "ensure-chromium: /usr/bin/chromium missing and not root (apt-get install chromium)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
# One installer at a time (parallel test runs on one machine): wait for the lock, then re-check.
exec 9>/var/run/jobwire-ensure-chromium.lock
flock 9
[ -x /usr/bin/chromium ] && exit 0
if ! apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/tmp/ensure-chromium.log 2>&1; then
    apt-get update -qq >>/tmp/ensure-chromium.log 2>&1
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >>/tmp/ensure-chromium.log 2>&1 \
        || { cat /tmp/ensure-chromium.log >&2; exit 1; }
fi
/usr/bin/chromium --version
