#!/usr/bin/env bash
# Runs the tensor-core kernels (mma_f16, mma_bf16) on the emulator over the cases of
# emu_mma_dump.rs: every case with the device's split (SMS = 132) and with one split (SMS = 1:
# the whole 3-stage cp.async pipeline), exact, then with the gradient filter at θ = 2^-12 and
# θ = 0.99 (tiles really skipped: the gradients change, within the documented bound).
# Needs the binaries of build.sh in $OUT and the crate's release example built here.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$HERE/../..
OUT=${OUT:-$HERE/out}
CASES=${CASES:-$OUT/mma-cases}
mkdir -p "$ROOT/examples"
cp "$HERE/emu_mma_dump.rs" "$ROOT/examples/"
trap 'rm -f "$ROOT/examples/emu_mma_dump.rs"; rmdir "$ROOT/examples" 2>/dev/null || true' EXIT
(cd "$ROOT" && cargo build --quiet --release --example emu_mma_dump)
bin=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/emu_mma_dump
fail=0
for dt in f16 bf16; do
    rm -rf "${CASES:?}/$dt" && mkdir -p "$CASES/$dt"
    "$bin" "$CASES/$dt" $dt
    for run in "132 0" "1 0" "132 0.000244140625" "7 0.99"; do
        set -- $run
        ok=0 bad=0
        for f in "$CASES/$dt"/case*.txt; do
            if EMU_FILTER=$2 "$OUT/mma_$dt" "$f" "$1" > "$f.$1.$2.log" 2>&1; then ok=$((ok + 1)); else
                bad=$((bad + 1)); grep -E "FAIL|FAULT" "$f.$1.$2.log" | head -3; fi
        done
        echo "mma_$dt SMS=$1 filter=$2: $ok ok, $bad failed"
        [ "$bad" = 0 ] || fail=1
    done
done
exit $fail
