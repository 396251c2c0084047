#!/bin/sh
# Create the service's system user and give it the tokens file: build/service-user.sh [ROOT]
#
# What build/install.sh runs after installing on this machine (ROOT=/), and what a package's
# post-install step should run. ROOT is the root of the tree to act on (a test uses a staged one).
#   1. systemd-sysusers creates user and group agentspoonsd from $ROOT/etc/sysusers.d/agentspoonsd.conf
#      (nothing happens when they exist);
#   2. $ROOT/etc/agentspoonsd/tokens.toml becomes theirs, mode 0600: the daemon reads it as that
#      user, `agentspoonsd token new|revoke` (run as root) keep its owner and mode.
set -eu
root=${1:-/}
root=${root%/}
conf=$root/etc/sysusers.d/agentspoonsd.conf
tokens=$root/etc/agentspoonsd/tokens.toml

if [ -n "$root" ]; then
    systemd-sysusers --root="$root" "$conf"
else
    systemd-sysusers "$conf"
fi
# Ids from the tree's own passwd and group files: under a staged ROOT the host's names mean nothing.
uid=$(awk -F: '$1 == "agentspoonsd" { print $3 }' "$root/etc/passwd")
gid=$(awk -F: '$1 == "agentspoonsd" { print $3 }' "$root/etc/group")
if [ -z "$uid" ] || [ -z "$gid" ]; then
    echo "service-user.sh: no agentspoonsd user in $root/etc/passwd" >&2
    exit 1
fi
if [ -e "$tokens" ]; then
    chown "$uid:$gid" "$tokens"
    chmod 0600 "$tokens"
    echo "tokens file $tokens: owner agentspoonsd ($uid:$gid), mode 0600"
fi
