#!/bin/sh
# Freeze the daemon into one executable: build/freeze.sh PYINSTALLER OUTPUT
# Called by `make binary`, which decides when a rebuild is due (sources newer than the output).
# Concurrent builds are serialised by a lock, and the result replaces OUTPUT atomically, so a test
# running the previous binary never sees a half-written file.
set -eu
pyinstaller=$1
output=$2
here=$(cd "$(dirname "$0")" && pwd)
work="$here/work"
mkdir -p "$work" "$(dirname "$output")"
exec 9>"$work/.lock"
flock 9
start=$(date +%s)
"$pyinstaller" --noconfirm --log-level WARN \
    --workpath "$work" --distpath "$work/dist" "$here/agentspoonsd.spec"
mv -f "$work/dist/agentspoonsd" "$output"
echo "froze $output ($(du -m "$output" | cut -f1) MB) in $(($(date +%s) - start)) s"
