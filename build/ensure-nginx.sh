#!/bin/sh
# Make sure nginx is installed (Debian's nginx package): the one-origin test starts its own nginx
# in front of a daemon, with a config written from docs/SCALING.md into a temporary directory, so
# no running service is needed (and none is started: only the binary is used).
# As root on a fresh Debian machine: apt-get update once, then apt-get install -y nginx.
set -eu
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-nginx: missing; as root: apt-get install -y nginx" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-nginx: installing Debian's nginx (for the one-origin test)" >&2
# One apt at a time: test workers (pytest -n) may ask for two packages at once.
exec 9>/var/lock/agentspoonsd-apt.lock
flock 9
apt-get update -qq
apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 nginx >/dev/null
[ -x /usr/sbin/nginx ]
