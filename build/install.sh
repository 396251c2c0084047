#!/bin/sh
# Install agentspoonsd: build/install.sh [BINARY]   (what `make install` runs)
#
#   $DESTDIR$PREFIX/bin/agentspoonsd                     the frozen executable (PREFIX=/usr/local)
#   $DESTDIR/etc/systemd/system/agentspoonsd.service     the hardened unit (+ agentspoonsd.socket)
#   $DESTDIR/etc/agentspoonsd/agentspoonsd.toml          the commented production config
#   $DESTDIR/etc/agentspoonsd/agentspoonsd.env           environment overrides (all commented)
#   $DESTDIR/etc/agentspoonsd/agentspoonsd.schema.json   the config's JSON Schema, for editors
#   $DESTDIR/etc/agentspoonsd/tokens.toml                the clients' tokens (none yet), mode 0600
#   $DESTDIR/etc/sysusers.d/agentspoonsd.conf            the service's system user
#   $DESTDIR$PREFIX/share/agentspoonsd/install-manifest  what this put there, for build/uninstall.sh
#
# Installing on this machine (no DESTDIR) also creates that user and gives it the tokens file
# (build/service-user.sh); a package runs that script after unpacking.
#
# DESTDIR stages the tree for a package; empty, it installs on this machine (as root).
# The binary, units and schema are replaced on every install (an upgrade). The config and env file
# are the operator's: one that differs from the shipped version is never overwritten; the new
# version is installed beside it as *.new, and the script says so.
#
# It never builds: freezing as root would leave root-owned files in the tree. Without BINARY it
# refuses and names the command to run first, as the normal user: make binary.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
binary=${1:-$top/dist/agentspoonsd}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
bindir=$PREFIX/bin
unitdir=/etc/systemd/system
confdir=/etc/agentspoonsd

sharedir=$PREFIX/share/agentspoonsd
manifest=$sharedir/install-manifest

if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
    echo "install.sh: no executable at $binary: build it first, as your normal user (not root):" >&2
    echo "    make binary" >&2
    echo "then install it: sudo make install" >&2
    exit 1
fi

# The manifest: one line per thing installed, "KIND SHA256 PATH" (PATH without DESTDIR; SHA256 of
# the file as installed, "-" for a directory). KIND says what build/uninstall.sh does with it:
#   file    the program's: removed
#   config  the operator's: removed only while it is what was installed (unless PURGE=1)
#   tokens  the clients' tokens: kept unless PURGE=1
#   dir     created by an install: removed when empty
# An upgrade keeps the entries of earlier installs that it does not rewrite (the directories
# they created, a config kept as edited).
recorded=$(mktemp)
trap 'rm -f "$recorded"' EXIT
record() {  # record KIND PATH
    if [ "$1" = dir ]; then
        sum=-
    else
        sum=$(sha256sum <"$DESTDIR$2" | cut -d' ' -f1)
    fi
    printf '%s %s %s\n' "$1" "$sum" "$2" >>"$recorded"
}
make_dir() {  # make_dir PATH: creates it and any missing parent, recording each one created
    missing=""
    d=$1
    while [ "$d" != / ] && [ ! -d "$DESTDIR$d" ]; do
        missing="$d $missing"
        d=$(dirname "$d")
    done
    install -d -m 0755 "$DESTDIR$1"
    for d in $missing; do
        record dir "$d"
    done
}

for dir in "$bindir" "$unitdir" "$confdir" /etc/sysusers.d "$sharedir"; do
    make_dir "$dir"
done
install -m 0755 "$binary" "$DESTDIR$bindir/agentspoonsd.tmp"
mv -f "$DESTDIR$bindir/agentspoonsd.tmp" "$DESTDIR$bindir/agentspoonsd"  # atomic: safe while running
record file "$bindir/agentspoonsd"
echo "installed $DESTDIR$bindir/agentspoonsd"

# The unit names /usr/local/bin/agentspoonsd; another PREFIX rewrites that one path.
sed "s|/usr/local/bin/agentspoonsd|$bindir/agentspoonsd|" "$top/systemd/agentspoonsd.service" \
    >"$DESTDIR$unitdir/agentspoonsd.service.tmp"
