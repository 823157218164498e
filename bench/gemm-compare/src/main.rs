//! Single-threaded f32 matrix products of three crates on 2048³ and on the block shapes of the
//! fused CPU backend (row-major operands as it passes them: `S = A·Bᵀ`, `P·K`, `Pᵀ·A`): GFLOP/s,
//! median and best of 5 timings of enough repetitions for about 4 GFLOP each. `--par` also times
//! faer's own parallel product (`Par::rayon`, all threads) on large shapes.

use std::time::Instant;

/// Deterministic values in [-0.5, 0.5).
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f32 / (1u64 << 31) as f32 - 0.5
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Lib {
    Faer,
    MatrixMultiply,
    Gemm,
}

/// `c (m×n) = op(a) · op(b)`: `a` is m×k row-major, or k×m when `at`; `b` is k×n row-major, or
/// n×k when `bt`.
#[allow(clippy::too_many_arguments)]
fn product(
    lib: Lib,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    at: bool,
    b: &[f32],
    bt: bool,
    c: &mut [f32],
) {
    let (ars, acs) = if at {
        (1isize, m as isize)
    } else {
        (k as isize, 1)
    };
    let (brs, bcs) = if bt {
        (1isize, k as isize)
    } else {
        (n as isize, 1)
    };
    match lib {
        // SAFETY: the strides describe the slices' own row-major layouts (sizes checked by the
        // callers: a and b hold m·k and k·n values, c m·n).
        Lib::MatrixMultiply => unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                ars,
                acs,
                b.as_ptr(),
                brs,
                bcs,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        },
        // SAFETY: as above.
        Lib::Gemm => unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                acs,
                ars,
                b.as_ptr(),
                bcs,
                brs,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        },
        Lib::Faer => {
            // SAFETY: as above.
            let am = unsafe { faer::MatRef::from_raw_parts(a.as_ptr(), m, k, ars, acs) };
            let bm = unsafe { faer::MatRef::from_raw_parts(b.as_ptr(), k, n, brs, bcs) };
            let cm = faer::MatMut::from_row_major_slice_mut(c, m, n);
            faer::linalg::matmul::matmul(cm, faer::Accum::Replace, am, bm, 1.0f32, faer::Par::Seq);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let libs: Vec<(Lib, &str)> = [
        (Lib::Faer, "faer"),
        (Lib::MatrixMultiply, "mm"),
        (Lib::Gemm, "gemm"),
    ]
    .into_iter()
    .filter(|(_, name)| {
        !args
            .iter()
            .any(|a| ["faer", "mm", "gemm"].contains(&a.as_str()))
            || args.iter().any(|a| a == name)
    })
    .collect();
    // (m, n, k, a transposed, b transposed, what)
    let shapes = [
        (2048, 2048, 2048, false, false, "2048³"),
        (128, 512, 128, false, true, "S 128×512×128"),
        (128, 256, 128, false, true, "S 128×256×128"),
        (256, 256, 128, false, true, "S 256×256×128"),
        (128, 128, 512, false, false, "P·K 128×128×512"),
        (256, 128, 256, false, false, "P·K 256×128×256"),
        (512, 128, 128, true, false, "Pᵀ·A 512×128×128"),
        (256, 128, 256, true, false, "Pᵀ·A 256×128×256"),
        (128, 256, 768, false, true, "S 128×256×768"),
        (128, 768, 256, false, false, "P·B 128×768×256"),
        (256, 768, 128, true, false, "Pᵀ·A 256×768×128"),
        (256, 256, 768, false, true, "S 256×256×768"),
        (256, 768, 256, false, false, "G·B 256×768×256"),
        (256, 768, 256, true, false, "Gᵀ·A 256×768×256"),
    ];
    for (m, n, k, at, bt, what) in shapes {
        let (a, b) = (fill(m * k, 1), fill(k * n, 2));
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let reps = ((4e9 / flops) as usize).clamp(1, 100_000);
        for &(lib, name) in &libs {
            product(lib, m, n, k, &a, at, &b, bt, &mut c);
            let mut t: Vec<f64> = (0..5)
                .map(|_| {
                    let s = Instant::now();
                    for _ in 0..reps {
                        product(lib, m, n, k, &a, at, &b, bt, &mut c);
                    }
                    s.elapsed().as_secs_f64() / reps as f64
                })
                .collect();
            t.sort_by(f64::total_cmp);
            println!(
                "{what:22} {name:5} median {:6.1} GFLOP/s  best {:6.1}",
                flops / t[2] / 1e9,
                flops / t[0] / 1e9
            );
        }
    }
    if args.iter().any(|a| a == "--par") {
        for (m, n, k) in [(2048, 2048, 2048), (4096, 4096, 768), (4096, 768, 4096)] {
            let (a, b) = (fill(m * k, 1), fill(k * n, 2));
            let mut c = vec![0f32; m * n];
            let mut t: Vec<f64> = (0..6)
                .map(|_| {
                    let s = Instant::now();
                    faer::linalg::matmul::matmul(
                        faer::MatMut::from_row_major_slice_mut(&mut c, m, n),
                        faer::Accum::Replace,
                        faer::MatRef::from_row_major_slice(&a, m, k),
                        faer::MatRef::from_row_major_slice(&b, k, n),
                        1.0f32,
                        faer::Par::rayon(0),
                    );
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            println!(
                "{m}×{n}×{k} faer Par::rayon: {:.0} GFLOP/s",
                2.0 * (m * n * k) as f64 / t[3] / 1e9
            );
        }
    }
}
