#!/bin/sh
# Install embedshim on a node and register it with containerd's CRI plugin as handler "embed"
# and, on containerd 2.x, also as handler "embed-shim" (pods without a pause container).
#
#   install.sh [--host-root DIR] [--dist DIR | --shim PATH] [--prefix DIR] [--bin-dir DIR]
#              [--config FILE] [--runc-config FILE] [--no-restart]
#
# --host-root   the node's root filesystem (default /; /host in installer-daemonset.yaml).
#               Every path below is inside it, and commands that must run on the node
#               (python3, containerd, the shim's check, systemctl) run through chroot.
# --dist        a directory of wheels (embedshim and protobuf): a venv is made at
#               PREFIX/venv with the node's own python3 (>= 3.11, with venv) and they are
#               installed offline.  Default: /dist if present.
# --shim        instead of --dist: an already installed containerd-shim-embed-v1 to link.
# --prefix      where the venv goes (default /opt/embedshim).
# --bin-dir     where the containerd-shim-embed-v1 link goes; must be on containerd's PATH
#               (default /usr/local/bin).
# --config      containerd's config (default /etc/containerd/config.toml).
# --runc-config runc's settings for the handlers (SystemdCgroup, BinaryName, Root, ... as
#               io.containerd.runc.v2 names them; deploy/embedshim-runc.toml has
#               SystemdCgroup = true): copied to /etc/embedshim/runc.toml, and each handler
#               added gets ConfigPath = "/etc/embedshim/runc.toml"
#               (containerd-cri-embed-systemd.toml).
# --no-restart  leave containerd running with its old config (restart it yourself).
#
# The handlers:
#   embed       every containerd: pods with a pause container (containerd-cri-embed.toml,
#               runtimeclass.yaml)
#   embed-shim  containerd 2.x only (1.x has no Sandbox API handler of this kind):
#               sandboxer "shim", pods without a pause container (containerd-cri-embed-shim.toml,
#               runtimeclass-shim.yaml).  Not for hostNetwork pods on containerd 2.2.x, which
#               itself panics on them in this mode: give those the "embed" RuntimeClass.
# Their tables are written in the form containerd reads from this config:
#   version 2 (containerd 1.x, and 2.x migrates it):
#     [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.embed]
#     [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.embed-shim] with
#       sandbox_mode = "shim" (the version 2 name; 2.x migrates it to sandboxer)
#   version 3 (containerd 2.x):  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.embed]
#     and [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.embed-shim] with
#       sandboxer = "shim"
#   version 1 (containerd 1.x):  [plugins.cri.containerd.runtimes.embed]
# The version is the config's own `version`; a config without one is read by containerd 1.x
# as version 1 and by 2.x as version 3; a missing or empty config is created as version 2
# (containerd 1.x) or 3 (2.x).  `containerd config dump` of the result must then show every
# handler as written, or the config is put back as it was and the install fails.
#
# Idempotent: a handler is added only if containerd's config has none of its name (one of
# another runtime type, or an "embed-shim" without sandboxer "shim", is an error found before
# anything on the node changes), the link is replaced, the venv reinstalled from the wheels,
# and containerd is restarted only when its config changed (or a restart is still pending
# from an earlier run).  Running containers survive the restart of containerd (their shims,
# and embedshim's daemon, keep running).
set -eu

HOST=/
DIST=
SHIM=
PREFIX=/opt/embedshim
BINDIR=/usr/local/bin
CONFIG=/etc/containerd/config.toml
RUNC_CONFIG=
RESTART=1
HERE=$(cd "$(dirname "$0")" && pwd)
SNIPPET="$HERE/containerd-cri-embed.toml"
SHIM_SNIPPET="$HERE/containerd-cri-embed-shim.toml"
# where --runc-config goes: the ConfigPath of containerd-cri-embed-systemd.toml
RUNC_TOML=/etc/embedshim/runc.toml
RUNTIME_TYPE=io.containerd.embed.v1

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --host-root|--dist|--shim|--prefix|--bin-dir|--config|--runc-config)
            [ $# -ge 2 ] || die "$1 needs a value" ;;
    esac
    case "$1" in
        --host-root) HOST=$2; shift 2 ;;
        --dist) DIST=$2; shift 2 ;;
        --shim) SHIM=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --bin-dir) BINDIR=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --runc-config) RUNC_CONFIG=$2; shift 2 ;;
        --no-restart) RESTART=0; shift ;;
        -h|--help) sed -n '2,52p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root (it writes containerd's config and restarts containerd)"
