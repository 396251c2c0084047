#!/bin/sh
# Make sure Debian's Chromium is installed: the dashboard's browser test (tests/test_dashboard_browser.py)
# drives it headless through Playwright, whose own browser downloads are never used.
# As root on a fresh Debian machine: apt-get update once, then apt-get install -y chromium.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-chromium: missing; as root: apt-get install -y --no-install-recommends chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-chromium: installing Debian's chromium (for the dashboard's browser test)" >&2
# One apt at a time: test workers (pytest -n) may ask for two packages at once.
exec 9>/var/lock/agentspoonsd-apt.lock
flock 9
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
[ -x /usr/bin/chromium ]
