#!/usr/bin/env bash
# Build the local test images jobwire needs, without any container registry:
#
#   jobwire/busybox:latest  FROM scratch + Debian's static busybox (tiny, ~1 s to build)
#   jobwire/python:3.11     Debian bookworm python3.11 and its libraries, unpacked from .debs
#                           with dpkg-deb and turned into an image with `docker import`
#
# An image is rebuilt only when its tag is missing or its label io.jobwire.image-version differs
# from IMAGE_VERSION below: bump IMAGE_VERSION to force a rebuild. Downloaded .debs are cached in
# ${XDG_CACHE_HOME:-$HOME/.cache}/jobwire/debs. Both images are smoke-tested at the end.
#
# Needs a running Docker engine (see scripts/ensure-docker.sh) and Debian/apt; installing
# busybox-static or running `apt-get update` needs root.
set -euo pipefail

IMAGE_VERSION=1
LABEL_KEY=io.jobwire.image-version
BUSYBOX_IMAGE=jobwire/busybox:latest
PYTHON_IMAGE=jobwire/python:3.11
DEB_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/jobwire/debs"

# Debian 12 packages for a working python3.11 (checked with ldd on the interpreter and on every
# lib-dynload/*.so, plus glibc's runtime dlopen of libgcc_s for thread cancellation).
PYTHON_DEBS=(
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11
    libc6 libgcc-s1 libcrypt1 zlib1g libexpat1 libssl3 libffi8 libsqlite3-0
    libbz2-1.0 liblzma5 libreadline8 libncursesw6 libtinfo6 libuuid1 libdb5.3
    libnsl2 libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3
    libkrb5support0 libcom-err2 libkeyutils1
    media-types tzdata ca-certificates netbase dash busybox-static
)

# The legacy builder is all the Debian 20.10 engine offers without buildx.
export DOCKER_BUILDKIT=0

die() { echo "build-images: $*" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobwire-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# run LOGNAME CMD...: run quietly; on failure show the captured output and stop.
run() {
    local log="$WORK/$1.log"; shift
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        die "failed: $*"
    fi
}

is_root() { [ "$(id -u)" -eq 0 ]; }

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    is_root || die "apt-get update needed but not root"
    run apt-update env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
}

image_up_to_date() {
    local got
    got=$(docker image inspect -f "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$1" 2>/dev/null) || return 1
    [ "$got" = "$IMAGE_VERSION" ]
}

host_busybox() {
    if [ ! -x /bin/busybox ] || ! dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
        is_root || die "busybox-static is not installed and not root (apt-get install busybox-static)"
        apt_update_once
        run apt-install env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static
    fi
    echo /bin/busybox
}

write_etc() {  # write_etc ROOTDIR: /etc/passwd, /etc/group, /tmp
    mkdir -p "$1/etc" "$1/root"
    mkdir -p "$1/tmp"
    chmod 1777 "$1/tmp"
    cat >"$1/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$1/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nobody:x:65534:
EOF
}

build_busybox() {
    local ctx="$WORK/busybox-ctx"
    mkdir -p "$ctx/rootfs"
    install -m 0755 "$(host_busybox)" "$ctx/busybox"
    write_etc "$ctx/rootfs"
    rmdir "$ctx/rootfs/root"  # recreated below with its own mode
    mkdir -m 0700 "$ctx/rootfs/root"
    cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox","--install","-s","/bin"]
COPY rootfs/ /
LABEL $LABEL_KEY=$IMAGE_VERSION
CMD ["sh"]
EOF
    run busybox-build docker build --no-cache --force-rm -t "$BUSYBOX_IMAGE" "$ctx"
}

