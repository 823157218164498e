#!/usr/bin/env bash
# Turns copies of kernels/*.cu{,h} in DIR into host C++ for the emulator (emu.h): the CUDA headers
# become emu.h and each `extern __shared__` array becomes the launch's dynamic shared memory
# (emu_dyn_smem()). Fails when a declaration it rewrites is not found, so a kernel edit cannot
# silently leave a CUDA construct the host compiler would misread.
set -euo pipefail
DIR=$1
sed -i 's|#include <cuda_bf16.h>|#include "emu.h"|; s|#include <cuda_fp16.h>||' "$DIR/common.cuh"
sed -i 's/extern __shared__ float warp_bins\[\];/float* const warp_bins = (float*)emu_dyn_smem();/' "$DIR/metrics.cu"
sed -i 's/extern __shared__ __align__(128) unsigned char smem\[\];/unsigned char* const smem = emu_dyn_smem();/' "$DIR/infonce_mma.cu"
if grep -l 'extern __shared__' "$DIR"/*.cu "$DIR"/*.cuh; then
    echo "shim.sh: the files above declare dynamic shared memory this script does not rewrite" >&2
    exit 1
fi
grep -q 'emu_dyn_smem' "$DIR/infonce_mma.cu" || { echo "shim.sh: the smem declaration of infonce_mma.cu changed" >&2; exit 1; }
grep -q 'emu_dyn_smem' "$DIR/metrics.cu" || { echo "shim.sh: the warp_bins declaration of metrics.cu changed" >&2; exit 1; }
grep -q '#include "emu.h"' "$DIR/common.cuh" || { echo "shim.sh: common.cuh no longer includes <cuda_bf16.h>" >&2; exit 1; }
