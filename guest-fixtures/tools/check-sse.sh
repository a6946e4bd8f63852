#!/usr/bin/env bash
# List the functions of each guest image that contain SSE instructions (any xmm register or
# MXCSR access). Under `--exec emulated` every SSE instruction ends the VM, so paths that run
# emulated must not reach these. core::fmt's number formatting is expected to show up (used
# only in native mode); anything else deserves a look.
#
# usage: tools/check-sse.sh [image...]   (default: every target/release/<fixture>)
set -euo pipefail
cd "$(dirname "$0")/.."
images=("$@")
if [ ${#images[@]} -eq 0 ]; then
    for src in fixtures/src/bin/*.rs; do
        images+=("target/release/$(basename "$src" .rs)")
    done
fi
for img in "${images[@]}"; do
    echo "== $img"
    objdump -d --no-show-raw-insn -M intel "$img" |
        awk '/^[0-9a-f]+ <.*>:$/ { fn = $2 }
             /xmm|ymm|mxcsr/ { n[fn]++ }
             END { for (f in n) printf "  %4d  %s\n", n[f], f }' |
        sort -k2 | { c++filt 2>/dev/null || cat; }
done
