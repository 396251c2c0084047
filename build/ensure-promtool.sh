#!/bin/sh
# Make sure promtool is installed (Debian's prometheus package): the monitoring tests run
# `promtool check rules` and `promtool test rules` on monitoring/; no Prometheus server is started.
# As root on a fresh Debian machine: apt-get update once, then apt-get install -y prometheus.
# Idempotent and quiet: does nothing when promtool is already on PATH. The package also ships a
# Prometheus server: it is not started here (policy-rc.d), though on a systemd host the package
# enables its unit for the next boot (`systemctl disable prometheus` where that is unwanted).
set -eu
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-promtool: missing; as root: apt-get install -y prometheus" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-promtool: installing Debian's prometheus package (for promtool)" >&2
# One apt at a time: test workers (pytest -n) may ask for two packages at once.
exec 9>/var/lock/agentspoonsd-apt.lock
flock 9
apt-get update -qq
# policy-rc.d 101: the package's postinst must not start a Prometheus server on this machine.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null
