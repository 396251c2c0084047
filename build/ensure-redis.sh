#!/bin/sh
# Make sure redis-server is installed (Debian's redis-server package): the cluster tests start
# their own on a free port with a temporary directory, so no running service is needed.
# As root on a fresh Debian machine: apt-get update once, then apt-get install -y redis-server.
set -eu
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-redis: missing; as root: apt-get install -y redis-server" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-redis: installing Debian's redis-server (for the cluster tests)" >&2
# One apt at a time: test workers (pytest -n) may ask for two packages at once.
exec 9>/var/lock/agentspoonsd-apt.lock
flock 9
apt-get update -qq
apt-get install -y -qq --no-install-recommends redis-server >/dev/null
command -v redis-server >/dev/null
