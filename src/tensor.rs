//! Host-side matrices: the element types the crate accepts and a borrowed row-major view.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// The floating-point storage types the loss accepts (accumulation is always wider).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary64: accepted by the CPU reference (finite-difference checks, golden files);
    /// the CUDA backend rejects it.
    F64,
}

impl DType {
    /// The short name used in kernel entry points and on the command line (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An element type of an input matrix: `f32`, [`half::f16`] or [`half::bf16`] (and `f64`, which only
/// the CPU reference accepts).
///
/// The CPU reference reads every element through [`Element::to_f64`], so one generic code path
/// serves every type without copying the input per dtype.
pub trait Element:
    Copy + Send + Sync + Default + bytemuck::Pod + std::fmt::Debug + PartialEq + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widen to f64 (exact).
    fn to_f64(self) -> f64;
    /// Round from f64 (to nearest).
    fn from_f64(x: f64) -> Self;
    /// Convert to f32 (exact for f32, f16 and bf16).
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// A borrowed row-major matrix (`rows × cols`), named for error messages.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    name: &'static str,
    data: &'a [T],
    rows: usize,
    cols: usize,
}

impl<'a, T: Element> MatRef<'a, T> {
    /// Wraps `data` as a `rows × cols` row-major matrix called `name` (the name appears in errors).
    ///
    /// Fails with [`Error::Shape`] when `data.len() != rows * cols`.
    pub fn new(name: &'static str, data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        let expected = rows.checked_mul(cols).ok_or_else(|| {
            Error::shape(
                name,
                format!("[{rows}, {cols}]"),
                "a shape whose size fits in usize",
            )
        })?;
        if data.len() != expected {
            return Err(Error::shape(
                name,
                format!("{} elements", data.len()),
                format!("[{rows}, {cols}] = {expected} elements"),
            ));
        }
        Ok(Self {
            name,
            data,
            rows,
            cols,
        })
    }

    /// The tensor's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns (the embedding dimension D).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The elements, row-major.
    pub fn data(&self) -> &'a [T] {
        self.data
    }
    /// Row `i` as a slice.
    ///
    /// # Panics
    /// When `i >= rows` (an internal indexing bug, never user input).
    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// Element `(i, j)` widened to f64.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j].to_f64()
    }

    /// The first non-finite element as an [`Error::NonFinite`], if any.
    pub fn check_finite(&self) -> Result<()> {
        for (idx, &x) in self.data.iter().enumerate() {
            let v = x.to_f64();
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    tensor: self.name.into(),
                    row: idx / self.cols.max(1),
                    col: idx % self.cols.max(1),
                    value: v,
                });
            }
        }
        Ok(())
    }
}

/// An owned row-major matrix of f64, used for results (gradients) of both backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// The elements, row-major (`rows * cols`).
    pub data: Vec<f64>,
}

impl Matrix {
    /// A `rows × cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// Row `i`, mutable.
    pub fn row_mut(&mut self, i: usize) -> &mut [f64] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }
}