chmod 0644 "$DESTDIR$unitdir/agentspoonsd.service.tmp"
mv -f "$DESTDIR$unitdir/agentspoonsd.service.tmp" "$DESTDIR$unitdir/agentspoonsd.service"
install -m 0644 "$top/systemd/agentspoonsd.socket" "$DESTDIR$unitdir/agentspoonsd.socket"
record file "$unitdir/agentspoonsd.service"
record file "$unitdir/agentspoonsd.socket"
echo "installed $DESTDIR$unitdir/agentspoonsd.service and agentspoonsd.socket"
install -m 0644 "$top/config/agentspoonsd.schema.json" "$DESTDIR$confdir/agentspoonsd.schema.json"
record file "$confdir/agentspoonsd.schema.json"
install -m 0644 "$top/systemd/agentspoonsd.sysusers" "$DESTDIR/etc/sysusers.d/agentspoonsd.conf"
record file /etc/sysusers.d/agentspoonsd.conf
echo "installed $DESTDIR/etc/sysusers.d/agentspoonsd.conf"

kept=""
# install_config SOURCE NAME MODE: never replaces an operator's edits.
install_config() {
    target="$DESTDIR$confdir/$2"
    if [ ! -e "$target" ]; then
        install -m "$3" "$1" "$target"
        record config "$confdir/$2"
        echo "installed $target"
    elif cmp -s "$1" "$target"; then
        record config "$confdir/$2"
        echo "unchanged $target"
    else
        install -m "$3" "$1" "$target.new"
        record config "$confdir/$2.new"
        echo "kept $target (it differs from the shipped one); the shipped version is $target.new"
        kept="$kept $confdir/$2"
    fi
}
# The config is read by the service's transient user (DynamicUser): world-readable. It holds
# token digests only, never tokens. The env file is read by systemd itself, as root.
install_config "$top/config/agentspoonsd.example.toml" agentspoonsd.toml 0644
install_config "$top/config/agentspoonsd.env" agentspoonsd.env 0600
# The tokens file is created once and then only ever edited by `agentspoonsd token`.
if [ ! -e "$DESTDIR$confdir/tokens.toml" ]; then
    install -m 0600 "$top/config/tokens.toml" "$DESTDIR$confdir/tokens.toml"
    record tokens "$confdir/tokens.toml"
    echo "installed $DESTDIR$confdir/tokens.toml"
fi
# This install's entries, then the earlier ones it did not rewrite (by path), then itself.
# Written through a temporary file renamed over the old one: never half a manifest.
{
    cat "$recorded"
    if [ -f "$DESTDIR$manifest" ]; then
        awk 'NR == FNR { seen[substr($0, index($0, $3))] = 1; next }
             $1 != "manifest" && !(substr($0, index($0, $3)) in seen)' \
            "$recorded" "$DESTDIR$manifest"
    fi
    printf 'manifest - %s\n' "$manifest"
} >"$DESTDIR$manifest.tmp"
chmod 0644 "$DESTDIR$manifest.tmp"
mv -f "$DESTDIR$manifest.tmp" "$DESTDIR$manifest"
echo "installed $DESTDIR$manifest (what \`make uninstall\` removes)"
if [ -z "$DESTDIR" ]; then
    sh "$here/service-user.sh" /
fi

cat <<EOF

agentspoonsd is installed. Next steps:
  1. Make a token for each client (appended to $confdir/tokens.toml; the token is printed once):
       $bindir/agentspoonsd token new dashboard --config $confdir/agentspoonsd.toml
  2. Check the config:
       $bindir/agentspoonsd check-config --config $confdir/agentspoonsd.toml
  3. Start it, now and at every boot:
       systemctl daemon-reload && systemctl enable --now agentspoonsd
     (optional: systemctl enable --now agentspoonsd.socket, so restarts refuse no connection)
  4. Watch it:
       systemctl status agentspoonsd
       journalctl -u agentspoonsd -o cat | jq
  After editing the config: systemctl reload agentspoonsd
  To remove it: make uninstall (tokens, state and an edited config stay; PURGE=1 removes them)
EOF
if [ -n "$kept" ]; then
    echo
    echo "Note: your edited$kept kept; compare with the .new file(s) beside it."
fi
if [ -n "$DESTDIR" ]; then
    echo
    echo "(staged under DESTDIR=$DESTDIR: nothing on this machine changed; once unpacked, run"
    echo " build/service-user.sh to create the agentspoonsd user and give it the tokens file)"
fi
