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
#
# Installing on this machine (no DESTDIR) also creates that user and gives it the tokens file
# (build/service-user.sh); a package runs that script after unpacking.
#
# DESTDIR stages the tree for a package; empty, it installs on this machine (as root).
# The binary, units and schema are replaced on every install (an upgrade). The config and env file
# are the operator's: one that differs from the shipped version is never overwritten; the new
# version is installed beside it as *.new, and the script says so.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
binary=${1:-$top/dist/agentspoonsd}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
bindir=$PREFIX/bin
unitdir=/etc/systemd/system
confdir=/etc/agentspoonsd

if [ ! -x "$binary" ]; then
    echo "install.sh: no executable at $binary (run: make binary)" >&2
    exit 1
fi

install -d -m 0755 "$DESTDIR$bindir" "$DESTDIR$unitdir" "$DESTDIR$confdir"
install -m 0755 "$binary" "$DESTDIR$bindir/agentspoonsd.tmp"
mv -f "$DESTDIR$bindir/agentspoonsd.tmp" "$DESTDIR$bindir/agentspoonsd"  # atomic: safe while running
echo "installed $DESTDIR$bindir/agentspoonsd"

# The unit names /usr/local/bin/agentspoonsd; another PREFIX rewrites that one path.
sed "s|/usr/local/bin/agentspoonsd|$bindir/agentspoonsd|" "$top/systemd/agentspoonsd.service" \
    >"$DESTDIR$unitdir/agentspoonsd.service.tmp"
chmod 0644 "$DESTDIR$unitdir/agentspoonsd.service.tmp"
mv -f "$DESTDIR$unitdir/agentspoonsd.service.tmp" "$DESTDIR$unitdir/agentspoonsd.service"
install -m 0644 "$top/systemd/agentspoonsd.socket" "$DESTDIR$unitdir/agentspoonsd.socket"
echo "installed $DESTDIR$unitdir/agentspoonsd.service and agentspoonsd.socket"
install -m 0644 "$top/config/agentspoonsd.schema.json" "$DESTDIR$confdir/agentspoonsd.schema.json"
install -d -m 0755 "$DESTDIR/etc/sysusers.d"
install -m 0644 "$top/systemd/agentspoonsd.sysusers" "$DESTDIR/etc/sysusers.d/agentspoonsd.conf"
echo "installed $DESTDIR/etc/sysusers.d/agentspoonsd.conf"

kept=""
# install_config SOURCE NAME MODE: never replaces an operator's edits.
install_config() {
    target="$DESTDIR$confdir/$2"
    if [ ! -e "$target" ]; then
        install -m "$3" "$1" "$target"
        echo "installed $target"
    elif cmp -s "$1" "$target"; then
        echo "unchanged $target"
    else
        install -m "$3" "$1" "$target.new"
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
    echo "installed $DESTDIR$confdir/tokens.toml"
fi
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
