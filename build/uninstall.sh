#!/bin/sh
# Remove what build/install.sh installed: build/uninstall.sh   (what `make uninstall` runs)
#
# Reads $DESTDIR$PREFIX/share/agentspoonsd/install-manifest (PREFIX and DESTDIR as at install)
# and removes exactly what it lists, nothing else:
#   - the program's files (binary, units, schema, sysusers.d entry) and the manifest itself;
#   - the config and env file while they are what was installed; an edited one is kept, and said;
#   - the directories an install created, once empty.
# Kept unless PURGE=1: the tokens file (the clients' tokens) and the service's state
# (/var/lib/agentspoonsd: the persisted history); with PURGE=1 both go, and so do edited configs.
# The system user agentspoonsd is never removed: its id could be reused by another user, who
# would then own whatever the service left behind.
#
# On this machine (no DESTDIR), as root, the service and its socket are stopped and disabled
# first, and systemd reloads its units after.
set -eu

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
PURGE=${PURGE:-}
manifest=$PREFIX/share/agentspoonsd/install-manifest

if [ ! -f "$DESTDIR$manifest" ]; then
    echo "uninstall.sh: no install manifest at $DESTDIR$manifest: nothing was installed there" >&2
    echo "(installed with another PREFIX or DESTDIR? pass the same ones: make uninstall PREFIX=…)" >&2
    exit 1
fi
case $PURGE in
'' | 0) purge= ;;
1) purge=1 ;;
*)
    echo "uninstall.sh: PURGE=$PURGE: use PURGE=1 (remove tokens and state too) or leave it unset" >&2
    exit 2
    ;;
esac

systemd_here=
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemd_here=1
    # Stopped before its files go; "not loaded" is fine (never enabled, or already removed).
    systemctl disable --now agentspoonsd.socket agentspoonsd.service 2>/dev/null || true
fi

# PATH is the rest of the line after KIND and SHA256: a path may hold spaces.
entries() {  # entries KIND: the paths of that kind, one a line
    awk -v kind="$1" '$1 == kind { print substr($0, index($0, $3)) }' "$DESTDIR$manifest"
}
unchanged() {  # unchanged PATH: the file is byte for byte what was installed
    want=$(awk -v path="$1" 'substr($0, index($0, $3)) == path { print $2 }' "$DESTDIR$manifest" |
        tail -n 1)
    have=$(sha256sum <"$DESTDIR$1" | cut -d' ' -f1)
    [ "$want" = "$have" ]
}
gone() {  # gone PATH: remove it, and say so
    rm -f "$DESTDIR$1"
    echo "removed $DESTDIR$1"
}

kept=""
# Loops read here-documents, not pipes: they run in this shell, so `kept` survives them.
while IFS= read -r path; do
    if [ -n "$path" ] && { [ -e "$DESTDIR$path" ] || [ -L "$DESTDIR$path" ]; }; then
        gone "$path"
    fi
done <<EOF
$(entries file)
EOF
while IFS= read -r path; do
    [ -n "$path" ] && [ -e "$DESTDIR$path" ] || continue
    if [ -n "$purge" ] || unchanged "$path"; then
        gone "$path"
    else
        echo "kept $DESTDIR$path (edited since it was installed; PURGE=1 removes it)"
        kept="$kept $path"
    fi
done <<EOF
$(entries config)
EOF
while IFS= read -r path; do
    [ -n "$path" ] && [ -e "$DESTDIR$path" ] || continue
    if [ -n "$purge" ]; then
        gone "$path"
    else
        echo "kept $DESTDIR$path (the clients' tokens; PURGE=1 removes it)"
        kept="$kept $path"
    fi
done <<EOF
$(entries tokens)
EOF

# The service's state: the unit's StateDirectory= (with DynamicUser=, systemd keeps it under
# /var/lib/private and links it from /var/lib). Not in the manifest: systemd made it, not install.
for state in /var/lib/agentspoonsd /var/lib/private/agentspoonsd; do
    if [ -e "$DESTDIR$state" ] || [ -L "$DESTDIR$state" ]; then
        if [ -n "$purge" ]; then
            rm -rf "$DESTDIR$state"
            echo "removed $DESTDIR$state (the service's state)"
        else
            echo "kept $DESTDIR$state (the service's state: the persisted history; PURGE=1 removes it)"
        fi
    fi
done

# Deepest first (a reverse sort puts /a/b before /a); a directory still holding something stays.
dirs=$(entries dir | sort -r)
rm -f "$DESTDIR$manifest"
echo "removed $DESTDIR$manifest"
while IFS= read -r dir; do
    if [ -n "$dir" ] && [ -d "$DESTDIR$dir" ] && rmdir "$DESTDIR$dir" 2>/dev/null; then
        echo "removed $DESTDIR$dir/"
    fi
done <<EOF
$dirs
EOF

if [ -n "$systemd_here" ]; then
    systemctl daemon-reload || true
fi
echo
if [ -n "$kept" ]; then
    echo "agentspoonsd is uninstalled; kept:$kept"
    echo "(make uninstall PURGE=1 removes them too; back them up first: systemd/README.md)"
else
    echo "agentspoonsd is uninstalled."
fi
