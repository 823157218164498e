//! Helpers shared by the GPU parity tests of the unfused baseline and the tensor-core kernels:
//! seeded random unit rows, upload, download of a [`DeviceOutput`], relative-L2 comparison against
//! the CPU reference.
#![allow(dead_code)]

use fused_infonce::cuda::{
    DeviceElement, DeviceGrad, DeviceInputs, DeviceMatrix, DeviceOutput, Gpu,
};
use fused_infonce::{Element, LossInputs, LossOutput, MatRef};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `rows × d` random rows of unit L2 norm (rounded to `T`), seeded.
pub fn unit_rows<T: Element>(seed: u64, rows: usize, d: usize) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let r: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.extend(r.iter().map(|x| T::from_f64(x / n)));
    }
    out
}

/// Uploads a host matrix.
pub fn up<T: DeviceElement>(
    gpu: &Gpu,
    name: &'static str,
    data: &[T],
    rows: usize,
    d: usize,
) -> DeviceMatrix<T> {
    DeviceMatrix::upload(gpu, &MatRef::new(name, data, rows, d).unwrap()).unwrap()
}

/// A host view.
pub fn mat<'a, T: Element>(
    name: &'static str,
    data: &'a [T],
    rows: usize,
    d: usize,
) -> MatRef<'a, T> {
    MatRef::new(name, data, rows, d).unwrap()
}

/// A device output brought back to the host, in f64.
#[derive(Debug)]
pub struct HostOut {
    pub loss: Vec<f64>,
    pub lse: Vec<f64>,
    pub lse_cols: Option<Vec<f64>>,
    pub grads: Vec<(&'static str, Vec<f64>)>,
    pub grad_temperature: Option<f64>,
}

fn dl(gpu: &Gpu, s: &cudarc::driver::CudaSlice<f32>) -> Vec<f64> {
    gpu.stream()
        .clone_dtoh(s)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Downloads every output of a device evaluation.
pub fn download<T: DeviceElement>(gpu: &Gpu, o: &DeviceOutput<T>) -> HostOut {
    HostOut {
        loss: dl(gpu, &o.loss),
        lse: dl(gpu, &o.lse),
        lse_cols: o.lse_cols.as_ref().map(|s| dl(gpu, s)),
        grads: o
            .grads
            .iter()
            .map(|(n, g)| {
                let v = match g {
                    DeviceGrad::F32(m) => m
                        .download(gpu)
                        .unwrap()
                        .into_iter()
                        .map(f64::from)
                        .collect(),
                    DeviceGrad::Input(m) => m
                        .download(gpu)
                        .unwrap()
                        .into_iter()
                        .map(|x| x.to_f64())
                        .collect(),
                };
                (*n, v)
            })
            .collect(),
        grad_temperature: o.grad_temperature.as_ref().map(|s| dl(gpu, s)[0]),
    }
}

/// Relative L2 distance; panics on a non-finite value in `got`.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "non-finite value in GPU output"
    );
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Asserts a device output equals the CPU reference to relative L2 `tol` (loss, LSE, every
/// gradient, dτ), naming what differs.
pub fn assert_close(what: &str, got: &HostOut, want: &LossOutput, tol: f64) {
    let wl = want.loss.values();
    let e = rel_l2(&got.loss[..wl.len()], &wl);
    assert!(
        e <= tol,
        "{what}: loss rel L2 {e:e} > {tol:e} (got {:?}, want {:?})",
        &got.loss[..wl.len().min(4)],
        &wl[..wl.len().min(4)]
    );
    if !want.lse.is_empty() {
        let e = rel_l2(&got.lse[..want.lse.len()], &want.lse);
        assert!(e <= tol, "{what}: lse rel L2 {e:e} > {tol:e}");
    }
    if let Some(w) = want.lse_cols.as_ref().filter(|w| !w.is_empty()) {
        let g = got
            .lse_cols
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: no lse_cols from the device"));
        let e = rel_l2(&g[..w.len()], w);
        assert!(e <= tol, "{what}: lse_cols rel L2 {e:e} > {tol:e}");
    }
    assert_eq!(
        got.grads.len(),
        want.grads.len(),
        "{what}: number of gradients"
    );
    for (name, g) in &got.grads {
        let w = want
            .grad(name)
            .unwrap_or_else(|| panic!("{what}: unexpected gradient {name}"));
        let e = rel_l2(g, &w.data);
        assert!(e <= tol, "{what}: grad_{name} rel L2 {e:e} > {tol:e}");
    }
    match (got.grad_temperature, want.grad_temperature) {
        (Some(g), Some(w)) => {
            let e = (g - w).abs() / w.abs().max(1e-6);
            assert!(e <= tol.max(1e-4) * 10.0, "{what}: dtau {g} vs {w}");
        }
        (None, None) => {}
        (g, w) => panic!("{what}: grad_temperature {g:?} vs {w:?}"),
    }
}

/// Host and device inputs of one case (owning the data).
pub struct Case<T: DeviceElement> {
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub c: Vec<T>,
    pub n: usize,
    pub k: usize,
    pub d: usize,
}

impl<T: DeviceElement> Case<T> {
    pub fn new(seed: u64, n: usize, k: usize, d: usize) -> Self {
        Self {
            a: unit_rows(seed, n, d),
            b: unit_rows(seed + 1, n.max(k), d),
            c: unit_rows(seed + 2, k, d),
            n,
            k,
            d,
        }
    }
}

/// Device matrices for a case, by mode.
pub struct DevCase<T: DeviceElement> {
    pub a: DeviceMatrix<T>,
    pub b: DeviceMatrix<T>,
    pub c: DeviceMatrix<T>,
}

impl<T: DeviceElement> DevCase<T> {
    pub fn new(gpu: &Gpu, c: &Case<T>) -> Self {
        Self {
            a: up(gpu, "a", &c.a, c.n, c.d),
            b: up(gpu, "b", &c.b, c.n.max(c.k), c.d),
            c: up(gpu, "c", &c.c, c.k, c.d),
        }
    }
}

/// Queue mode: host and device inputs (query a, positive b[..n], queue c).
pub fn queue_inputs<'a, T: DeviceElement>(
    c: &'a Case<T>,
    dc: &'a DevCase<T>,
    pos: &'a DeviceMatrix<T>,
) -> (LossInputs<'a, T>, DeviceInputs<'a, T>) {
    (
        LossInputs::Queue {
            query: mat("query", &c.a, c.n, c.d),
            positive: mat("positive", &c.b[..c.n * c.d], c.n, c.d),
            queue: mat("queue", &c.c, c.k, c.d),
        },
        DeviceInputs::Queue {
            query: &dc.a,
            positive: pos,
            queue: fused_infonce::cuda::QueueView::whole(&dc.c),
        },
    )
}
