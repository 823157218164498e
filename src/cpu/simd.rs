//! The element-wise kernels of a tile row (max, `exp` with sums, scaling, conversion), written
//! as plain loops over 16 independent lanes so that LLVM vectorises them, and compiled twice:
//! once for AVX2 + FMA (chosen at run time when the CPU has both) and once for the baseline target.
//!
//! Every function is deterministic: a sum is accumulated in 16 lanes in index order and the lanes
//! are added in a fixed order, whatever the thread, so results depend only on the inputs and on
//! which of the two builds runs (the same on one machine; the AVX2 build fuses multiply-adds, so
//! the two differ in the last bit).
//!
//! [`exp`] is a Cody–Waite range reduction and the degree-6 Cephes polynomial: about 2 ulp over
//! `[−87.3, 88]`, exactly 0 below (`exp(−∞) = 0`, subnormal results flushed), NaN for NaN. It never
//! sees an unshifted logit: the callers subtract a running max or the LSE first (spec/losses.md).

use std::sync::OnceLock;

/// Lanes of the unrolled loops (two AVX2 registers of f32).
const LANES: usize = 16;

/// Whether the AVX2 + FMA build of the kernels runs on this CPU (checked once).
#[inline]
fn use_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines `pub(crate) fn $name` that runs `$imp::<true>` compiled for AVX2 + FMA when the CPU has
/// them (fused multiply-adds), else the baseline build `$imp::<false>` (separate multiply and add).
macro_rules! multiversion {
    (
        $(#[$doc:meta])*
        fn $name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty => $fast:ident, $imp:ident;
    ) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                // SAFETY: `use_avx2` checked at run time that the CPU supports AVX2 and FMA, the
                // only requirement of a `#[target_feature]` function; the body is safe code.
                return unsafe { $fast($($arg),*) };
            }
            $imp::<false>($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $fast($($arg: $ty),*) -> $ret {
            $imp::<true>($($arg),*)
        }
    };
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n · LN2_HI` is exact for |n| ≤ 2^15.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;
/// Below this `exp` is subnormal: returned as 0.
const EXP_LO: f32 = -87.336_54;
/// Above this the scale 2^n would overflow (callers never pass positive arguments this large).
const EXP_HI: f32 = 88.0;

/// `a · b + c`, fused when `FMA` (one rounding; only in the AVX2 + FMA build, where it is one
/// instruction), else a multiply and an add.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` in f32 (about 2 ulp; 0 for `x < −87.34`, including −∞; NaN for NaN), without FMA.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_v::<false>(x)
}

/// [`exp`], with fused multiply-adds when `FMA`.
#[inline(always)]
fn exp_v<const FMA: bool>(x: f32) -> f32 {
    // `x < LO` is false for NaN, so NaN flows through the arithmetic and comes out NaN.
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let xc = if xc > EXP_HI { EXP_HI } else { xc };
    let t = madd::<FMA>(xc, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, xc));
    let mut p = 1.987_569_2e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let e = madd::<FMA>(p, r * r, r) + 1.0;
    // n + 127 in the exponent field: t's bits minus MAGIC's are n (same exponent, n < 2^22).
    let bits = ((t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32) + 127) << 23;
    let y = e * f32::from_bits(bits as u32);
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

/// Adds the 16 lanes in a fixed order.
#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    let mut s = [0.0f32; 4];
    for (l, v) in acc.iter().enumerate() {
        s[l % 4] += v;
    }
    (s[0] + s[2]) + (s[1] + s[3])
}

