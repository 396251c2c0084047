#!/bin/sh
# Make sure systemd-analyze is installed (Debian's systemd package; it brings libseccomp too),
# and /bin/kill (procps), which the unit's ExecReload= names. The tests check the unit with them
# offline: no running systemd is needed, only the tools.
# As root on a fresh Debian machine: apt-get update once, then apt-get install -y systemd procps.
set -eu
missing=""
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
[ -x /bin/kill ] || missing="$missing procps"
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-systemd: missing; as root: apt-get install -y$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-systemd: installing Debian's$missing (for systemd-analyze, /bin/kill)" >&2
# One apt at a time: test workers (pytest -n) may ask for two packages at once.
exec 9>/var/lock/agentspoonsd-apt.lock
flock 9
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
command -v systemd-analyze >/dev/null && [ -x /bin/kill ]
