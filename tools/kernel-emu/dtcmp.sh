#!/usr/bin/env bash
# f16/bf16 loss kernels: for each case file, the DT build (inputs stored as f16/bf16) against the f32
# build on the same DT-rounded inputs; the dumps (loss, lse, dτ, gradients) must be identical
# (accumulation is f32 in both). loss_<dt> also checks out_t == round(out_f32) in infonce_finish.
# Cases from a directory named hard* run with EMU_SELECT=1 (thresholds from select_kth_f32).
OUT=${OUT:-$(cd "$(dirname "$0")" && pwd)/out}
mkdir -p "$OUT/dumps"
for dt in f16 bf16; do
  for f in "$@"; do
    b=$(basename "$f" .txt); d=$(basename "$(dirname "$f")")
    sel=""; case "$d" in hard*) sel=1 ;; esac
    EMU_SELECT=$sel EMU_TOL=1 EMU_DUMP="$OUT/dumps/$d.$b.$dt" "$OUT/loss_$dt" "$f" > /dev/null; r1=$?
    EMU_SELECT=$sel EMU_TOL=1 EMU_ROUND=$dt EMU_DUMP="$OUT/dumps/$d.$b.$dt.ref" "$OUT/loss" "$f" > /dev/null
    if cmp -s "$OUT/dumps/$d.$b.$dt" "$OUT/dumps/$d.$b.$dt.ref"; then echo "same $dt $f rc=$r1"; else echo "DIFF $dt $f rc=$r1"; fi
  done
done
