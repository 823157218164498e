//! [`LossSpec`]: which member of the contrastive loss family to compute.
//!
//! One spec describes a loss completely (mode, temperature, variant, reduction, normalisation) and
//! is validated once, when [`LossSpecBuilder::build`] runs; both backends take the same spec.
//! The math of every option is in `spec/losses.md`.
//!
//! ```
//! use fused_infonce::{LossSpec, Reduction};
//! let spec = LossSpec::queue().temperature(0.07).normalize(true).build()?;
//! assert_eq!(spec.reduction(), Reduction::Mean);
//! # Ok::<(), fused_infonce::Error>(())
//! ```

use crate::error::{Error, Result};

/// Where each anchor's positive and negatives come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// MoCo: `query` Q (N×D), `positive` P (N×D), negatives from a `queue` M (K×D, K ≥ 0).
    Queue,
    /// SimCLR NT-Xent: `embeddings` E (2N×D), rows `a` and `(a+N) mod 2N` are a pair; every other
    /// row is a negative.
    InBatch,
    /// One-directional: `query` A (N×D) against `key` B (M×D) with integer targets (default `y_i = i`).
    Cross,
    /// CLIP: `query` A (N×D), `key` B (N×D); ½ (row loss + column loss).
    Symmetric,
}

impl Mode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Queue => "queue",
            Mode::InBatch => "inbatch",
            Mode::Cross => "cross",
            Mode::Symmetric => "symmetric",
        }
    }
}

/// How the gradient flows through a DySTreSS temperature `τ(s)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DystressGrad {
    /// `∂z/∂s = 1/τ(s)` (the authors' code; default).
    #[default]
    Detach,
    /// `∂z/∂s = 1/τ(s) − s·τ'(s)/τ(s)²`.
    Full,
}

/// The temperature scheme.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Temperature {
    /// A fixed `τ`: `z = s/τ`.
    Fixed(f64),
    /// A learnable `τ`: as fixed, plus `dL/dτ` in the output.
    Learnable(f64),
    /// DySTreSS: `τ(s) = τ_min + ½(τ_max − τ_min)(1 + cos(π(1 + s)))` applied to every logit.
    Dystress {
        /// `τ(0)`.
        tau_min: f64,
        /// `τ(±1)`.
        tau_max: f64,
        /// Gradient through `τ(s)`.
        grad: DystressGrad,
    },
}

impl Temperature {
    /// `τ(s)` for similarity `s` (constant for fixed and learnable).
    pub fn tau(&self, s: f64) -> f64 {
        match *self {
            Temperature::Fixed(t) | Temperature::Learnable(t) => t,
            Temperature::Dystress {
                tau_min, tau_max, ..
            } => {
                tau_min
                    + 0.5 * (tau_max - tau_min) * (1.0 + (std::f64::consts::PI * (1.0 + s)).cos())
            }
        }
    }

    /// `dz/ds` for the logit `z = s/τ(s)` (including the DySTreSS `full` term when selected).
    pub fn dz_ds(&self, s: f64) -> f64 {
        match *self {
            Temperature::Fixed(t) | Temperature::Learnable(t) => 1.0 / t,
            Temperature::Dystress {
                tau_min,
                tau_max,
                grad,
            } => {
                let tau = self.tau(s);
                match grad {
                    DystressGrad::Detach => 1.0 / tau,
                    DystressGrad::Full => {
                        let pi = std::f64::consts::PI;
                        let dtau = -0.5 * pi * (tau_max - tau_min) * (pi * (1.0 + s)).sin();
                        1.0 / tau - s * dtau / (tau * tau)
                    }
                }
            }
        }
    }

    /// Whether `dL/dτ` is part of the output.
    pub fn is_learnable(&self) -> bool {
        matches!(self, Temperature::Learnable(_))
    }

