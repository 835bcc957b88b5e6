#!/usr/bin/env bash
# Prepare this host for fairu's agent and tests, as root. Safe to run again: every step
# checks its state first and only acts when something is missing.
#
#   1. apt packages: podman, its rootless helpers and catatonit, debootstrap, curl,
#      rabbitmq-server, and chromium, which the tests of the coordinator's web page drive
#      headless
#   2. the unprivileged user `fairu` with subordinate UID/GID ranges and podman config
#   3. that user's podman API service on unix:///run/user/UID/podman/podman.sock
#   4. the RabbitMQ node on 127.0.0.1:5672 with the rabbitmq_management plugin
#   5. the example image localhost/fairu-python:1 (scripts/build-image.sh)
set -euo pipefail

readonly FAIRU_USER=fairu
readonly PACKAGES=(podman runc catatonit uidmap slirp4netns fuse-overlayfs debootstrap curl
    rabbitmq-server chromium)
readonly SERVICE_LOG=/var/log/fairu/podman-service.log
readonly WAIT_PODMAN_S=30
readonly WAIT_RABBITMQ_S=90
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR

log() { printf 'setup-host: %s\n' "$*"; }
die() {
    printf 'setup-host: error: %s\n' "$*" >&2
    exit 1
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$package")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return
    fi
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Print the first ID after every range in FILE (/etc/subuid or /etc/subgid), at least 100000.
next_free_subordinate_id() {
    awk -F: 'BEGIN { next_id = 100000 }
        NF >= 3 && $2 + $3 > next_id { next_id = $2 + $3 }
        END { print next_id }' "$1"
}

# useradd -m adds the subordinate ranges itself. This covers a user made without them.
ensure_subordinate_range() {
    local file="$1" option="$2" start
    touch "$file"
    if grep -q "^${FAIRU_USER}:" "$file"; then
        return
    fi
    start="$(next_free_subordinate_id "$file")"
    log "adding ${FAIRU_USER}:${start}:65536 to $file"
    usermod "$option" "${start}-$((start + 65535))" "$FAIRU_USER"
}

ensure_user() {
    if ! id -u "$FAIRU_USER" >/dev/null 2>&1; then
        log "creating user $FAIRU_USER"
        useradd -m -s /bin/bash "$FAIRU_USER"
    fi
    ensure_subordinate_range /etc/subuid --add-subuids
    ensure_subordinate_range /etc/subgid --add-subgids

    FAIRU_UID="$(id -u "$FAIRU_USER")"
    FAIRU_GID="$(id -g "$FAIRU_USER")"
    FAIRU_HOME="$(getent passwd "$FAIRU_USER" | cut -d: -f6)"
    RUNTIME_DIR="/run/user/$FAIRU_UID"
    SOCKET_PATH="$RUNTIME_DIR/podman/podman.sock"

    # /run is a tmpfs, so this directory is gone after every reboot.
    install -d -m 0755 /run/user
    install -d -m 0700 -o "$FAIRU_UID" -g "$FAIRU_GID" "$RUNTIME_DIR"
}

# Write CONTENT to PATH, owned by the fairu user, unless PATH already contains exactly that.
write_user_file() {
    local path="$1" content="$2"
    if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$content" ]]; then
        return
    fi
    log "writing $path"
    install -d -m 0755 -o "$FAIRU_UID" -g "$FAIRU_GID" "$(dirname "$path")"
    printf '%s\n' "$content" >"$path"
    chown "$FAIRU_UID:$FAIRU_GID" "$path"
}

configure_podman() {
    install -d -m 0755 -o "$FAIRU_UID" -g "$FAIRU_GID" "$FAIRU_HOME/.config"
    # crun (podman's default runtime on Debian 12) fails on cgroup v1/hybrid hosts with
    # "cgroups in hybrid mode not supported", so runc is the runtime. There is no systemd
    # user session for this user, so cgroups go through cgroupfs, events go to a file and
    # container logs to k8s-file (the log file podman's logs API reads back).
    write_user_file "$FAIRU_HOME/.config/containers/containers.conf" '[containers]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"'
    # Without this file, podman 4.3 picked vfs for this user on Debian 12 hosts, and vfs
    # copies the whole image for each container. overlay shares the image's layers.
    local driver conf="$FAIRU_HOME/.config/containers/storage.conf"
    driver="$(choose_storage_driver)"
    local content="[storage]
driver = \"$driver\""
    if [[ -f "$conf" ]] && [[ "$(cat "$conf")" != "$content" ]]; then
        # A running service keeps the driver it started with.
        stop_podman_service
    fi
    write_user_file "$conf" "$content"
    log "podman storage driver of $FAIRU_USER: $driver"
}

# Run a command as the fairu user, with the environment its podman needs.
as_fairu() {
    (cd / && runuser -u "$FAIRU_USER" -- env HOME="$FAIRU_HOME" USER="$FAIRU_USER" \
        XDG_RUNTIME_DIR="$RUNTIME_DIR" PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "$@")
}

# Print the storage driver for the user's store. A store keeps its images under
# <driver>-images. An overlay store is kept as it is. A vfs store moves to overlay
# when overlay works. The move resets the store, which removes its images and
# containers, and build-image.sh then imports the image again from its cached root
# file system. A new store gets overlay when overlay works.
choose_storage_driver() {
    local store="$FAIRU_HOME/.local/share/containers/storage"
    if [[ -d "$store/overlay-images" ]]; then
        echo overlay
    elif ! overlay_works; then
        echo vfs
    else
        if [[ -d "$store/vfs-images" ]]; then
            log "resetting the vfs podman store of $FAIRU_USER, to use the overlay driver" >&2
            stop_podman_service >&2
            as_fairu podman --storage-driver vfs system reset --force >/dev/null ||
                die "podman system reset of the vfs store in $store failed, and the store" \
                    "may be partly removed; run this script again to reset it again"
        fi
        echo overlay
    fi
}

# Succeed when the kernel mounts overlay inside the user's own user namespace (Linux
# 5.13 and newer), as rootless podman does without fuse-overlayfs. The test mount is
# made next to the store, on the file system that the store would use.
overlay_works() {
    local parent="$FAIRU_HOME/.local/share/containers" probe status=0
    install -d -m 0700 -o "$FAIRU_UID" -g "$FAIRU_GID" "$FAIRU_HOME/.local" \
        "$FAIRU_HOME/.local/share" "$parent"
    probe="$(as_fairu mktemp -d "$parent/overlay-probe.XXXXXX")"
    as_fairu unshare --user --map-root-user --mount sh -c \
        'cd "$1" && mkdir lower upper work merged &&
         mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work merged' \
        sh "$probe" >/dev/null 2>&1 || status=$?
    rm -rf "$probe"
    return "$status"
}

stop_podman_service() {
    local pids waited=0
    pids="$(pgrep -u "$FAIRU_UID" -f "system service .*unix://$SOCKET_PATH" || true)"
    [[ -n "$pids" ]] || return 0
    log "stopping the podman API service of $FAIRU_USER"
    # shellcheck disable=SC2086  # one PID per word
    kill $pids
    while pgrep -u "$FAIRU_UID" -f "system service .*unix://$SOCKET_PATH" >/dev/null; do
        if ((waited >= WAIT_PODMAN_S)); then
            die "the podman API service of $FAIRU_USER did not stop within ${WAIT_PODMAN_S} s"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

podman_responds() {
    [[ -S "$SOCKET_PATH" ]] &&
        curl -sf --max-time 5 --unix-socket "$SOCKET_PATH" http://podman/v4.0.0/libpod/_ping >/dev/null
}

start_podman_service() {
    if podman_responds; then
        log "the podman API service already responds on $SOCKET_PATH"
        return
    fi
    local pids
    pids="$(pgrep -u "$FAIRU_UID" -f "system service .*unix://$SOCKET_PATH" || true)"
    if [[ -n "$pids" ]]; then
        die "podman API service process(es) $(echo "$pids" | tr '\n' ' ')for $SOCKET_PATH are" \
            "running but not responding; stop them (kill PID) and run this script again"
    fi

    # A socket file left by a service that died makes the new service fail to bind.
    rm -f "$SOCKET_PATH"
    install -d -m 0700 -o "$FAIRU_UID" -g "$FAIRU_GID" "$(dirname "$SOCKET_PATH")"
    install -d -m 0755 "$(dirname "$SERVICE_LOG")"
    log "starting the podman API service of $FAIRU_USER (log: $SERVICE_LOG)"
    printf '\n--- %s: starting the podman API service\n' "$(date -Is)" >>"$SERVICE_LOG"
    # setsid puts the service in its own session, so it outlives this script and its
    # terminal. A background job is no process group leader, so setsid runs runuser in
    # place and $! is the runuser process, which waits for podman.
    setsid runuser -u "$FAIRU_USER" -- env HOME="$FAIRU_HOME" USER="$FAIRU_USER" \
        XDG_RUNTIME_DIR="$RUNTIME_DIR" PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        podman --runtime runc system service --time=0 "unix://$SOCKET_PATH" \
        </dev/null >>"$SERVICE_LOG" 2>&1 &
    local service_pid=$! waited=0
    until podman_responds; do
        if ! kill -0 "$service_pid" 2>/dev/null; then
            tail -n 20 "$SERVICE_LOG" >&2 || true
            die "the podman API service exited before it responded on $SOCKET_PATH; see $SERVICE_LOG"
        fi
        if ((waited >= WAIT_PODMAN_S)); then
            tail -n 20 "$SERVICE_LOG" >&2 || true
            die "the podman API service did not respond on $SOCKET_PATH within ${WAIT_PODMAN_S} s;" \
                "see $SERVICE_LOG"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "the podman API service responds on $SOCKET_PATH"
}

rabbitmq_responds() { rabbitmqctl -q status >/dev/null 2>&1; }

# Wait until COMMAND succeeds, for at most SECONDS; return 1 on timeout.
wait_for() {
    local seconds="$1" waited=0
    shift
    until "$@"; do
        if ((waited >= seconds)); then
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

management_responds() { curl -sf --max-time 5 -o /dev/null http://127.0.0.1:15672/; }

start_rabbitmq() {
    if ! rabbitmq_responds; then
        log "starting the RabbitMQ node"
        rabbitmq-server -detached
        wait_for "$WAIT_RABBITMQ_S" rabbitmq_responds ||
            die "RabbitMQ did not respond to 'rabbitmqctl status' within ${WAIT_RABBITMQ_S} s;" \
                "see /var/log/rabbitmq/"
    fi
    if ! rabbitmq-plugins -q list -e -m 2>/dev/null | grep -qx rabbitmq_management; then
        log "enabling the rabbitmq_management plugin"
        rabbitmq-plugins -q enable rabbitmq_management
    fi
    wait_for "$WAIT_RABBITMQ_S" management_responds ||
        die "the RabbitMQ management API did not respond on http://127.0.0.1:15672/ within" \
            "${WAIT_RABBITMQ_S} s; see /var/log/rabbitmq/"
    log "RabbitMQ is running on 127.0.0.1:5672, its management API on 127.0.0.1:15672"
}

main() {
    if ((EUID != 0)); then
        die "run this script as root: it installs packages and creates the user $FAIRU_USER"
    fi
    install_packages
    ensure_user
    configure_podman
    start_podman_service
    start_rabbitmq
    "$SCRIPT_DIR/build-image.sh"

    printf '\n'
    printf 'podman socket: unix://%s\n' "$SOCKET_PATH"
    printf 'image:         %s\n' "localhost/fairu-python:1"
}

main "$@"
