//! Row-wise L2 normalisation and its backward (spec: Normalisation), in f64.

/// `ε` of `u = x / max(‖x‖₂, ε)`, as `torch.nn.functional.normalize`.
pub const NORM_EPS: f64 = 1e-12;

/// Normalises one row: returns `(u, 1 / max(‖x‖, ε))`.
pub fn normalize_row(x: &[f64]) -> (Vec<f64>, f64) {
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    // As torch's clamp_min, a NaN norm stays NaN (`f64::max` would return ε and scale the row's
    // other elements, and their gradients, by 1e12).
    let inv = 1.0
        / if norm.is_nan() {
            norm
        } else {
            norm.max(NORM_EPS)
        };
    (x.iter().map(|v| v * inv).collect(), inv)
}

/// The backward of [`normalize_row`]: `dx = (du − u (u·du)) / max(‖x‖, ε)`.
///
/// For `‖x‖ ≤ ε` the map is `x/ε` (linear) and the gradient is `du / ε`; this function returns
/// exactly that in that case, as PyTorch does.
pub fn normalize_row_backward(u: &[f64], inv_norm: f64, du: &[f64]) -> Vec<f64> {
    if inv_norm >= 1.0 / NORM_EPS {
        return du.iter().map(|g| g * inv_norm).collect();
    }
    let dot: f64 = u.iter().zip(du).map(|(a, b)| a * b).sum();
    u.iter()
        .zip(du)
        .map(|(ui, gi)| (gi - ui * dot) * inv_norm)
        .collect()
}

/// Normalises every row of a row-major `rows × cols` matrix (given in f64): returns the normalised
/// rows and each row's `1 / max(‖x‖, ε)`.
pub fn normalize_rows(x: &[f64], cols: usize) -> (Vec<f64>, Vec<f64>) {
    if cols == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut u = Vec::with_capacity(x.len());
    let mut inv = Vec::with_capacity(x.len() / cols);
    for row in x.chunks_exact(cols) {
        let (ur, i) = normalize_row(row);
        u.extend(ur);
        inv.push(i);
    }
    (u, inv)
}

/// Backward of [`normalize_rows`] for every row.
pub fn normalize_rows_backward(u: &[f64], inv_norm: &[f64], du: &[f64], cols: usize) -> Vec<f64> {
    if cols == 0 {
        return Vec::new();
    }
    let mut dx = Vec::with_capacity(u.len());
    for ((ur, gr), &i) in u
        .chunks_exact(cols)
        .zip(du.chunks_exact(cols))
        .zip(inv_norm)
    {
        dx.extend(normalize_row_backward(ur, i, gr));
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_norm_and_known_value() {
        let (u, inv) = normalize_row(&[3.0, 4.0]);
        assert!((u[0] - 0.6).abs() < 1e-15 && (u[1] - 0.8).abs() < 1e-15);
        assert!((inv - 0.2).abs() < 1e-15);
    }

    #[test]
    fn zero_row_stays_zero() {
        let (u, _) = normalize_row(&[0.0, 0.0, 0.0]);
        assert_eq!(u, vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn nan_row_is_nan() {
        let (u, inv) = normalize_row(&[f64::NAN, 1.0]);
        assert!(u.iter().all(|x| x.is_nan()) && inv.is_nan());
        let dx = normalize_row_backward(&u, inv, &[1.0, 1.0]);
        assert!(dx.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn clamped_row_backward_is_du_over_eps() {
        // ‖x‖ = 5e-13 < ε: u = x/ε (linear), so the gradient of u·du is du/ε, exactly.
        let x = [3e-13, -4e-13];
        let (u, inv) = normalize_row(&x);
        assert_eq!(inv, 1.0 / NORM_EPS);
        assert!((u[0] - 0.3).abs() < 1e-15 && (u[1] + 0.4).abs() < 1e-15);
        let du = [0.25, -1.5];
        let dx = normalize_row_backward(&u, inv, &du);
        assert_eq!(dx, vec![0.25 / NORM_EPS, -1.5 / NORM_EPS]);
        // And it is the derivative: u·du changes by du·h/ε for a step h inside the region.
        let h = 1e-16;
        for k in 0..2 {
            let f = |d: f64| {
                let mut y = x;
                y[k] += d;
                let (uu, _) = normalize_row(&y);
                uu.iter().zip(&du).map(|(a, b)| a * b).sum::<f64>()
            };
            let fd = (f(h) - f(-h)) / (2.0 * h);
            assert!(
                (fd - dx[k]).abs() < 1e-6 * dx[k].abs(),
                "k={k}: fd {fd} vs {}",
                dx[k]
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = [0.3, -1.2, 0.7, 2.1, -0.4];
        let du = [0.5, 0.1, -0.8, 0.3, 1.1];
        let (u, inv) = normalize_row(&x);
        let dx = normalize_row_backward(&u, inv, &du);
        let h = 1e-6;
        for k in 0..x.len() {
            let f = |d: f64| {
                let mut y = x;
                y[k] += d;
                let (uu, _) = normalize_row(&y);
                uu.iter().zip(&du).map(|(a, b)| a * b).sum::<f64>()
            };
            let fd = (f(h) - f(-h)) / (2.0 * h);
            assert!((fd - dx[k]).abs() < 1e-8, "k={k}: fd {fd} vs {}", dx[k]);
        }
    }
}
