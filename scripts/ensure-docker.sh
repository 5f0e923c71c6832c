#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine.
#
#   - `docker info` already works        -> exit 0, no output
#   - engine missing and we are root     -> apt-get install docker.io (Debian 12: engine 20.10, API 1.41)
#   - engine not running and we are root -> start dockerd detached (survives the caller, e.g. make),
#                                           log to /var/log/jobwire-dockerd.log, wait up to 60 s
#   - not root and no working engine     -> one-line error, exit 1
#
# Idempotent; concurrent calls serialise on a lock file and never start a second dockerd.
# The `docker` CLI is only used for `docker info`; a newer client (e.g. 28.x in /usr/local/bin)
# negotiates the API version down to the 20.10 engine's 1.41 on its own.
set -euo pipefail

LOG=/var/log/jobwire-dockerd.log
PIDFILE=/var/run/docker.pid
LOCK=/var/run/jobwire-ensure-docker.lock
WAIT_SECONDS=60

say() { echo "ensure-docker: $*" >&2; }

# An explicitly pinned DOCKER_API_VERSION newer than the engine breaks `docker info`; let the
# client negotiate for our probe instead.
docker_ok() { command -v docker >/dev/null 2>&1 && env -u DOCKER_API_VERSION docker info >/dev/null 2>&1; }

docker_ok && exit 0

if [ "$(id -u)" -ne 0 ]; then
    say "no working Docker engine ('docker info' fails) and not root: start dockerd as root, or check access to /var/run/docker.sock"
    exit 1
fi

# Serialise concurrent callers: the second one waits here, then finds the engine up.
exec 9>"$LOCK"
if ! flock -w $((WAIT_SECONDS + 30)) 9; then
    say "timed out waiting for another ensure-docker run (lock $LOCK)"
    exit 1
fi

docker_ok && exit 0

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    say "installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io >/dev/null
fi

dockerd_pid() {
    # Prints the pid of a live dockerd (from the pidfile, else any dockerd process).
    local pid
    if [ -s "$PIDFILE" ]; then
        pid=$(cat "$PIDFILE" 2>/dev/null || true)
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = dockerd ]; then
            echo "$pid"
            return 0
        fi
    fi
    pgrep -x dockerd | head -n1
}

pid=$(dockerd_pid || true)
if [ -z "$pid" ]; then
    say "starting dockerd (log: $LOG)"
    # New session, cwd /, stdin from /dev/null, output to the log, every other inherited fd
    # (our lock, make's jobserver pipes, ...) closed: nothing ties dockerd to the caller.
    (
        cd /
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        exec setsid nohup dockerd --pidfile "$PIDFILE" >>"$LOG" 2>&1 </dev/null
    ) &
    pid=$!
fi

for _ in $(seq $((WAIT_SECONDS * 4))); do
    docker_ok && exit 0
    if ! kill -0 "$pid" 2>/dev/null && [ -z "$(dockerd_pid || true)" ]; then
        break  # dockerd died
    fi
    sleep 0.25
done

say "Docker engine did not come up within ${WAIT_SECONDS}s; last lines of $LOG:"
tail -n 30 "$LOG" >&2 || true
exit 1