fetch_debs() {  # prints the cached .deb paths, downloading only what is missing or corrupt
    mkdir -p "$DEB_CACHE"
    local uris="$WORK/uris" _uri file size hash missing=()
    if ! apt-get download --print-uris "${PYTHON_DEBS[@]}" >"$uris" 2>"$WORK/uris.err"; then
        apt_update_once
        apt-get download --print-uris "${PYTHON_DEBS[@]}" >"$uris" 2>"$WORK/uris.err" \
            || { cat "$WORK/uris.err" >&2; die "apt-get download --print-uris failed"; }
    fi
    [ "$(wc -l <"$uris")" -eq "${#PYTHON_DEBS[@]}" ] \
        || { cat "$uris" "$WORK/uris.err" >&2; die "could not resolve all ${#PYTHON_DEBS[@]} packages"; }
    # lines look like: 'http://…/dash_0.5.12-2_amd64.deb' dash_0.5.12-2_amd64.deb 100448 SHA256:…
    deb_ok() {  # deb_ok FILE SIZE HASH: cached file complete and matching apt's checksum
        [ -f "$DEB_CACHE/$1" ] && [ "$(stat -c %s "$DEB_CACHE/$1")" = "$2" ] || return 1
        [ "${3%%:*}" != SHA256 ] || [ "$(sha256sum <"$DEB_CACHE/$1" | cut -d' ' -f1)" = "${3#SHA256:}" ]
    }
    while read -r _uri file size hash; do
        if ! deb_ok "$file" "$size" "$hash"; then
            rm -f "$DEB_CACHE/$file"
            missing+=("${file%%_*}")
        fi
    done <"$uris"
    if [ ${#missing[@]} -gt 0 ]; then
        # apt only downloads the candidate version, i.e. exactly the files listed above.
        (cd "$DEB_CACHE" && apt-get download "${missing[@]}") >"$WORK/download.log" 2>&1 \
            || { cat "$WORK/download.log" >&2; die "apt-get download failed"; }
    fi
    # Drop superseded versions so the cache does not grow with every Debian point release.
    local f
    for f in "$DEB_CACHE"/*.deb; do
        [ -e "$f" ] || continue
        cut -d' ' -f2 "$uris" | grep -qxF "${f##*/}" || rm -f "$f"
    done
    while read -r _uri file size hash; do
        if ! deb_ok "$file" "$size" "$hash"; then
            rm -f "$DEB_CACHE/$file"
            die "$file missing or corrupt after apt-get download"
        fi
        echo "$DEB_CACHE/$file"
    done <"$uris"
}

build_python() {
    local root="$WORK/python-root" name d
    mkdir -p "$root"
    fetch_debs >"$WORK/debs.list"
    # Unpack in parallel (the packages share only directories, so the result is the same).
    tr '\n' '\0' <"$WORK/debs.list" | xargs -0 -P "$(nproc)" -I{} dpkg-deb -x {} "$root" \
        || die "dpkg-deb -x failed"
    write_etc "$root"
    chmod 0700 "$root/root"
    ln -sfn dash "$root/bin/sh"
    ln -sfn python3.11 "$root/usr/bin/python3"
    [ -x "$root/usr/bin/python3.11" ] || die "python3.11 missing from the unpacked packages"

    # What the skipped maintainer scripts would have done: CA bundle, OpenSSL's default paths.
    mkdir -p "$root/etc/ssl/certs" "$root/usr/lib/ssl"
    find "$root/usr/share/ca-certificates" -name '*.crt' -type f | LC_ALL=C sort | xargs cat \
        >"$root/etc/ssl/certs/ca-certificates.crt"
    ln -sfn /etc/ssl/certs "$root/usr/lib/ssl/certs"
    ln -sfn /etc/ssl/certs/ca-certificates.crt "$root/usr/lib/ssl/cert.pem"

    # busybox applets for everything the packages do not provide (ls, cat, wc, sleep, echo, ...)
    mkdir -p "$root/usr/local/bin"
    for name in $("$root/bin/busybox" --list); do
        case "$name" in busybox|*/*|'['|'[[') continue ;; esac
        for d in usr/local/sbin usr/local/bin usr/sbin usr/bin sbin bin; do
            if [ -e "$root/$d/$name" ] || [ -L "$root/$d/$name" ]; then continue 2; fi
        done
        ln -s /bin/busybox "$root/usr/local/bin/$name"
    done
    for name in '[' '[['; do  # test aliases (dash has `[` as a builtin only)
        [ -e "$root/usr/bin/$name" ] || ln -s /bin/busybox "$root/usr/local/bin/$name"
    done

    # Precompile the stdlib (no postinst ran): faster interpreter start in every container.
    if is_root && command -v chroot >/dev/null 2>&1; then
        chroot "$root" /usr/bin/python3.11 -m compileall -q /usr/lib/python3.11 >"$WORK/compileall.log" 2>&1 \
            || echo "build-images: warning: precompiling the stdlib failed (image still works)" >&2
    fi

    tar -C "$root" --numeric-owner --owner=0 --group=0 -c . \
        | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change "LABEL $LABEL_KEY=$IMAGE_VERSION" \
            --change 'CMD ["python3"]' \
            - "$PYTHON_IMAGE" >"$WORK/import.log" 2>&1 \
        || { cat "$WORK/import.log" >&2; die "docker import of $PYTHON_IMAGE failed"; }
}

docker info >/dev/null 2>&1 || die "Docker engine not reachable (run scripts/ensure-docker.sh)"

ensure_image() {  # ensure_image TAG BUILD-FUNCTION
    local old
    if image_up_to_date "$1"; then
        echo "$1: up to date"
        return
    fi
    old=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
    "$2"
    echo "$1: built"
    # Drop the replaced image unless something still uses it (then docker refuses; fine).
    if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$1")" ]; then
        docker rmi "$old" >/dev/null 2>&1 || true
    fi
}

ensure_image "$BUSYBOX_IMAGE" build_busybox
ensure_image "$PYTHON_IMAGE" build_python

# Smoke tests (in parallel to keep a no-op run short).
smoke() {  # smoke NAME EXPECTED-SUBSTRING docker-run-args...
    local name=$1 want=$2; shift 2
    local out
    if ! out=$(docker run --rm "$@" 2>&1) || [[ "$out" != *"$want"* ]]; then
        printf 'build-images: smoke test %s failed: docker run --rm %s\n%s\n' "$name" "$*" "$out" >&2
        return 1
    fi
}
pids=()
smoke busybox $'ok\n2' "$BUSYBOX_IMAGE" sh -c 'echo ok && wc -l /etc/passwd' & pids+=($!)
smoke python-ssl ok "$PYTHON_IMAGE" python3 -c 'import ssl, sqlite3, json, hashlib; print("ok")' & pids+=($!)
smoke python-sh usr "$PYTHON_IMAGE" sh -c 'ls / && sleep 0' & pids+=($!)
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" = 0 ] || die "smoke tests failed"