[ -d "$HOST" ] || die "host root $HOST is not a directory"
HOST=$(cd "$HOST" && pwd)
on_host() { if [ "$HOST" = / ]; then "$@"; else chroot "$HOST" "$@"; fi; }
# a path given on the command line is a path on the node; on the node itself a relative
# one is taken from the current directory
if [ "$HOST" = / ] && [ -n "$SHIM" ]; then
    case "$SHIM" in /*) ;; *) SHIM=$(cd "$(dirname "$SHIM")" && pwd)/$(basename "$SHIM") ;; esac
fi
for p in "$PREFIX" "$BINDIR" "$CONFIG" ${SHIM:+"$SHIM"}; do
    case "$p" in /*) ;; *) die "$p: a path on the node must be absolute" ;; esac
done
if [ -z "$DIST" ] && [ -z "$SHIM" ] && [ -d /dist ]; then DIST=/dist; fi
[ -n "$DIST" ] || [ -n "$SHIM" ] || die "give --dist (wheels) or --shim (an installed shim)"
[ -z "$DIST" ] || [ -z "$SHIM" ] || die "give --dist or --shim, not both"
if [ -n "$RUNC_CONFIG" ]; then
    [ -f "$RUNC_CONFIG" ] || die "--runc-config $RUNC_CONFIG is not a file"
    SNIPPET="$HERE/containerd-cri-embed-systemd.toml"
fi
[ -f "$SNIPPET" ] || die "missing $SNIPPET"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# containerd must be there: which config versions it reads depends on its own version
CTRD=$(on_host containerd --version 2>/dev/null) \
    || die "containerd is not on the node's PATH ($PATH): install containerd first"
MAJOR=$(printf '%s\n' "$CTRD" | awk '{ v = $3; sub(/^v/, "", v); split(v, a, "."); print a[1] }')
case "$MAJOR" in
    1|2) ;;
    *) die "cannot tell containerd's version from: $CTRD" ;;
esac
say "containerd: $CTRD"
# the Sandbox API handler needs containerd 2.x
HANDLERS=embed
if [ "$MAJOR" = 2 ]; then
    HANDLERS="embed embed-shim"
    [ -f "$SHIM_SNIPPET" ] || die "missing $SHIM_SNIPPET"
fi

# containerd's config: which version it is (so which table the handler needs), and whether
# it has the handler already; nothing is changed on the node before this is known
CFG=$HOST$CONFIG
PENDING=$HOST$PREFIX/containerd-restart-pending

# the table header of config version $1
plugin_key() {
    case "$1" in
        1) echo 'plugins.cri' ;;
        2) echo 'plugins."io.containerd.grpc.v1.cri"' ;;
        3) echo "plugins.'io.containerd.cri.v1.runtime'" ;;
    esac
}
# the config's top-level `version` (before its first table), if it has one
config_version() {
    awk '/^[ \t]*\[/ { exit }
         /^[ \t]*version[ \t]*=/ { v = $0; sub(/^[^=]*=[ \t]*/, "", v); sub(/[ \t#].*$/, "", v)
                                   print v; exit }' "$1"
}
# what handler $1 has in $TMP/dump: runtime_type=..., sandboxer=... and ConfigPath=... lines
handler_settings() {
    key=$(plugin_key "$(config_version "$TMP/dump")" | tr -d "\"'").containerd.runtimes.$1
    tr -d "\"'" <"$TMP/dump" | awk -v want="$key" '
        /^[ \t]*\[/ { sec = $0; gsub(/[][ \t]/, "", sec); next }
        sec == want || sec == want ".options" {
            line = $0; sub(/^[ \t]*/, "", line)
            k = line; sub(/[ \t]*=.*$/, "", k)
            v = line; sub(/^[^=]*=[ \t]*/, "", v)
            if ((sec == want && (k == "runtime_type" || k == "sandboxer")) \
                || (sec == want ".options" && k == "ConfigPath"))
                print k "=" v
        }'
}
# containerd's view of the config (`config dump`, in its own latest version) into $TMP/dump,
# and what each handler has there into $TMP/$1.<handler>
dump_handlers() {
    on_host containerd --config "$CONFIG" config dump >"$TMP/dump" 2>"$TMP/dump.err" || return 1
    for h in $HANDLERS; do handler_settings "$h" >"$TMP/$1.$h"; done
}
# the value of $1 in the settings file $2 (empty if it has none)
setting() { sed -n "s/^$1=//p" "$2"; }
dump_error() { tail -n 5 "$TMP/dump.err" >&2; }

if [ -f "$CFG" ] && grep -Eq '^[[:space:]]*[^[:space:]#]' "$CFG"; then
    dump_handlers before || { dump_error; die "containerd cannot read $CONFIG"; }
    # CRI turned off (containerd.io's packaged config does that): no kubelet can use this
    # containerd, and containerd 1.x then shows no CRI settings to check the handler in
    if tr -d "\"'" <"$TMP/dump" | grep -Eq \
        '^disabled_plugins *=.*[[ ,](cri|io\.containerd\.grpc\.v1\.cri|io\.containerd\.cri\.v1\.runtime)[] ,]'; then
        die "$CONFIG disables containerd's CRI plugin (disabled_plugins), which Kubernetes needs: enable it, then run this again"
    fi
    VERSION=$(config_version "$CFG")
    if [ -z "$VERSION" ]; then
        if [ "$MAJOR" = 1 ]; then VERSION=1; else VERSION=3; fi
        say "$CONFIG has no version: containerd $MAJOR.x reads it as version $VERSION"
    fi
    NEW=0
else
    for h in $HANDLERS; do : >"$TMP/before.$h"; done
    if [ "$MAJOR" = 1 ]; then VERSION=2; else VERSION=3; fi
    NEW=1
fi
case "$MAJOR.$VERSION" in
    1.1|1.2|2.2|2.3) ;;
    2.1) die "$CONFIG is a version 1 config, which containerd 2.x does not read; convert it (containerd 1.x, version 2) first" ;;
    *) die "$CONFIG says version $VERSION, which containerd $MAJOR.x does not read" ;;
