//! Inputs and outputs of a loss evaluation, shared by both backends, and the one place where
//! input shapes are checked against a [`LossSpec`].

use crate::error::{Error, Result};
use crate::spec::{LossSpec, Mode, Reduction, Variant};
use crate::tensor::{Element, MatRef, Matrix};

/// The input tensors of one evaluation; the variant must match the spec's [`Mode`].
#[derive(Debug, Clone, Copy)]
pub enum LossInputs<'a, T> {
    /// `query` (N×D), `positive` (N×D), `queue` (K×D, K may be 0).
    Queue {
        /// Q.
        query: MatRef<'a, T>,
        /// P.
        positive: MatRef<'a, T>,
        /// M.
        queue: MatRef<'a, T>,
    },
    /// `embeddings` (2N×D).
    InBatch {
        /// E.
        embeddings: MatRef<'a, T>,
    },
    /// `query` (N×D), `key` (M×D), optional `targets` (N indices in `[0, M)`; default `i`).
    Cross {
        /// A.
        query: MatRef<'a, T>,
        /// B.
        key: MatRef<'a, T>,
        /// y.
        targets: Option<&'a [i64]>,
    },
    /// `query` (N×D), `key` (N×D).
    Symmetric {
        /// A.
        query: MatRef<'a, T>,
        /// B.
        key: MatRef<'a, T>,
    },
}

impl<'a, T: Element> LossInputs<'a, T> {
    /// The mode these inputs are for.
    pub fn mode(&self) -> Mode {
        match self {
            LossInputs::Queue { .. } => Mode::Queue,
            LossInputs::InBatch { .. } => Mode::InBatch,
            LossInputs::Cross { .. } => Mode::Cross,
            LossInputs::Symmetric { .. } => Mode::Symmetric,
        }
    }

    /// The inputs of `mode` from its matrices in the order [`LossInputs::matrices`] gives
    /// (queue: query, positive, queue; inbatch: embeddings; cross and symmetric: query, key);
    /// `targets` only in cross mode. A wrong number of matrices is a shape error.
    pub fn from_matrices(
        mode: Mode,
        m: &[MatRef<'a, T>],
        targets: Option<&'a [i64]>,
    ) -> Result<Self> {
        let want = match mode {
            Mode::Queue => 3,
            Mode::InBatch => 1,
            Mode::Cross | Mode::Symmetric => 2,
        };
        if m.len() != want {
            return Err(Error::shape(
                "inputs",
                format!("{} matrices", m.len()),
                format!("{want} for {} mode", mode.name()),
            ));
        }
        if targets.is_some() && mode != Mode::Cross {
            return Err(Error::parameter(
                "targets",
                "given",
                format!("only cross mode takes targets, not {}", mode.name()),
            ));
        }
        Ok(match mode {
            Mode::Queue => LossInputs::Queue {
                query: m[0],
                positive: m[1],
                queue: m[2],
            },
            Mode::InBatch => LossInputs::InBatch { embeddings: m[0] },
            Mode::Cross => LossInputs::Cross {
                query: m[0],
                key: m[1],
                targets,
            },
            Mode::Symmetric => LossInputs::Symmetric {
                query: m[0],
                key: m[1],
            },
        })
    }

    /// Every input matrix, in the order of [`LossOutput::grads`].
    pub fn matrices(&self) -> Vec<MatRef<'a, T>> {
        match *self {
            LossInputs::Queue {
                query,
                positive,
                queue,
            } => vec![query, positive, queue],
            LossInputs::InBatch { embeddings } => vec![embeddings],
            LossInputs::Cross { query, key, .. } | LossInputs::Symmetric { query, key } => {
                vec![query, key]
            }
        }
    }