#[inline(always)]
fn max_impl<const FMA: bool>(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            // NaN-ignoring: a NaN element never replaces the running max (the callers' sums
            // still see it, so it propagates there).
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

multiversion! {
    /// The largest element, ignoring NaN; −∞ for an empty slice or one of −∞ and NaN only.
    fn max(x: &[f32]) -> f32 => max_avx2, max_impl;
}

#[inline(always)]
fn exp_sum_impl<const FMA: bool>(s: &[f32], alpha: f32, shift: f32, out: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let n = s.len().min(out.len());
    let (s, out) = (&s[..n], &mut out[..n]);
    let mut sc = s.chunks_exact(LANES);
    let mut oc = out.chunks_exact_mut(LANES);
    for (c, o) in (&mut sc).zip(&mut oc) {
        for l in 0..LANES {
            let e = exp_v::<FMA>(madd::<FMA>(c[l], alpha, -shift));
            o[l] = e;
            acc[l] += e;
        }
    }
    for (l, (&v, o)) in sc.remainder().iter().zip(oc.into_remainder()).enumerate() {
        let e = exp_v::<FMA>(madd::<FMA>(v, alpha, -shift));
        *o = e;
        acc[l] += e;
    }
    hsum(acc)
}

multiversion! {
    /// `out_j = exp(α s_j − shift)`; returns `Σ out_j`.
    fn exp_sum(s: &[f32], alpha: f32, shift: f32, out: &mut [f32]) -> f32
        => exp_sum_avx2, exp_sum_impl;
}

#[inline(always)]
fn exp_sum_dot_impl<const FMA: bool>(
    s: &[f32],
    alpha: f32,
    shift: f32,
    out: &mut [f32],
) -> (f32, f32) {
    let mut acc = [0.0f32; LANES];
    let mut dot = [0.0f32; LANES];
    let n = s.len().min(out.len());
    let (s, out) = (&s[..n], &mut out[..n]);
    let mut sc = s.chunks_exact(LANES);
    let mut oc = out.chunks_exact_mut(LANES);
    for (c, o) in (&mut sc).zip(&mut oc) {
        for l in 0..LANES {
            let z = c[l] * alpha;
            let e = exp_v::<FMA>(z - shift);
            o[l] = e;
            acc[l] += e;
            // Masked entries (z = −∞, e = 0) add nothing rather than 0 · ∞ = NaN.
            dot[l] += if e > 0.0 { e * z } else { 0.0 };
        }
    }
    for (l, (&v, o)) in sc.remainder().iter().zip(oc.into_remainder()).enumerate() {
        let z = v * alpha;
        let e = exp_v::<FMA>(z - shift);
        *o = e;
        acc[l] += e;
        dot[l] += if e > 0.0 { e * z } else { 0.0 };
    }
    (hsum(acc), hsum(dot))
}

multiversion! {
    /// As [`exp_sum`], also returning `Σ out_j z_j` with `z_j = α s_j` (entries whose `out_j` is 0
    /// add nothing).
    fn exp_sum_dot(s: &[f32], alpha: f32, shift: f32, out: &mut [f32]) -> (f32, f32)
        => exp_sum_dot_avx2, exp_sum_dot_impl;
}

#[inline(always)]
fn exp_scale_impl<const FMA: bool>(s: &[f32], alpha: f32, shift: f32, scale: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(s) {
        *o = scale * exp_v::<FMA>(madd::<FMA>(v, alpha, -shift));
    }
}

multiversion! {
    /// `out_j = scale · exp(α s_j − shift)`.
    fn exp_scale(s: &[f32], alpha: f32, shift: f32, scale: f32, out: &mut [f32]) -> ()
        => exp_scale_avx2, exp_scale_impl;
}

#[inline(always)]
fn scale_impl<const FMA: bool>(x: &mut [f32], c: f32) {
    for v in x {
        *v *= c;
    }
}

multiversion! {
    /// `x_j *= c`.
    fn scale(x: &mut [f32], c: f32) -> () => scale_avx2, scale_impl;
}

#[inline(always)]
fn add_assign_impl<const FMA: bool>(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

multiversion! {
    /// `x_j += y_j`.
    fn add_assign(x: &mut [f32], y: &[f32]) -> () => add_assign_avx2, add_assign_impl;
}

#[inline(always)]
fn axpy64_impl<const FMA: bool>(y: &mut [f64], a: f64, x: &[f32]) {
    for (d, &s) in y.iter_mut().zip(x) {
        *d += a * s as f64;
    }
}

multiversion! {
    /// `y_j += a · x_j` into f64.
    fn axpy64(y: &mut [f64], a: f64, x: &[f32]) -> () => axpy64_avx2, axpy64_impl;
}

#[inline(always)]
fn col_max_impl<const FMA: bool>(row: &[f32], m: &mut [f32]) {
    for (a, &v) in m.iter_mut().zip(row) {
        *a = if v > *a { v } else { *a };
    }
}

multiversion! {
    /// `m_j = max(m_j, row_j)` ignoring NaN (a column-wise max over rows).
    fn col_max(row: &[f32], m: &mut [f32]) -> () => col_max_avx2, col_max_impl;
}

#[inline(always)]
fn exp_acc_cols_impl<const FMA: bool>(
    s: &[f32],
    alpha: f32,
    shift: &[f32],
    sum: &mut [f32],
    zsum: &mut [f32],
    learnable: bool,
) {
    let n = s.len().min(shift.len()).min(sum.len());
    if learnable {
        for j in 0..n.min(zsum.len()) {
            let z = s[j] * alpha;
            let e = exp_v::<FMA>(z - shift[j]);
            sum[j] += e;
            zsum[j] += if e > 0.0 { e * z } else { 0.0 };
        }
    } else {
        for j in 0..n {
            sum[j] += exp_v::<FMA>(madd::<FMA>(s[j], alpha, -shift[j]));
        }
    }
}

multiversion! {
    /// Column-wise online sums over one tile row: `sum_j += exp(α s_j − shift_j)` and, when
    /// `learnable`, `zsum_j += exp(α s_j − shift_j) α s_j`.
    fn exp_acc_cols(
        s: &[f32], alpha: f32, shift: &[f32], sum: &mut [f32], zsum: &mut [f32], learnable: bool
    ) -> ()
        => exp_acc_cols_avx2, exp_acc_cols_impl;
}

#[inline(always)]
fn exp_scale_cols_add_impl<const FMA: bool>(
    s: &[f32],
    alpha: f32,
    shift: &[f32],
    scale: &[f32],
    out: &mut [f32],
) {
    let n = s.len().min(shift.len()).min(scale.len()).min(out.len());
    for j in 0..n {
        out[j] += scale[j] * exp_v::<FMA>(madd::<FMA>(s[j], alpha, -shift[j]));
    }
}

multiversion! {
    /// `out_j += scale_j · exp(α s_j − shift_j)` (a column-wise backward weight added to a row's).
    fn exp_scale_cols_add(
        s: &[f32], alpha: f32, shift: &[f32], scale: &[f32], out: &mut [f32]
    ) -> ()
        => exp_scale_cols_add_avx2, exp_scale_cols_add_impl;
}

/// Widens, in place, the f32 values stored in the first `buf.len()` f32 slots of `buf`'s memory
/// (the gradient accumulators of the tile passes) to f64: element `i` becomes f32 slot `i`.
/// Runs in halving steps from the top, each in parallel: the elements `[lo, hi)` written in a step
/// read slots that live in the elements `[lo/2, lo)`, which that step does not write.
pub(crate) fn widen_in_place(buf: &mut [f64]) {
    use rayon::prelude::*;
    let mut hi = buf.len();
    while hi > 1 {
        let lo = hi.div_ceil(2);
        let (src, dst) = buf[..hi].split_at_mut(lo);
        let src: &[f32] = bytemuck::cast_slice(src);
        dst.par_iter_mut()
            .enumerate()
            .for_each(|(k, o)| *o = src[lo + k] as f64);
        hi = lo;
    }
    if let Some(first) = buf.first_mut() {
        *first = bytemuck::cast_slice::<f64, f32>(std::slice::from_ref(first))[0] as f64;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn widening_in_place_keeps_every_value() {
        for n in [0usize, 1, 2, 3, 7, 64, 1001] {
            let want: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
            let mut buf = vec![0.0f64; n];
            bytemuck::cast_slice_mut::<f64, f32>(&mut buf)[..n].copy_from_slice(&want);
            widen_in_place(&mut buf);
            assert!(
                buf.iter().zip(&want).all(|(&a, &b)| a == b as f64),
                "n = {n}"
            );
        }
    }

    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range_and_exact_at_the_ends() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn both_builds_agree_and_each_is_deterministic() {
        let s: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut a = vec![0.0; s.len()];
        let mut b = vec![0.0; s.len()];
        let sa = exp_sum(&s, 10.0, 10.0, &mut a);
        let sb = exp_sum_impl::<false>(&s, 10.0, 10.0, &mut b);
        // The AVX2 build fuses multiply-adds (α s − shift rounded once, not twice): the same up
        // to the rounding of the argument, ulp(10) = 1e-6 relative here.
        assert!(((sa - sb) / sb).abs() < 2e-6);
        assert!(a.iter().zip(&b).all(|(x, y)| ((x - y) / y).abs() < 2e-6));
        // And every call of one build is bitwise the same.
        let mut c = vec![0.0; s.len()];
        assert_eq!(sa.to_bits(), exp_sum(&s, 10.0, 10.0, &mut c).to_bits());
        assert_eq!(a, c);
        let want: f64 = s.iter().map(|&v| (10.0 * v as f64 - 10.0).exp()).sum();
        assert!(((sa as f64 - want) / want).abs() < 1e-6);
        assert_eq!(max(&s), 1.0);
        assert_eq!(max(&[f32::NAN, -3.0]), -3.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
