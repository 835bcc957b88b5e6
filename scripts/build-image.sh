#!/usr/bin/env bash
# Build the example image localhost/fairu-python:1 (Debian bookworm with python3 and
# python3-numpy) in the podman store of the rootless user `fairu`, unless it is there already.
# Run as root after scripts/setup-host.sh has created that user.
#
#   scripts/build-image.sh [--force]
#
# --force rebuilds the root file system and the image. No container registry is reachable
# from fairu's hosts, so the image comes from debootstrap and `podman import`. The root file
# system is cached in $FAIRU_ROOTFS_CACHE (default /var/cache/fairu/rootfs-bookworm).
set -euo pipefail

readonly FAIRU_USER=fairu
readonly IMAGE=localhost/fairu-python:1
readonly ROOTFS="${FAIRU_ROOTFS_CACHE:-/var/cache/fairu/rootfs-bookworm}"
# This script writes this file after debootstrap succeeds, so a half-built root file system left
# by an interrupted run is rebuilt.
readonly ROOTFS_COMPLETE="$ROOTFS.complete"
readonly MIRROR="${FAIRU_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Unprivileged user that job containers run as (`--user 1000:1000`, PodmanSettings.user).
readonly RUNNER_UID=1000
readonly RUNNER_NAME=runner

log() { printf 'build-image: %s\n' "$*"; }
die() {
    printf 'build-image: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    printf 'usage: %s [--force]\n' "$0"
    printf '  --force  rebuild the cached root file system and the image %s\n' "$IMAGE"
}

force=false
while (($#)); do
    case "$1" in
    --force) force=true ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: $1"
        ;;
    esac
    shift
done

if ((EUID != 0)); then
    die "run this script as root: debootstrap needs root"
fi
if ! id -u "$FAIRU_USER" >/dev/null 2>&1; then
    die "user $FAIRU_USER not found; run scripts/setup-host.sh first"
fi
FAIRU_UID="$(id -u "$FAIRU_USER")"
FAIRU_HOME="$(getent passwd "$FAIRU_USER" | cut -d: -f6)"
RUNTIME_DIR="/run/user/$FAIRU_UID"
if [[ ! -d "$RUNTIME_DIR" ]]; then
    die "$RUNTIME_DIR not found; run scripts/setup-host.sh first"
fi

# Run podman as the fairu user, so that the image lands in that user's store.
podman_as_fairu() {
    (cd / && runuser -u "$FAIRU_USER" -- env HOME="$FAIRU_HOME" USER="$FAIRU_USER" \
        XDG_RUNTIME_DIR="$RUNTIME_DIR" PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        podman "$@")
}

print_image_id() {
    printf 'image %s: %s\n' "$IMAGE" "$(podman_as_fairu image inspect --format '{{.Id}}' "$IMAGE")"
}

if ! $force && podman_as_fairu image exists "$IMAGE"; then
    log "$IMAGE already exists (use --force to rebuild it)"
    print_image_id
    exit 0
fi

if $force || [[ ! -f "$ROOTFS_COMPLETE" ]]; then
    log "debootstrap bookworm into $ROOTFS from $MIRROR"
    rm -rf "$ROOTFS" "$ROOTFS_COMPLETE"
    install -d -m 0755 "$(dirname "$ROOTFS")"
    debootstrap --variant=minbase --include=python3,python3-numpy bookworm "$ROOTFS" "$MIRROR"
    # The downloaded .deb files and package lists only make the image bigger.
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    touch "$ROOTFS_COMPLETE"
else
    log "reusing the root file system in $ROOTFS"
fi

# Add the user `runner` (uid/gid 1000) unless the root file system has a uid 1000 already.
if ! awk -F: -v uid="$RUNNER_UID" '$3 == uid { found = 1 } END { exit !found }' "$ROOTFS/etc/passwd"; then
    log "adding user $RUNNER_NAME ($RUNNER_UID:$RUNNER_UID) to the root file system"
    printf '%s:x:%d:%d::/home/%s:/usr/sbin/nologin\n' \
        "$RUNNER_NAME" "$RUNNER_UID" "$RUNNER_UID" "$RUNNER_NAME" >>"$ROOTFS/etc/passwd"
fi
if [[ -f "$ROOTFS/etc/shadow" ]] && ! grep -q "^${RUNNER_NAME}:" "$ROOTFS/etc/shadow"; then
    printf '%s:!:%d::::::\n' "$RUNNER_NAME" "$(($(date +%s) / 86400))" >>"$ROOTFS/etc/shadow"
fi
if ! awk -F: -v gid="$RUNNER_UID" '$3 == gid { found = 1 } END { exit !found }' "$ROOTFS/etc/group"; then
    printf '%s:x:%d:\n' "$RUNNER_NAME" "$RUNNER_UID" >>"$ROOTFS/etc/group"
fi
install -d -m 0755 -o "$RUNNER_UID" -g "$RUNNER_UID" "$ROOTFS/home/$RUNNER_NAME"

old_id=""
if podman_as_fairu image exists "$IMAGE"; then
    old_id="$(podman_as_fairu image inspect --format '{{.Id}}' "$IMAGE")"
fi
log "importing $ROOTFS as $IMAGE"
# podman creates /dev, /proc and /sys in each container, so the device nodes that
# debootstrap made stay out of the image.
tar -C "$ROOTFS" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
    podman_as_fairu import --quiet --change 'CMD ["/usr/bin/python3"]' - "$IMAGE" >/dev/null

# The import moved the tag, so the previous image has no name left. It stays while a
# container still uses it.
new_id="$(podman_as_fairu image inspect --format '{{.Id}}' "$IMAGE")"
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then
    podman_as_fairu image rm "$old_id" >/dev/null 2>&1 ||
        log "kept the previous image $old_id because a container still uses it"
fi
print_image_id
