//! One problem of the parity grids (tests/cpu_parity.rs, tests/gpu_parity.rs): its shape, its
//! seeded inputs in every mode, the upstream gradient of its reduction.
#![allow(dead_code)]

use fused_infonce::{
    DystressGrad, Element, LossInputs, LossSpec, MatRef, Mode, Reduction, Temperature, Upstream,
    Variant,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A problem's shape: (N anchors or pairs, keys: K / M, D).
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// N (anchors, or pairs in inbatch mode).
    pub n: usize,
    /// K (queue) or M (cross keys).
    pub k: usize,
    /// D.
    pub d: usize,
}

/// Owned inputs of one mode.
pub struct Data<T> {
    /// The first input: query (queue, cross, symmetric) or embeddings (inbatch).
    pub a: Vec<T>,
    /// The second: positive (queue) or key (cross, symmetric); empty in inbatch mode.
    pub b: Vec<T>,
    /// The queue (queue mode); empty otherwise.
    pub c: Vec<T>,
    /// Cross mode's targets, if any.
    pub targets: Option<Vec<i64>>,
    /// The shape.
    pub dims: Dims,
}

impl<T: Element> Data<T> {
    /// Inputs of `mode` drawn by `rows(rng, rows, d)` from `seed`; cross mode with targets when
    /// `with_targets`.
    pub fn new(
        mode: Mode,
        dims: Dims,
        seed: u64,
        with_targets: bool,
        rows: impl Fn(&mut StdRng, usize, usize) -> Vec<T>,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let Dims { n, k, d } = dims;
        let (a, b, c) = match mode {
            Mode::Queue => (
                rows(&mut rng, n, d),
                rows(&mut rng, n, d),
                rows(&mut rng, k, d),
            ),
            Mode::InBatch => (rows(&mut rng, 2 * n, d), Vec::new(), Vec::new()),
            Mode::Cross => (rows(&mut rng, n, d), rows(&mut rng, k, d), Vec::new()),
            Mode::Symmetric => (rows(&mut rng, n, d), rows(&mut rng, n, d), Vec::new()),
        };
        let targets = (mode == Mode::Cross && with_targets)
            .then(|| (0..n).map(|_| rng.random_range(0..k as i64)).collect());
        Self {
            a,
            b,
            c,
            targets,
            dims,
        }
    }

    /// The inputs as the loss takes them.
    pub fn inputs(&self, mode: Mode) -> LossInputs<'_, T> {
        let Dims { n, k, d } = self.dims;
        fn mat<'a, T: Element>(
            name: &'static str,
            v: &'a [T],
            r: usize,
            d: usize,
        ) -> MatRef<'a, T> {
            MatRef::new(name, v, r, d).expect("consistent sizes")
        }
        let m = |name, v, r| mat(name, v, r, d);
        match mode {
            Mode::Queue => LossInputs::Queue {
                query: m("query", &self.a, n),
                positive: m("positive", &self.b, n),
                queue: m("queue", &self.c, k),
            },
            Mode::InBatch => LossInputs::InBatch {
                embeddings: m("embeddings", &self.a, 2 * n),
            },
            Mode::Cross => LossInputs::Cross {
                query: m("query", &self.a, n),
                key: m("key", &self.b, k),
                targets: self.targets.as_deref(),
            },
            Mode::Symmetric => LossInputs::Symmetric {
                query: m("query", &self.a, n),
                key: m("key", &self.b, n),
            },
        }
    }
}

/// How many per-anchor losses `mode` has (inbatch and symmetric: 2N).
pub fn loss_count(mode: Mode, dims: Dims) -> usize {
    match mode {
        Mode::InBatch | Mode::Symmetric => 2 * dims.n,
        _ => dims.n,
    }
}

/// The upstream gradient of `spec`'s reduction: seeded per-anchor weights in [0.1, 1) for
/// `none`, 0.75 otherwise (never the trivial 1).
pub fn upstream(spec: &LossSpec, count: usize, seed: u64) -> Upstream {
    match spec.reduction() {
        Reduction::None => {
            let mut rng = StdRng::seed_from_u64(seed);
            Upstream::PerAnchor((0..count).map(|_| rng.random_range(0.1..1.0)).collect())
        }
        _ => Upstream::Scalar(0.75),
    }
}

/// The temperatures of the parity grids: fixed, learnable, DySTreSS detach and full.
pub fn temperatures() -> Vec<Temperature> {
    vec![
        Temperature::Fixed(0.1),
        Temperature::Learnable(0.2),
        Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Detach,
        },
        Temperature::Dystress {
            tau_min: 0.07,
            tau_max: 0.2,
            grad: DystressGrad::Full,
        },
    ]
}

/// The `hard:k` grid: hard:k and HardSimple in every mode (symmetric rows and columns select
/// separately), for k = 1, a middle k and k ≥ #negatives (the standard loss), with and without
/// normalisation, on one shape; each case with its seed. `grad_queue`: queue mode asks for the
/// queue's gradient.
pub fn hard_k_cases(grad_queue: bool) -> Vec<(LossSpec, Dims, u64)> {
    let dims = Dims { n: 9, k: 37, d: 19 };
    let variants = [
        Variant::Hard { k: 1 },
        Variant::Hard { k: 5 },
        Variant::Hard { k: 100 },
        Variant::Simple {
            lambda: None,
            hard_k: Some(4),
        },
        Variant::Simple {
            lambda: Some(0.3),
            hard_k: Some(2),
        },
    ];
    let mut out = Vec::new();
    let modes = [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric];
    for (mi, mode) in modes.into_iter().enumerate() {
        for (vi, variant) in variants.into_iter().enumerate() {
            for normalize in [false, true] {
                let spec = LossSpec::builder(mode)
                    .temperature(0.1)
                    .variant(variant)
                    .normalize(normalize)
                    .grad_queue(grad_queue && mode == Mode::Queue)
                    .build()
                    .expect("valid spec");
                out.push((spec, dims, 900 + 10 * mi as u64 + vi as u64));
            }
        }
    }
    out
}