esac
# the handlers to add: those the config has none of; one of the name that is not ours (or,
# for "embed-shim", would give its pods a pause container) stops the install here
ADD=
for h in $HANDLERS; do
    have=$(setting runtime_type "$TMP/before.$h")
    if [ -z "$have" ]; then
        ADD="$ADD $h"
    elif [ "$have" != "$RUNTIME_TYPE" ]; then
        die "$CONFIG already has a runtime handler \"$h\" of runtime type $have"
    elif [ "$h" = embed-shim ] && [ "$(setting sandboxer "$TMP/before.$h")" != shim ]; then
        die "$CONFIG already has a runtime handler \"embed-shim\" without sandboxer = \"shim\" (its pods would get a pause container): give it sandboxer = \"shim\" or remove it"
    fi
done

# the shim's side
if [ -n "$DIST" ]; then
    ls "$DIST"/embedshim-*.whl >/dev/null 2>&1 || die "no embedshim wheel in $DIST"
    on_host python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "the node needs python3 >= 3.11"
    on_host python3 -c 'import ensurepip, venv' 2>/dev/null \
        || die "the node's python3 has no venv module (Debian, Ubuntu: apt-get install python3-venv)"
else
    [ -x "$HOST$SHIM" ] || die "$SHIM is not an executable on the node"