    /// Checks the inputs against `spec` and returns the problem's sizes.
    ///
    /// The shape rules live in [`check_shapes`], which the device path shares; this adds what only
    /// host data allows (cross targets: exactly one per query, each in range).
    pub fn validate(&self, spec: &LossSpec) -> Result<Shape> {
        let dims = |m: &MatRef<'a, T>| InputDims {
            name: m.name(),
            rows: m.rows(),
            cols: m.cols(),
        };
        let problem = match *self {
            LossInputs::Queue {
                query,
                positive,
                queue,
            } => ProblemDims::Queue {
                query: dims(&query),
                positive: dims(&positive),
                queue: dims(&queue),
            },
            LossInputs::InBatch { embeddings } => ProblemDims::InBatch {
                embeddings: dims(&embeddings),
            },
            LossInputs::Cross {
                query,
                key,
                targets,
            } => ProblemDims::Cross {
                query: dims(&query),
                key: dims(&key),
                targets: targets.map(<[i64]>::len),
            },
            LossInputs::Symmetric { query, key } => ProblemDims::Symmetric {
                query: dims(&query),
                key: dims(&key),
            },
        };
        let s = check_shapes(spec, &problem)?;
        if let LossInputs::Cross {
            targets: Some(t), ..
        } = *self
        {
            check_targets(t, s.anchors, s.keys)?;
        }
        Ok(s)
    }
}

/// One input as the shape check sees it: its name and size (host or device data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputDims {
    /// The input's name in error messages.
    pub name: &'static str,
    /// Rows (for a queue: the keys in use).
    pub rows: usize,
    /// Columns (D).
    pub cols: usize,
}

/// A problem's inputs as the shape check sees them, one variant per [`Mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemDims {
    /// Queue mode: `queue.rows` is the number of keys in use.
    Queue {
        /// The queries.
        query: InputDims,
        /// One positive per query.
        positive: InputDims,
        /// The negatives.
        queue: InputDims,
    },
    /// Inbatch mode: 2N rows.
    InBatch {
        /// The embeddings.
        embeddings: InputDims,
    },
    /// Cross mode; `targets` is the length of the target array, if given.
    Cross {
        /// The queries.
        query: InputDims,
        /// The keys.
        key: InputDims,
        /// The number of targets given (at least one per query is required here).
        targets: Option<usize>,
    },
    /// Symmetric mode.
    Symmetric {
        /// Row i pairs with key row i.
        query: InputDims,
        /// As query.
        key: InputDims,
    },
}

impl ProblemDims {
    /// The mode these inputs are for.
    pub fn mode(&self) -> Mode {
        match self {
            ProblemDims::Queue { .. } => Mode::Queue,
            ProblemDims::InBatch { .. } => Mode::InBatch,
            ProblemDims::Cross { .. } => Mode::Cross,
            ProblemDims::Symmetric { .. } => Mode::Symmetric,
        }
    }
}

/// Cross mode's `targets` against N queries and M keys: one per query, each in `[0, M)`.
pub(crate) fn check_targets(t: &[i64], n: usize, m: usize) -> Result<()> {
    if t.len() != n {
        return Err(Error::shape(
            "targets",
            format!("[{}]", t.len()),
            format!("[{n}] (one target per query row)"),
        ));
    }
    if let Some((i, &y)) = t
        .iter()
        .enumerate()
        .find(|(_, &y)| y < 0 || y as usize >= m)
    {
        return Err(Error::parameter(
            format!("targets[{i}]"),
            y,
            format!("must be in [0, {m}) (key has {m} rows)"),
        ));
    }
    Ok(())
}

