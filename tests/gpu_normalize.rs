//! CPU–GPU parity of the row L2 normalisation kernels (forward and backward), for every dtype,
//! on shapes that are not multiples of the block's rows or the warp width. Outputs are poisoned
//! (NaN) before each launch. Without a GPU each test prints `skipped: no CUDA device` and returns.

mod support;

use support::{rel_l2, rel_l2_floor};

use fused_infonce::cuda::steps::normalize as gpu_norm;
use fused_infonce::cuda::{DeviceElement, DeviceMatrix, Gpu};
use fused_infonce::reference::normalize::{normalize_rows, normalize_rows_backward};
use fused_infonce::{bf16, f16, Element, MatRef};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn tolerance<T: Element>() -> f64 {
    match T::DTYPE {
        fused_infonce::DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

fn check<T: DeviceElement>(gpu: &Gpu, rows: usize, cols: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x: Vec<T> = (0..rows * cols)
        .map(|_| T::from_f64(rng.random_range(-2.0..2.0)))
        .collect();
    if rows > 2 {
        // One all-zero row exercises the ε clamp.
        for v in &mut x[cols..2 * cols] {
            *v = T::from_f64(0.0);
        }
    }
    let du: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();

    // CPU reference on the same (rounded) inputs.
    let x64: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let du64: Vec<f64> = du.iter().map(|&v| v as f64).collect();
    let (u_ref, inv_ref) = normalize_rows(&x64, cols);
    let dx_ref = normalize_rows_backward(&u_ref, &inv_ref, &du64, cols);

    let xm = MatRef::new("x", &x, rows, cols).unwrap();
    let xd = DeviceMatrix::upload(gpu, &xm).unwrap();
    let nan = T::from_f64(f64::NAN);
    let poison_u = vec![nan; rows * cols];
    let mut ud =
        DeviceMatrix::upload(gpu, &MatRef::new("u", &poison_u, rows, cols).unwrap()).unwrap();
    let mut inv = gpu.stream().clone_htod(&vec![f32::NAN; rows]).unwrap();
    gpu_norm::normalize_rows_into(gpu, &xd, &mut ud, &mut inv).unwrap();
    let u: Vec<f64> = ud
        .download(gpu)
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect();
    let e = rel_l2(&u, &u_ref);
    assert!(
        e < tolerance::<T>(),
        "{} u rows={rows} cols={cols}: rel L2 {e}",
        T::DTYPE
    );

    let du_d = gpu.stream().clone_htod(&du).unwrap();
    let mut dx_d = gpu
        .stream()
        .clone_htod(&vec![f32::NAN; rows * cols])
        .unwrap();
    gpu_norm::normalize_rows_backward_into(gpu, &xd, &inv, &du_d, &mut dx_d).unwrap();
    let dx: Vec<f64> = gpu
        .stream()
        .clone_dtoh(&dx_d)
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    // The zero row's gradient is du/ε (huge); compare the other rows.
    let skip = if rows > 2 { cols..2 * cols } else { 0..0 };
    let keep = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| !skip.contains(i))
            .map(|(_, x)| *x)
            .collect()
    };
    // The gradient is du/‖x‖ minus its projection on u: where the two cancel (D = 1, where it is
    // exactly 0) the rounding is relative to du/‖x‖, the floor of the comparison.
    let floor = (0..rows)
        .filter(|r| !skip.contains(&(r * cols)))
        .map(|r| {
            let du2: f64 = du64[r * cols..(r + 1) * cols].iter().map(|v| v * v).sum();
            du2 * inv_ref[r] * inv_ref[r]
        })
        .sum::<f64>()
        .sqrt();
    let e = rel_l2_floor(&keep(&dx), &keep(&dx_ref), floor);
    // The backward reads f32 du, so its error is the input rounding only.
    assert!(
        e < tolerance::<T>(),
        "{} dx rows={rows} cols={cols}: rel L2 {e}",
        T::DTYPE
    );
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 7),
    (3, 1),
    (9, 33),
    (17, 64),
    (33, 129),
    (64, 768),
    (5, 1031),
];

#[test]
fn normalize_parity_f32() {
    let Some(gpu) = support::gpu("normalize_parity_f32") else {
        return;
    };
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        check::<f32>(&gpu, r, c, 10 + i as u64);
    }
}

#[test]
fn normalize_parity_f16() {
    let Some(gpu) = support::gpu("normalize_parity_f16") else {
        return;
    };
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        check::<f16>(&gpu, r, c, 20 + i as u64);
    }
}

#[test]
fn normalize_parity_bf16() {
    let Some(gpu) = support::gpu("normalize_parity_bf16") else {
        return;
    };
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        check::<bf16>(&gpu, r, c, 30 + i as u64);
    }
}

#[test]
fn normalize_is_deterministic() {
    let Some(gpu) = support::gpu("normalize_is_deterministic") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(7);
    let x: Vec<f32> = (0..1000 * 129)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let xd = DeviceMatrix::upload(&gpu, &MatRef::new("x", &x, 1000, 129).unwrap()).unwrap();
    let a = gpu_norm::normalize_rows(&gpu, &xd)
        .unwrap()
        .0
        .download(&gpu)
        .unwrap();
    let b = gpu_norm::normalize_rows(&gpu, &xd)
        .unwrap()
        .0
        .download(&gpu)
        .unwrap();
    assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
}

#[test]
fn gpu_open_never_panics() {
    // On a machine without a driver this is the NoCudaDriver error; with one, a device or NoDevice.
    match Gpu::new(0) {
        Ok(g) => assert!(g.properties().sm_count > 0),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("CUDA"), "unexpected error text: {msg}");
        }
    }
    assert!(Gpu::new(10_000).is_err());
}
