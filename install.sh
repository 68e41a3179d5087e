#!/usr/bin/env bash
# Install the telematics agent on a Raspberry Pi OS 12 (Debian 12) box, or into a staging tree.
#
#   sudo ./install.sh                       from this checkout (needs PyPI for the dependencies)
#   sudo ./install.sh --wheelhouse DIR      offline, from wheels built with `pip download` (docs/device.md)
#   ./install.sh --root DIR                 into a staging tree DIR (image builds, tests)
#   ./install.sh --dry-run                  print what would be done, change nothing
#   sudo ./install.sh --uninstall           remove what was installed; keep config and data
#
# Idempotent: running it again upgrades the agent and the unit files and never overwrites
# /etc/telematics-agent/agent.yaml or anything else under /etc/telematics-agent.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT=""
WHEELHOUSE=""
DRY_RUN=0
UNINSTALL=0
PYTHON="${PYTHON:-python3}"

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a directory}"; shift 2 ;;
        --wheelhouse=*) WHEELHOUSE="${1#--wheelhouse=}"; shift ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --dry-run|-n) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
fi
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || { echo "install.sh: no wheelhouse directory $WHEELHOUSE" >&2; exit 2; }
    WHEELHOUSE="$(cd "$WHEELHOUSE" && pwd)"
fi
# A real install changes the running system; a staging tree does not.
LIVE=0
if [ -z "$ROOT" ]; then LIVE=1; fi

USER_NAME=telematics
VENV=/opt/telematics-agent
CONF_DIR=/etc/telematics-agent
DATA_DIR=/var/lib/telematics-agent
DOC_DIR=$VENV/share/doc/telematics-agent

# Every file this script installs and --uninstall removes: "source destination mode".
FILES=(
    "systemd/telematics-agent.service /etc/systemd/system/telematics-agent.service 0644"
    "systemd/telematics-collector.service /etc/systemd/system/telematics-collector.service 0644"
    "systemd/telematics-firstboot.service /etc/systemd/system/telematics-firstboot.service 0644"
    "systemd/telematics-agent.sysusers /usr/lib/sysusers.d/telematics-agent.conf 0644"
    "firmware_config/99-telematics-gps.rules /etc/udev/rules.d/99-telematics-gps.rules 0644"
    "firmware_config/80-can0.network /etc/systemd/network/80-can0.network 0644"
    "firmware_config/80-can0.link /etc/systemd/network/80-can0.link 0644"
    "firmware_config/system.conf.d-watchdog.conf /etc/systemd/system.conf.d/telematics-watchdog.conf 0644"
    "firmware_config/journald.conf.d-telematics.conf /etc/systemd/journald.conf.d/telematics.conf 0644"
    "firmware_config/50-telematics-poweroff.rules /etc/polkit-1/rules.d/50-telematics-poweroff.rules 0644"
    "systemd/telematics-update@.service /etc/systemd/system/telematics-update@.service 0644"
    "firmware_config/51-telematics-update.rules /etc/polkit-1/rules.d/51-telematics-update.rules 0644"
)
UNITS_ENABLED=(telematics-agent.service telematics-firstboot.service)

say() { echo "install.sh: $*"; }
# Run a command, or only print it with --dry-run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

# The numeric id of a user or group inside $ROOT (chown by name would look at the host's files).
id_in_root() {
    local db="$1" name="$2"
    awk -F: -v n="$name" '$1 == n { print $3; exit }' "$ROOT/etc/$db" 2>/dev/null
}

do_uninstall() {
    if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; then
        run systemctl disable --now "${UNITS_ENABLED[@]}" telematics-collector.service || true
    elif [ -d "$ROOT/etc/systemd/system" ]; then
        run systemctl --root="${ROOT:-/}" disable "${UNITS_ENABLED[@]}" telematics-collector.service || true
    fi
    local entry dest
    for entry in "${FILES[@]}"; do
        read -r _ dest _ <<<"$entry"
        if [ -e "$ROOT$dest" ]; then
            say "removing $dest"
            run rm -f "$ROOT$dest"
        fi
    done
    # The drop-in over-the-air updates write (docs/ota.md).
    if [ -e "$ROOT/etc/systemd/system/telematics-agent.service.d/ota.conf" ]; then
        say "removing /etc/systemd/system/telematics-agent.service.d/ota.conf"
        run rm -f "$ROOT/etc/systemd/system/telematics-agent.service.d/ota.conf"
    fi
    # Drop-in directories we created and left empty.
    for dir in /etc/systemd/system.conf.d /etc/systemd/journald.conf.d /etc/systemd/system/telematics-agent.service.d; do
        if [ -d "$ROOT$dir" ] && [ -z "$(ls -A "$ROOT$dir")" ]; then run rmdir "$ROOT$dir"; fi
    done
    if [ -d "$ROOT$VENV" ]; then
        say "removing $VENV"
        run rm -rf "$ROOT$VENV"
    fi
    if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; then
        run systemctl daemon-reload
    fi
    say "kept $CONF_DIR (identity, keys, config), $DATA_DIR (unsent telemetry) and the user $USER_NAME"
}

