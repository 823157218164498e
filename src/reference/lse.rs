//! Log-sum-exp by running max, and the merge of partial results that makes chunked, streamed and
//! sharded evaluation exact (spec: *Chunking and sharding*).

/// A partial log-sum-exp over some set of values: the running max `m` and `Σ exp(x − m)`.
///
/// The LSE of a set split into chunks is the merge of the chunks' partials, in any order and any
/// grouping (up to floating-point reassociation). The empty set is `max = −∞, sum = 0` (its LSE is
/// `−∞`); values of `−∞` contribute nothing. NaN propagates into `sum` and therefore into the LSE.
///
/// ```
/// use fused_infonce::reference::LsePartial;
/// let xs = [0.5, 3.0, -1.0, 2.0];
/// let whole = LsePartial::of(&xs);
/// let merged = LsePartial::of(&xs[..1]).merge(LsePartial::of(&xs[1..]));
/// assert!((whole.lse() - merged.lse()).abs() < 1e-15);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LsePartial {
    /// The largest value seen (`−∞` for the empty set).
    pub max: f64,
    /// `Σ exp(x − max)` over the values seen (0 for the empty set).
    pub sum: f64,
}

impl Default for LsePartial {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl LsePartial {
    /// The partial of the empty set.
    pub const EMPTY: LsePartial = LsePartial {
        max: f64::NEG_INFINITY,
        sum: 0.0,
    };

    /// The partial of a set of values, accumulated with a running max (no unshifted `exp`).
    pub fn of(values: &[f64]) -> Self {
        let mut p = Self::EMPTY;
        for &x in values {
            p.push(x);
        }
        p
    }

    /// Adds one value (online softmax step: rescale the sum when the max grows).
    pub fn push(&mut self, x: f64) {
        if x == f64::NEG_INFINITY {
            return;
        }
        if x > self.max {
            self.sum = self.sum * (self.max - x).exp() + 1.0;
            self.max = x;
        } else {
            // Also the NaN path: exp(NaN) = NaN poisons the sum, as it should.
            self.sum += (x - self.max).exp();
        }
    }

    /// The partial of the union of two disjoint sets. Either side may be empty.
    pub fn merge(self, other: LsePartial) -> LsePartial {
        if self.sum == 0.0 && self.max == f64::NEG_INFINITY {
            return other;
        }
        if other.sum == 0.0 && other.max == f64::NEG_INFINITY {
            return self;
        }
        let m = if other.max > self.max {
            other.max
        } else {
            self.max
        };
        // The side that holds the max keeps its sum as is: exp(max − m) would be exp(∞ − ∞) = NaN
        // for an infinite max (a +∞ logit's LSE is +∞, as torch.logsumexp gives).
        let scale = |p: &LsePartial| {
            if p.max == m {
                p.sum
            } else {
                p.sum * (p.max - m).exp()
            }
        };
        LsePartial {
            max: m,
            sum: scale(&self) + scale(&other),
        }
    }

    /// `LSE = max + log(sum)`; `−∞` for the empty set.
    pub fn lse(self) -> f64 {
        if self.sum == 0.0 {
            return f64::NEG_INFINITY;
        }
        self.max + self.sum.ln()
    }
}

/// `LSE(values)` with a running max; `−∞` for an empty slice.
pub fn lse(values: &[f64]) -> f64 {
    LsePartial::of(values).lse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_infinite_value_gives_an_infinite_lse_in_any_grouping() {
        // torch.logsumexp([1, +inf, 2]) = +inf, however the set is chunked.
        let xs = [1.0, f64::INFINITY, 2.0];
        assert_eq!(LsePartial::of(&xs).lse(), f64::INFINITY);
        for split in 0..=3 {
            let merged = LsePartial::of(&xs[..split]).merge(LsePartial::of(&xs[split..]));
            assert_eq!(merged.lse(), f64::INFINITY, "split at {split}");
        }
        let both = LsePartial::of(&[f64::INFINITY]).merge(LsePartial::of(&[f64::INFINITY, 0.0]));
        assert_eq!(both.lse(), f64::INFINITY);
    }
    use rand::{Rng, SeedableRng};

    #[test]
    fn known_values() {
        assert!((lse(&[0.0, 0.0]) - 2f64.ln()).abs() < 1e-15);
        assert!((lse(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-12);
        assert_eq!(lse(&[]), f64::NEG_INFINITY);
        assert_eq!(lse(&[f64::NEG_INFINITY, 2.0]), 2.0);
        assert!(lse(&[1.0, f64::NAN, 2.0]).is_nan());
    }

    #[test]
    fn merge_in_any_grouping_equals_whole() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let xs: Vec<f64> = (0..37).map(|_| rng.random_range(-30.0..30.0)).collect();
        let whole = lse(&xs);
        let direct = {
            let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        assert!((whole - direct).abs() < 1e-12);
        for chunk in [1, 2, 5, 36, 37, 100] {
            let merged = xs
                .chunks(chunk)
                .map(LsePartial::of)
                .fold(LsePartial::EMPTY, LsePartial::merge);
            assert!((merged.lse() - whole).abs() < 1e-12, "chunk {chunk}");
            // Reverse order of merging.
            let rev = xs
                .chunks(chunk)
                .rev()
                .map(LsePartial::of)
                .fold(LsePartial::EMPTY, |a, b| b.merge(a));
            assert!((rev.lse() - whole).abs() < 1e-12, "chunk {chunk} reversed");
        }
        // Empty partials are neutral on both sides.
        let p = LsePartial::of(&xs);
        assert_eq!(p.merge(LsePartial::EMPTY), p);
        assert_eq!(LsePartial::EMPTY.merge(p), p);
    }
}
