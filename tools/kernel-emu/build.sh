#!/usr/bin/env bash
# Builds the host emulator binaries (see README.md) into $OUT (default tools/kernel-emu/out) from
# the kernels in $SRC (default kernels/ of this repository). ONLY=mma builds only the tensor-core
# harnesses (mma_f16, mma_bf16; what tests/kernel_emu.rs runs).
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${SRC:-$HERE/../../kernels}
OUT=${OUT:-$HERE/out}
mkdir -p "$OUT/shim" "$OUT/obj"
cp "$SRC"/*.cu "$SRC"/*.cuh "$OUT/shim/"
# CUDA headers -> emu.h; dynamic shared memory (`extern __shared__`) -> the launch's buffer.
"$HERE/shim.sh" "$OUT/shim"
CXX="g++ -O1 -std=c++17 -pthread -U_FORTIFY_SOURCE -I$HERE -I$OUT"
printf '#include "emu.h"\n#include "shim/infonce_mma.cu"\n' > "$OUT/obj/tu_mma.cpp"
pids=()
for dt in f16 bf16; do
    $CXX -DFUSED_INFONCE_EMU -DDT=$dt -c "$HERE/mma.cpp" -o "$OUT/obj/mma_$dt.o" & pids+=($!)
done
$CXX -DFUSED_INFONCE_EMU -c "$OUT/obj/tu_mma.cpp" -o "$OUT/obj/tu_mma.o" & pids+=($!)
$CXX -c "$HERE/emu.cpp" -o "$OUT/obj/emu.o" & pids+=($!)
if [ "${ONLY:-}" != mma ]; then
    for f in infonce normalize select metrics unfused steps; do
        printf '#include "emu.h"\n#include "shim/%s.cu"\n' $f > "$OUT/obj/tu_$f.cpp"
        $CXX -c "$OUT/obj/tu_$f.cpp" -o "$OUT/obj/tu_$f.o" & pids+=($!)
    done
fi
for p in "${pids[@]}"; do wait "$p"; done
for dt in f16 bf16; do $CXX "$OUT/obj/mma_$dt.o" "$OUT/obj/emu.o" "$OUT/obj/tu_mma.o" -o "$OUT/mma_$dt"; done
if [ "${ONLY:-}" != mma ]; then
    K="$OUT/obj/emu.o $OUT/obj/tu_infonce.o $OUT/obj/tu_normalize.o $OUT/obj/tu_select.o"
    $CXX "$HERE/loss.cpp" $K -o "$OUT/loss"
    $CXX -DDT=f16 -DTT=f16 "$HERE/loss.cpp" $K -o "$OUT/loss_f16"
    $CXX -DDT=bf16 -DTT=bf16 "$HERE/loss.cpp" $K -o "$OUT/loss_bf16"
    $CXX "$HERE/sel.cpp" "$OUT/obj/emu.o" "$OUT/obj/tu_select.o" -o "$OUT/sel"
    $CXX "$HERE/met.cpp" "$OUT/obj/emu.o" "$OUT/obj/tu_metrics.o" -o "$OUT/met"
    $CXX "$HERE/unf.cpp" "$OUT/obj/emu.o" "$OUT/obj/tu_unfused.o" "$OUT/obj/tu_steps.o" -o "$OUT/unf"
    $CXX "$HERE/nrm.cpp" "$OUT/obj/emu.o" "$OUT/obj/tu_normalize.o" -o "$OUT/nrm"
    $CXX "$HERE/elt.cpp" "$OUT/obj/emu.o" "$OUT/obj/tu_steps.o" -o "$OUT/elt"
fi
echo "built into $OUT"
