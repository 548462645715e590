#!/bin/sh
# Install embedshim on a node and register it with containerd's CRI plugin as handler "embed".
#
#   install.sh [--host-root DIR] [--dist DIR | --shim PATH] [--prefix DIR]
#              [--config FILE] [--no-restart]
#
# --host-root  the node's root filesystem (default /; /host in installer-daemonset.yaml).
#              Every path below is inside it, and commands that must run on the node
#              (python3, containerd, systemctl) run through chroot.
# --dist       a directory of wheels (embedshim and protobuf): a venv is made at
#              PREFIX/venv with the node's own python3 (>= 3.11) and they are installed
#              offline.  Default: /dist if present.
# --shim       instead of --dist: an already installed containerd-shim-embed-v1 to link.
# --prefix     where the venv goes (default /opt/embedshim).
# --config     containerd's config (default /etc/containerd/config.toml).
# --no-restart leave containerd running with its old config (restart it yourself).
#
# Idempotent: the runtime table is appended only if the config has none for "embed", the
# link is replaced, the venv is upgraded in place.  Running containers survive the restart
# of containerd (their shims, and embedshim's daemon, keep running).
set -eu

HOST=/
DIST=
SHIM=
PREFIX=/opt/embedshim
CONFIG=/etc/containerd/config.toml
RESTART=1
HERE=$(cd "$(dirname "$0")" && pwd)
SNIPPET="$HERE/containerd-cri-embed.toml"
TABLE='[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.embed]'

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --host-root) HOST=$2; shift 2 ;;
        --dist) DIST=$2; shift 2 ;;
        --shim) SHIM=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --no-restart) RESTART=0; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[ -d "$HOST" ] || die "host root $HOST is not a directory"
[ -f "$SNIPPET" ] || die "missing $SNIPPET"
HOST=$(cd "$HOST" && pwd)
on_host() { if [ "$HOST" = / ]; then "$@"; else chroot "$HOST" "$@"; fi; }
if [ -z "$DIST" ] && [ -z "$SHIM" ] && [ -d /dist ]; then DIST=/dist; fi
[ -n "$DIST" ] || [ -n "$SHIM" ] || die "give --dist (wheels) or --shim (an installed shim)"

# 1. the shim: a venv made by the node's python3, or an existing binary
if [ -n "$DIST" ]; then
    on_host python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "the node needs python3 >= 3.11 (with venv)"
    mkdir -p "$HOST$PREFIX/dist"
    cp "$DIST"/*.whl "$HOST$PREFIX/dist/"
    [ -x "$HOST$PREFIX/venv/bin/python" ] || on_host python3 -m venv "$PREFIX/venv"
    on_host "$PREFIX/venv/bin/pip" install --quiet --no-index --upgrade \
        --find-links "$PREFIX/dist" embedshim
    # the quicker launcher (python -SE) in place of pip's console script: shim/launcher.py
    on_host "$PREFIX/venv/bin/python" -m shim.launcher || say "kept pip's console script"
    SHIM=$PREFIX/venv/bin/containerd-shim-embed-v1
fi
[ -x "$HOST$SHIM" ] || die "$SHIM is not an executable on the node"
mkdir -p "$HOST/usr/local/bin"
ln -sfn "$SHIM" "$HOST/usr/local/bin/containerd-shim-embed-v1"
say "linked /usr/local/bin/containerd-shim-embed-v1 -> $SHIM"
# what the daemon will run with: BPF exit tracking and crash survival come from files in the
# package (shim/data); a node that lacks what they need (BTF, say) gets a warning, not a stop
REPORT=$(on_host "$SHIM" check 2>&1) || true
printf '%s\n' "$REPORT" | grep -E '^(mode:|WARNING:)' | while IFS= read -r line; do
    say "check: $line"
done

# 2. containerd's CRI config: the "embed" runtime, once
CFG=$HOST$CONFIG
mkdir -p "$(dirname "$CFG")"
if [ ! -s "$CFG" ]; then
    printf 'version = 2\n' >"$CFG"
fi
grep -q '^version *= *2' "$CFG" || die "$CONFIG is not a version 2 containerd config"
if grep -qF "$TABLE" "$CFG"; then
    say "$CONFIG already has the embed runtime"
else
    cp "$CFG" "$CFG.embedshim.bak"
    { printf '\n'; cat "$SNIPPET"; } >>"$CFG"
    say "added the embed runtime to $CONFIG (backup: $CONFIG.embedshim.bak)"
fi
if on_host sh -c 'command -v containerd' >/dev/null 2>&1; then
    on_host containerd --config "$CONFIG" config dump 2>/dev/null \
        | grep -q 'io.containerd.embed.v1' || die "containerd does not read the embed runtime from $CONFIG"
fi

# 3. containerd picks it up on restart.  systemctl refuses to act from a chroot, so from
# a pod (hostPID) it runs in the namespaces of the node's pid 1.
if [ "$RESTART" = 1 ]; then
    if [ "$HOST" = / ]; then
        systemctl restart containerd
    else
        nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd
    fi
    say "restarted containerd"
fi
say "done: pods with runtimeClassName: embed run through embedshim"