install_files() {
    local entry src dest mode
    for entry in "${FILES[@]}"; do
        read -r src dest mode <<<"$entry"
        if [ -e "$ROOT$dest" ] && cmp -s "$SRC/$src" "$ROOT$dest"; then
            continue
        fi
        say "installing $dest"
        run install -D -m "$mode" "$SRC/$src" "$ROOT$dest"
    done
}

create_user() {
    # sysusers.d: creates the user and the missing groups, does nothing when they exist.
    if [ "$LIVE" = 1 ]; then
        run systemd-sysusers /usr/lib/sysusers.d/telematics-agent.conf
    else
        run systemd-sysusers --root="$ROOT" "$ROOT/usr/lib/sysusers.d/telematics-agent.conf"
    fi
}

install_venv() {
    local py="$ROOT$VENV/bin/python"
    if [ ! -x "$py" ]; then
        say "creating the virtual environment $VENV"
        # System packages stay visible for the GPIO backend: Raspberry Pi OS ships python3-lgpio,
        # which gpiozero needs on a Pi and which PyPI has no aarch64 wheel of. Packages installed
        # into the venv take precedence over the system's.
        run "$PYTHON" -m venv --system-site-packages "$ROOT$VENV"
    fi
    if [ -n "$WHEELHOUSE" ]; then
        say "installing telematics-agent from the wheelhouse $WHEELHOUSE (no network)"
        run "$py" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" --upgrade telematics-agent
    else
        say "installing telematics-agent from $SRC"
        run "$py" -m pip install --quiet --upgrade "$SRC"
    fi
    # Over-the-air updates switch this link between versions/<v> and "." (this venv) (docs/ota.md).
    # Installing means running what was installed: an updated box comes back to "." (atomically).
    local link="$ROOT$VENV/current" target
    target="$(readlink "$link" 2>/dev/null || true)"
    if [ "$target" != "." ]; then
        if [ -n "$target" ]; then say "pointing $VENV/current at this installation (it was $target)"; fi
        run ln -sfn . "$link.new"
        run mv -T "$link.new" "$link"
    fi
    run install -d -m 0755 "$ROOT$DOC_DIR"
    for doc in device.md operations.md ota.md certificates.md; do
        if [ -f "$SRC/docs/$doc" ]; then run install -m 0644 "$SRC/docs/$doc" "$ROOT$DOC_DIR/$doc"; fi
    done
    run install -m 0644 "$SRC/firmware_config/agent.example.yaml" "$ROOT$DOC_DIR/agent.example.yaml"
}

install_config_and_data() {
    local uid gid
    uid="$(id_in_root passwd "$USER_NAME" || true)"
    gid="$(id_in_root group "$USER_NAME" || true)"
    if [ "$DRY_RUN" = 1 ] && [ -z "$gid" ]; then uid="$USER_NAME"; gid="$USER_NAME"; fi
    [ -n "$uid" ] && [ -n "$gid" ] || { echo "install.sh: user $USER_NAME missing in $ROOT/etc/passwd" >&2; exit 1; }
    # Config and keys: root writes, the agent's group reads, nobody else. Owners can only be set
    # as root; a staging tree built by another user keeps that user's ownership.
    local own=(-o 0 -g "$gid") data_own=(-o "$uid" -g "$gid")
    if [ "$(id -u)" != 0 ]; then
        say "not root: leaving owners unchanged in the staging tree"
        own=(); data_own=()
    fi
    run install -d -m 0750 "${own[@]}" "$ROOT$CONF_DIR"
    if [ -e "$ROOT$CONF_DIR/agent.yaml" ]; then
        say "keeping the existing $CONF_DIR/agent.yaml"
    else
        say "writing $CONF_DIR/agent.yaml from the example (set device.id, or run telematics-agent provision)"
        run install -m 0640 "${own[@]}" "$SRC/firmware_config/agent.example.yaml" "$ROOT$CONF_DIR/agent.yaml"
    fi
    # systemd's StateDirectory= would create it too; creating it here lets provisioning write into it.
    run install -d -m 0750 "${data_own[@]}" "$ROOT$DATA_DIR"
}

enable_units() {
    if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; then
        run systemctl daemon-reload
        run udevadm control --reload || true
        run systemctl enable systemd-networkd.service "${UNITS_ENABLED[@]}"
        say "start it with: systemctl start telematics-agent (or reboot)"
    elif [ "$LIVE" = 1 ]; then
        # An image being built in a chroot: no running systemd, only the symlinks.
        run systemctl --root=/ enable systemd-networkd.service "${UNITS_ENABLED[@]}"
    else
        # A staging tree holds only what this script installed: enable our units there.
        run systemctl --root="$ROOT" enable "${UNITS_ENABLED[@]}"
    fi
}

if [ "$LIVE" = 1 ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: a real install needs root (sudo), or use --root DIR / --dry-run" >&2
    exit 2
fi

if [ "$UNINSTALL" = 1 ]; then
    do_uninstall
    exit 0
fi
install_files
create_user
install_venv
install_config_and_data
enable_units
if [ "$DRY_RUN" = 1 ]; then
    say "dry run: nothing was changed"
else
    say "done${ROOT:+ (staging tree $ROOT)}"
fi