fi

# 1. the shim: a venv made by the node's python3, or an existing binary
if [ -n "$DIST" ]; then
    SHIM=$PREFIX/venv/bin/containerd-shim-embed-v1
    # the same wheels as last time (a DaemonSet pod run again): the venv is left alone, as
    # a running daemon may still import from it
    same=1
    [ -x "$HOST$SHIM" ] || same=0
    for w in "$DIST"/*.whl; do cmp -s "$w" "$HOST$PREFIX/dist/${w##*/}" || same=0; done
    for w in "$HOST$PREFIX"/dist/*.whl; do [ -f "$DIST/${w##*/}" ] || same=0; done
    if [ "$same" = 1 ]; then
        say "$PREFIX/venv has these wheels installed already"
    else
        # only this run's wheels: pip takes the highest version it finds
        rm -rf "$HOST$PREFIX/dist"
        mkdir -p "$HOST$PREFIX/dist"
        [ -x "$HOST$PREFIX/venv/bin/python" ] || on_host python3 -m venv "$PREFIX/venv"
        # --force-reinstall: a rebuilt wheel of the same version replaces the installed one
        cp "$DIST"/*.whl "$HOST$PREFIX/dist/"
        on_host "$PREFIX/venv/bin/pip" install --quiet --no-index --upgrade --force-reinstall \
            --disable-pip-version-check --find-links "$PREFIX/dist" embedshim \
            || { rm -rf "$HOST$PREFIX/dist"; die "pip could not install the wheels of $DIST"; }
        # the C entry point (start/delete without Python) in place of pip's console script,
        # with the quicker Python launcher (python -SE) in libexec/embedshim: shim/cmd/launcher.py
        on_host "$PREFIX/venv/bin/python" -m shim.cmd.launcher || say "kept pip's console script"
        say "installed $(cd "$DIST" && echo *.whl) into $PREFIX/venv"
    fi
fi
[ -x "$HOST$SHIM" ] || die "$SHIM is not an executable on the node"
mkdir -p "$HOST$BINDIR"
ln -sfn "$SHIM" "$HOST$BINDIR/containerd-shim-embed-v1"
say "linked $BINDIR/containerd-shim-embed-v1 -> $SHIM"
# what the daemon will run with: BPF exit tracking and crash survival come from files in the
# package (shim/data); a node that lacks what they need (BTF, say) gets a warning, not a stop
REPORT=$(on_host "$SHIM" check 2>&1) || true
printf '%s\n' "$REPORT" | grep -E '^(mode:|WARNING:)' | while IFS= read -r line; do
    say "check: $line"
done
if [ -n "$RUNC_CONFIG" ]; then
    mkdir -p "$HOST$(dirname "$RUNC_TOML")"
    cp "$RUNC_CONFIG" "$HOST$RUNC_TOML"
    say "runc's settings for the handler: $RUNC_TOML (read at each container's creation)"
fi

# 2. containerd's CRI config: each handler once, in the form its version needs
KEY=$(plugin_key "$VERSION")
# a snippet's tables without its comments
tables_of() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$1"; }
# handler $1's table for this config (containerd-cri-embed*.toml are written for version 2,
# containerd-cri-embed-shim.toml for version 3)
table() {
    printf '\n# embedshim: the CRI runtime handler "%s" (added by deploy/install.sh)\n' "$1"
    if [ "$1" = embed ]; then
        tables_of "$SNIPPET" | sed "s|plugins\.\"io\.containerd\.grpc\.v1\.cri\"|$KEY|"
        return
    fi
    tables_of "$SHIM_SNIPPET" | sed "s|plugins\.'io\.containerd\.cri\.v1\.runtime'|$KEY|" \
        | if [ "$VERSION" = 2 ]; then
            # version 2 names it sandbox_mode; containerd 2.x migrates that to sandboxer
            sed 's/^\([[:space:]]*\)sandboxer[[:space:]]*=/\1sandbox_mode =/'
        else
            cat
        fi
    # runc's settings hold for this handler's containers too
    if [ -n "$RUNC_CONFIG" ]; then
        printf '  [%s.containerd.runtimes.embed-shim.options]\n    ConfigPath = "%s"\n' \
            "$KEY" "$RUNC_TOML"
    fi
}
# handler $1 in containerd's dump after the change as wanted: our runtime type, "embed-shim"
# with sandboxer "shim", and runc's ConfigPath in a table added with --runc-config
wanted() {
    grep -qx "runtime_type=$RUNTIME_TYPE" "$TMP/after.$1" || return 1
    [ "$1" != embed-shim ] || grep -qx "sandboxer=shim" "$TMP/after.$1" || return 1
    case " $ADD " in
        *" $1 "*) [ -z "$RUNC_CONFIG" ] || grep -qx "ConfigPath=$RUNC_TOML" "$TMP/after.$1" ;;
    esac
}

for h in $HANDLERS; do
    case " $ADD " in *" $h "*) continue ;; esac
    say "$CONFIG already has the $h runtime"
    if [ -n "$RUNC_CONFIG" ] && ! grep -qx "ConfigPath=$RUNC_TOML" "$TMP/before.$h"; then
        say "NOTE: its handler has no ConfigPath = \"$RUNC_TOML\": see deploy/containerd-cri-embed-systemd.toml"
    fi
done
if [ -n "$ADD" ]; then
    case "$ADD" in
        *" "*" "*) WHAT="the $(echo "$ADD" | sed 's/^ //; s/ / and /') runtimes" ;;
        *) WHAT="the${ADD} runtime" ;;
    esac
    mkdir -p "$(dirname "$CFG")"
    if [ "$NEW" = 1 ]; then
        rm -f "$CFG.embedshim.bak"
        if [ -f "$CFG" ]; then cp -p "$CFG" "$CFG.embedshim.bak"; fi
        printf 'version = %s\n' "$VERSION" >"$CFG"
    else
        cp -p "$CFG" "$CFG.embedshim.bak"
    fi
    for h in $ADD; do table "$h"; done >>"$CFG"
    # every handler, the ones there before included, as containerd reads the new config
    ok=0
    if dump_handlers after; then
        ok=1
        for h in $HANDLERS; do wanted "$h" || ok=0; done
    fi
    if [ "$ok" = 0 ]; then
        if [ -f "$CFG.embedshim.bak" ]; then mv "$CFG.embedshim.bak" "$CFG"; else rm -f "$CFG"; fi
        dump_error
        die "containerd $MAJOR.x does not read $WHAT from $CONFIG (version $VERSION): left as it was"
    fi
    if [ -f "$CFG.embedshim.bak" ]; then
        say "added $WHAT to $CONFIG (version $VERSION; backup: $CONFIG.embedshim.bak)"
    else
        say "wrote $CONFIG (version $VERSION) with $WHAT"
    fi
    mkdir -p "$(dirname "$PENDING")"
    : >"$PENDING"
fi

# 3. containerd picks them up on restart.  systemctl refuses to act from a chroot, so from
# a pod (hostPID) it runs in the namespaces of the node's pid 1.
if [ ! -e "$PENDING" ]; then
    say "containerd's config is unchanged: no restart needed"
elif [ "$RESTART" = 0 ]; then
    say "restart containerd to load the handler (--no-restart)"
else
    if [ "$HOST" = / ]; then
        systemctl restart containerd \
            || die "could not restart containerd (systemctl restart containerd): restart it yourself"
    else
        nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd \
            || die "could not restart containerd (systemctl restart containerd on the node)"
    fi
    rm -f "$PENDING"
    say "restarted containerd"
fi
say "done: pods with runtimeClassName: embed run through embedshim"
if [ "$MAJOR" = 2 ]; then
    say "done: pods with runtimeClassName: embed-shim too, without a pause container (not for hostNetwork pods on containerd 2.2.x: give those embed)"
fi