    /// Checks the parameters: τ finite and > 0; 0 < τ_min ≤ τ_max, both finite.
    ///
    /// Errors: [`Error::Parameter`] naming `temperature`, `tau_min` or `tau_max` and
    /// the allowed range.
    pub fn check(&self) -> Result<()> {
        match *self {
            Temperature::Fixed(t) | Temperature::Learnable(t) => {
                if !(t.is_finite() && t > 0.0) {
                    return Err(Error::parameter("temperature", t, "must be finite and > 0"));
                }
            }
            Temperature::Dystress {
                tau_min, tau_max, ..
            } => {
                if !(tau_min.is_finite() && tau_min > 0.0) {
                    return Err(Error::parameter(
                        "tau_min",
                        tau_min,
                        "must be finite and > 0",
                    ));
                }
                if !(tau_max.is_finite() && tau_max >= tau_min) {
                    return Err(Error::parameter(
                        "tau_max",
                        tau_max,
                        format!("must be finite and >= tau_min = {tau_min}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Which loss is computed per anchor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    /// Wang & Liu eq. 1: `LSE(z+, z_neg…) − z+`.
    Standard,
    /// DCL: `−z+ + LSE(z_neg…)`; needs at least one negative.
    Decoupled,
    /// Eq. 9: the standard loss over the negatives with `s ≥ s_(k)` (ties kept).
    Hard {
        /// How many of the hardest negatives to keep (k ≥ 1).
        k: usize,
    },
    /// Eq. 3: `−s+ + λ Σ s_neg` (no temperature), optionally over the hard negatives only.
    Simple {
        /// λ; `None` is `1/#negatives` (of the selected set).
        lambda: Option<f64>,
        /// `Some(k)`: HardSimple, restricted to the `k` hardest negatives.
        hard_k: Option<usize>,
    },
}

impl Variant {
    /// The `k` of a hard-negative restriction, if any.
    pub fn hard_k(&self) -> Option<usize> {
        match *self {
            Variant::Hard { k } => Some(k),
            Variant::Simple { hard_k, .. } => hard_k,
            _ => None,
        }
    }
}

/// How per-anchor losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// Mean over anchors (symmetric: ½ (mean of rows + mean of columns)). Default.
    #[default]
    Mean,
    /// Sum over anchors (symmetric: ½ (sum of rows + sum of columns)).
    Sum,
    /// The per-anchor losses (symmetric: rows and columns); the upstream is one weight per anchor.
    None,
}

/// A validated description of one contrastive loss. Build with [`LossSpec::queue`] and friends.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    mode: Mode,
    temperature: Temperature,
    variant: Variant,
    reduction: Reduction,
    normalize: bool,
    grad_queue: bool,
}

/// Builder for [`LossSpec`]; nothing is checked until [`build`](LossSpecBuilder::build).
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpecBuilder {
    spec: LossSpec,
}

impl LossSpec {
    /// A builder for `mode` with τ = 0.07 fixed, the standard variant, mean reduction, no
    /// normalisation.
    pub fn builder(mode: Mode) -> LossSpecBuilder {
        LossSpecBuilder {
            spec: LossSpec {
                mode,
                temperature: Temperature::Fixed(0.07),
                variant: Variant::Standard,
                reduction: Reduction::Mean,
                normalize: false,
                grad_queue: false,
            },
        }
    }
    /// MoCo queue mode.
    pub fn queue() -> LossSpecBuilder {
        Self::builder(Mode::Queue)
    }
    /// SimCLR in-batch (NT-Xent) mode.
    pub fn inbatch() -> LossSpecBuilder {
        Self::builder(Mode::InBatch)
    }
    /// One-directional cross mode.
    pub fn cross() -> LossSpecBuilder {
        Self::builder(Mode::Cross)
    }
    /// CLIP symmetric mode.
    pub fn symmetric() -> LossSpecBuilder {
        Self::builder(Mode::Symmetric)
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// The temperature scheme.
    pub fn temperature(&self) -> Temperature {
        self.temperature
    }
    /// The variant.
    pub fn variant(&self) -> Variant {
        self.variant
    }
    /// The reduction.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }
    /// Whether rows are L2-normalised first (gradients are still with respect to the raw rows).
    pub fn normalize(&self) -> bool {
        self.normalize
    }
    /// Whether the gradient of the queue is computed (queue mode; MoCo detaches the queue).
    pub fn grad_queue(&self) -> bool {
        self.grad_queue
    }
    /// The same loss on rows that are already normalised: this spec without the normalisation
    /// step (what runs after a separate normalisation pass).
    pub fn without_normalize(&self) -> LossSpec {
        LossSpec {
            normalize: false,
            ..self.clone()
        }
    }
    /// The same loss with temperature scheme `t` (checked as [`LossSpecBuilder::build`] does).
    pub fn with_temperature(&self, t: Temperature) -> Result<LossSpec> {
        t.check()?;
        Ok(LossSpec {
            temperature: t,
            ..self.clone()
        })
    }
}

impl LossSpecBuilder {
    /// A fixed temperature τ.
    pub fn temperature(mut self, tau: f64) -> Self {
        self.spec.temperature = Temperature::Fixed(tau);
        self
    }
    /// A learnable temperature τ (the output carries `dL/dτ`).
    pub fn learnable_temperature(mut self, tau: f64) -> Self {
        self.spec.temperature = Temperature::Learnable(tau);
        self
    }
    /// A DySTreSS temperature between `tau_min` and `tau_max`.
    pub fn dystress(mut self, tau_min: f64, tau_max: f64, grad: DystressGrad) -> Self {
        self.spec.temperature = Temperature::Dystress {
            tau_min,
            tau_max,
            grad,
        };
        self
    }
    /// Any temperature scheme.
    pub fn temperature_scheme(mut self, t: Temperature) -> Self {
        self.spec.temperature = t;
        self
    }
    /// The variant.
    pub fn variant(mut self, v: Variant) -> Self {
        self.spec.variant = v;
        self
    }
    /// The reduction.
    pub fn reduction(mut self, r: Reduction) -> Self {
        self.spec.reduction = r;
        self
    }
    /// L2-normalise rows first (fused; `u = x / max(‖x‖, 1e-12)`).
    pub fn normalize(mut self, on: bool) -> Self {
        self.spec.normalize = on;
        self
    }
    /// Compute the queue's gradient too (queue mode only).
    pub fn grad_queue(mut self, on: bool) -> Self {
        self.spec.grad_queue = on;
        self
    }

    /// Validates every parameter and returns the spec.
    ///
    /// Errors name the parameter and its allowed range: τ finite and > 0; 0 < τ_min ≤ τ_max, both
    /// finite; `k ≥ 1`; λ finite; `grad_queue` only in queue mode.
    pub fn build(self) -> Result<LossSpec> {
        let s = self.spec;
        s.temperature.check()?;
        if let Some(k) = s.variant.hard_k() {
            if k == 0 {
                return Err(Error::parameter("hard:k", k, "k must be >= 1"));
            }
        }
        if let Variant::Simple {
            lambda: Some(l), ..
        } = s.variant
        {
            if !l.is_finite() {
                return Err(Error::parameter("simple:lambda", l, "must be finite"));
            }
        }
        if s.grad_queue && s.mode != Mode::Queue {
            return Err(Error::parameter(
                "grad_queue",
                true,
                format!("only queue mode has a queue (mode is {})", s.mode.name()),
            ));
        }
        Ok(s)
    }
}