/// The crate's one shape check (both backends call it before any work): the inputs' sizes
/// against `spec`, returning the problem's sizes.
pub fn check_shapes(spec: &LossSpec, dims: &ProblemDims) -> Result<Shape> {
    if dims.mode() != spec.mode() {
        return Err(Error::parameter(
            "mode",
            spec.mode().name(),
            format!("the inputs are for {} mode", dims.mode().name()),
        ));
    }
    let shape = |m: &InputDims| format!("[{}, {}]", m.rows, m.cols);
    let same_d = |m: &InputDims, d: usize, what: &str| -> Result<()> {
        if m.cols != d {
            return Err(Error::shape(
                m.name,
                shape(m),
                format!("[{}, {d}] (D = {d} as in {what})", m.rows),
            ));
        }
        Ok(())
    };
    let nonempty = |m: &InputDims| -> Result<()> {
        if m.rows == 0 {
            return Err(Error::shape(m.name, shape(m), "at least one row (N >= 1)"));
        }
        if m.cols == 0 {
            return Err(Error::shape(
                m.name,
                shape(m),
                "at least one column (D >= 1)",
            ));
        }
        Ok(())
    };
    let s = match *dims {
        ProblemDims::Queue {
            query,
            positive,
            queue,
        } => {
            nonempty(&query)?;
            let (n, d) = (query.rows, query.cols);
            same_d(&positive, d, "query")?;
            if positive.rows != n {
                return Err(Error::shape(
                    positive.name,
                    shape(&positive),
                    format!("[{n}, {d}] (one positive per query)"),
                ));
            }
            // Even an empty queue must be [0, D]: a width mismatch is a caller's bug.
            same_d(&queue, d, "query")?;
            Shape {
                anchors: n,
                keys: queue.rows,
                dim: d,
                negatives: queue.rows,
            }
        }
        ProblemDims::InBatch { embeddings } => {
            nonempty(&embeddings)?;
            let r = embeddings.rows;
            if r % 2 != 0 || r < 2 {
                return Err(Error::shape(
                    embeddings.name,
                    shape(&embeddings),
                    "[2N, D] with an even number of rows (rows a and a+N are a pair)",
                ));
            }
            Shape {
                anchors: r,
                keys: r,
                dim: embeddings.cols,
                negatives: r - 2,
            }
        }
        ProblemDims::Cross {
            query,
            key,
            targets,
        } => {
            nonempty(&query)?;
            let (n, d) = (query.rows, query.cols);
            same_d(&key, d, "query")?;
            let m = key.rows;
            match targets {
                Some(t) if t < n => {
                    return Err(Error::shape(
                        "targets",
                        format!("[{t}]"),
                        format!("[{n}] (one target per query row)"),
                    ))
                }
                None if m < n => {
                    return Err(Error::shape(
                        key.name,
                        shape(&key),
                        format!("at least {n} rows (default targets y_i = i need M >= N)"),
                    ))
                }
                _ => {}
            }
            if m == 0 {
                return Err(Error::shape(key.name, shape(&key), "at least one row"));
            }
            Shape {
                anchors: n,
                keys: m,
                dim: d,
                negatives: m - 1,
            }
        }
        ProblemDims::Symmetric { query, key } => {
            nonempty(&query)?;
            let (n, d) = (query.rows, query.cols);
            same_d(&key, d, "query")?;
            if key.rows != n {
                return Err(Error::shape(
                    key.name,
                    shape(&key),
                    format!("[{n}, {d}] (symmetric mode pairs row i with row i)"),
                ));
            }
            Shape {
                anchors: n,
                keys: n,
                dim: d,
                negatives: n - 1,
            }
        }
    };
    if spec.variant() == Variant::Decoupled && s.negatives == 0 {
        return Err(Error::parameter(
            "variant",
            "decoupled",
            "needs at least one negative (the queue is empty or N = 1)",
        ));
    }
    Ok(s)
}

/// The sizes of a validated problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Number of anchors with a row loss: N (queue, cross, symmetric) or 2N (inbatch).
    pub anchors: usize,
    /// Number of key rows: K (queue), 2N (inbatch), M (cross), N (symmetric).
    pub keys: usize,
    /// Embedding dimension D.
    pub dim: usize,
    /// Negatives per anchor: K, 2N − 2, M − 1, N − 1.
    pub negatives: usize,
}

impl Shape {
    /// Number of per-anchor losses: `anchors`, or `2N` in symmetric mode (rows then columns).
    pub fn losses(&self, mode: Mode) -> usize {
        match mode {
            Mode::Symmetric => 2 * self.anchors,
            _ => self.anchors,
        }
    }
}

/// The upstream gradient of the reduced loss.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Upstream {
    /// `g = 1`, as `loss.backward()`.
    #[default]
    One,
    /// A scalar `g` (reductions `mean` and `sum`).
    Scalar(f64),
    /// One weight per anchor loss (reduction `none`): N (or 2N for inbatch); symmetric takes 2N,
    /// the row weights then the column weights.
    PerAnchor(Vec<f64>),
}

impl Upstream {
    /// The per-anchor weights `w_i` that multiply each anchor's loss gradient, for `count` anchor
    /// losses under `spec`'s reduction (symmetric's ½ included).
    pub fn weights(&self, spec: &LossSpec, count: usize) -> Result<Vec<f64>> {
        let half = if spec.mode() == Mode::Symmetric {
            0.5
        } else {
            1.0
        };
        // In symmetric mode `count` is 2N and the mean is over N per side.
        let per_side = if spec.mode() == Mode::Symmetric {
            count / 2
        } else {
            count
        };
        let scale = |g: f64| -> Result<Vec<f64>> {
            if !g.is_finite() {
                return Err(Error::parameter("upstream", g, "must be finite"));
            }
            let w = match spec.reduction() {
                Reduction::Mean => half * g / per_side.max(1) as f64,
                Reduction::Sum => half * g,
                Reduction::None => g,
            };
            Ok(vec![w; count])
        };
        match self {
            Upstream::One => scale(1.0),
            Upstream::Scalar(g) => {
                if spec.reduction() == Reduction::None {
                    return Err(Error::parameter(
                        "upstream",
                        "a scalar",
                        format!("reduction none takes one weight per anchor loss ({count})"),
                    ));
                }
                scale(*g)
            }
            Upstream::PerAnchor(w) => {
                if spec.reduction() != Reduction::None {
                    return Err(Error::parameter(
                        "upstream",
                        format!("{} weights", w.len()),
                        "per-anchor weights need reduction none; mean and sum take a scalar",
                    ));
                }
                if w.len() != count {
                    return Err(Error::shape(
                        "upstream",
                        format!("[{}]", w.len()),
                        format!("[{count}] (one weight per anchor loss)"),
                    ));
                }
                if let Some((i, &x)) = w.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                    return Err(Error::parameter(
                        format!("upstream[{i}]"),
                        x,
                        "must be finite",
                    ));
                }
                Ok(w.clone())
            }
        }
    }
}

/// The loss value.
#[derive(Debug, Clone, PartialEq)]
pub enum LossValue {
    /// The reduced loss (mean or sum).
    Scalar(f64),
    /// Per-anchor losses (reduction none; not symmetric).
    PerAnchor(Vec<f64>),
    /// Symmetric mode with reduction none: the row losses and the column losses.
    Symmetric {
        /// `L^row_i`, N values.
        rows: Vec<f64>,
        /// `L^col_j`, N values.
        cols: Vec<f64>,
    },
}

impl LossValue {
    /// The scalar, if reduced.
    pub fn scalar(&self) -> Option<f64> {
        match self {
            LossValue::Scalar(x) => Some(*x),
            _ => None,
        }
    }
    /// All values, flattened (rows then columns for symmetric).
    pub fn values(&self) -> Vec<f64> {
        match self {
            LossValue::Scalar(x) => vec![*x],
            LossValue::PerAnchor(v) => v.clone(),
            LossValue::Symmetric { rows, cols } => rows.iter().chain(cols).copied().collect(),
        }
    }
}

/// The gradient of one input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    /// The input's name (`query`, `positive`, `queue`, `embeddings`, `key`); the output file calls
    /// it `grad_<name>`.
    pub name: &'static str,
    /// The gradient, shaped as the input.
    pub value: Matrix,
}

/// What one evaluation returns; the same type from the CPU reference and the CUDA backend.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The loss.
    pub loss: LossValue,
    /// Per-anchor log-sum-exp of the row logits (positive and negatives; decoupled: negatives
    /// only), N values (2N for inbatch). Zero-length for the simple variant (no exponentials).
    pub lse: Vec<f64>,
    /// Symmetric mode: the per-column LSE (N values).
    pub lse_cols: Option<Vec<f64>>,
    /// One gradient per input tensor, in input order (`grad_queue` only when the spec asks).
    pub grads: Vec<Gradient>,
    /// `dL/dτ` when the temperature is learnable.
    pub grad_temperature: Option<f64>,
}

impl LossOutput {
    /// The gradient of the input called `name`.
    pub fn grad(&self, name: &str) -> Option<&Matrix> {
        self.grads.iter().find(|g| g.name == name).map(|g| &g.value)
    }
}
