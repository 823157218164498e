//! Reading and writing safetensors files of embeddings, targets (or class labels), upstream
//! gradients and results.
//!
//! [`TensorFile`] reads a whole safetensors file (as written by PyTorch's
//! `safetensors.torch.save_file`) and hands out its tensors typed and checked: input matrices
//! (2-D, f32, f16 or bf16, or f64 for the CPU reference) with [`TensorFile::matrix`] in their
//! stored type or [`TensorFile::matrix_f64`] widened to f64, integer vectors (1-D, i64, i32 or u8)
//! with [`TensorFile::integers`] and targets (i64 or i32) with [`TensorFile::targets`], and the
//! upstream gradient (f32, a scalar or one weight per anchor) with [`TensorFile::upstream`]. Tensors that are never asked for are
//! never interpreted, so a file may carry anything else besides (e.g. expected outputs in f64).
//!
//! [`write_f32`] writes results atomically through [`write_atomic`] (which writes any bytes, e.g.
//! a JSON report): the bytes go to a temporary file in the destination's directory, which is then
//! renamed over the destination; on any error the temporary file is removed and no output file
//! appears. [`output_tensors`] names the parts of a [`LossOutput`] as
//! `infonce eval` writes them (`loss`, `lse`, `grad_<input>`, …).
//!
//! Every error names the file or the tensor at fault, in one line.
//!
//! ```
//! use fused_infonce::io::{write_f32, OutputTensor, TensorFile};
//! let dir = std::env::temp_dir().join(format!("fused-infonce-io-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("x.safetensors");
//! write_f32(&path, &[OutputTensor::new("query", vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])])?;
//! let file = TensorFile::read(&path)?;
//! let q = file.matrix::<f32>("query")?;
//! assert_eq!((q.rows(), q.cols()), (2, 3));
//! assert_eq!(q.view()?.get(1, 2), 6.0);
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), fused_infonce::Error>(())
//! ```
//!
//! Byte order: safetensors is little-endian, as are the machines this crate targets (x86-64,
//! aarch64); the element bytes are used as they are.

use crate::error::{Error, Result};
use crate::loss::{LossOutput, LossValue, Upstream};
use crate::tensor::{DType, Element, MatRef, Matrix};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One tensor of a file, not yet interpreted: its stored dtype, shape and bytes.
#[derive(Debug, Clone)]
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The tensors of one safetensors file, read into memory.
#[derive(Debug, Clone)]
pub struct TensorFile {
    source: String,
    tensors: BTreeMap<String, RawTensor>,
}

/// An owned row-major matrix read from a file, in its stored element type (`rows × cols`).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedMatrix<T> {
    name: &'static str,
    data: Vec<T>,
    rows: usize,
    cols: usize,
}

impl<T: Element> OwnedMatrix<T> {
    /// The tensor's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// Number of rows (N).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns (D).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The elements, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }
    /// A borrowed view, as both backends take it.
    pub fn view(&self) -> Result<MatRef<'_, T>> {
        MatRef::new(self.name, &self.data, self.rows, self.cols)
    }
    /// The same matrix widened to f64 (exact for every element type).
    pub fn widen(self) -> OwnedMatrix<f64> {
        OwnedMatrix {
            name: self.name,
            data: self.data.into_iter().map(Element::to_f64).collect(),
            rows: self.rows,
            cols: self.cols,
        }
    }
}

impl From<OwnedMatrix<f64>> for Matrix {
    fn from(m: OwnedMatrix<f64>) -> Self {
        Matrix {
            rows: m.rows,
            cols: m.cols,
            data: m.data,
        }
    }
}

/// The integers of a little-endian `T` array, widened to i64.
fn widen_integers<T: bytemuck::Pod + Into<i64>>(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(std::mem::size_of::<T>())
        .map(|b| bytemuck::pod_read_unaligned::<T>(b).into())
        .collect()
}

/// The crate's [`DType`] of a stored safetensors dtype, if it is a floating-point type the crate
/// reads.
fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// The stored dtype as a short lower-case name (`f32`, `i64`, `bool`, …).
fn dtype_name(d: Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

/// `[a, b, …]`.
fn shape_string(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// An [`Error::Io`] whose message says what was being done to which path.
fn io_error(e: std::io::Error, what: &str, path: &Path) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("cannot {what} {}: {e}", path.display()),
    ))
}

impl TensorFile {
    /// Reads the safetensors file at `path`.
    ///
    /// Errors: [`Error::Io`] naming the path when it cannot be read; [`Error::Input`] naming the
    /// path when it is not a valid safetensors file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| io_error(e, "read", path))?;
        Self::from_bytes(&bytes, path.display().to_string())
    }

    /// Parses a safetensors file held in memory; `source` names it in error messages.
    ///
    /// Errors: [`Error::Input`] when the bytes are not a valid safetensors file.
    pub fn from_bytes(bytes: &[u8], source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            Error::Input(format!(
                "cannot read {source}: not a valid safetensors file ({e})"
            ))
        })?;
        let tensors = st
            .iter()
            .map(|(name, t)| {
                (
                    name.to_string(),
                    RawTensor {
                        dtype: t.dtype(),
                        shape: t.shape().to_vec(),
                        data: t.data().to_vec(),
                    },
                )
            })
            .collect();
        Ok(Self { source, tensors })
    }

    /// Where the tensors came from (the path, as given).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The names of every tensor in the file, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The names of every tensor, sorted and comma-separated (`no tensors` for an empty file), for
    /// error messages.
    pub fn names_list(&self) -> String {
        if self.tensors.is_empty() {
            "no tensors".to_string()
        } else {
            self.names().collect::<Vec<_>>().join(", ")
        }
    }

    /// Whether the file has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    fn get(&self, name: &str) -> Result<&RawTensor> {
        self.tensors.get(name).ok_or_else(|| {
            Error::Input(format!(
                "missing tensor `{name}` in {} (it has: {})",
                self.source,
                self.names_list()
            ))
        })
    }

    /// The element type of the floating-point tensor `name`.
    ///
    /// Errors: [`Error::Input`] when it is missing or not a floating-point type the crate reads
    /// (f32, f16, bf16, f64).
    pub fn float_dtype(&self, name: &str) -> Result<DType> {
        let t = self.get(name)?;
        float_dtype(t.dtype).ok_or_else(|| {
            Error::Input(format!(
                "tensor `{name}` in {} has dtype {}, which cannot be read as embeddings (expected f32, f16, bf16 or f64)",
                self.source,
                dtype_name(t.dtype)
            ))
        })
    }

    /// The 2-D tensor `name` (N×D, row-major) as a matrix of `T`.
    ///
    /// Errors: [`Error::Input`] when it is missing or its dtype is not `T`; [`Error::Shape`] when it
    /// is not 2-D.
    pub fn matrix<T: Element>(&self, name: &'static str) -> Result<OwnedMatrix<T>> {
        let t = self.get(name)?;
        let dt = self.float_dtype(name)?;
        if dt != T::DTYPE {
            return Err(Error::Input(format!(
                "tensor `{name}` in {} has dtype {dt}, expected {}",
                self.source,
                T::DTYPE
            )));
        }
        let (rows, cols) = match t.shape[..] {
            [r, c] => (r, c),
            _ => {
                return Err(Error::shape(
                    name,
                    shape_string(&t.shape),
                    "a 2-D matrix [N, D] (one embedding per row)",
                ))
            }
        };
        let mut data = vec![T::default(); rows * cols];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut data);
        if dst.len() != t.data.len() {
            // safetensors checks sizes on reading; this only guards the copy.
            return Err(Error::Input(format!(
                "tensor `{name}`: {} bytes for shape {}",
                t.data.len(),
                shape_string(&t.shape)
            )));
        }
        dst.copy_from_slice(&t.data);
        Ok(OwnedMatrix {
            name,
            data,
            rows,
            cols,
        })
    }

    /// The 2-D floating-point tensor `name` (stored as f32, f16, bf16 or f64), widened to f64.
    ///
    /// Errors: as [`TensorFile::matrix`], and [`Error::Input`] for a non-float dtype.
    pub fn matrix_f64(&self, name: &'static str) -> Result<OwnedMatrix<f64>> {
        Ok(match self.float_dtype(name)? {
            DType::F32 => self.matrix::<f32>(name)?.widen(),
            DType::F16 => self.matrix::<half::f16>(name)?.widen(),
            DType::BF16 => self.matrix::<half::bf16>(name)?.widen(),
            DType::F64 => self.matrix::<f64>(name)?,
        })
    }

    /// The 1-D integer tensor `name` (stored as i64, i32 or u8), widened to i64: class labels,
    /// indices.
    ///
    /// Errors: [`Error::Input`] when it is missing or of another dtype; [`Error::Shape`] when it is
    /// not 1-D.
    pub fn integers(&self, name: &str) -> Result<Vec<i64>> {
        self.integers_of(
            name,
            &[Dtype::I64, Dtype::I32, Dtype::U8],
            "a 1-D integer vector [N]",
        )
    }

    /// The 1-D target tensor `name` of cross mode (stored as i64 or i32), widened to i64: read as
    /// [`TensorFile::integers`], but u8 is refused.
    ///
    /// Errors: [`Error::Input`] when it is missing or of another dtype; [`Error::Shape`] when it is
    /// not 1-D. Index ranges are checked later, against the problem ([`crate::LossInputs::validate`]).
    pub fn targets(&self, name: &str) -> Result<Vec<i64>> {
        self.integers_of(
            name,
            &[Dtype::I64, Dtype::I32],
            "a 1-D vector [N] of class indices",
        )
    }

    /// The 1-D tensor `name` stored as one of `accepted` (a subset of i64, i32, u8), widened to
    /// i64; `expected_shape` describes the shape in the error for another rank.
    fn integers_of(
        &self,
        name: &str,
        accepted: &[Dtype],
        expected_shape: &str,
    ) -> Result<Vec<i64>> {
        let t = self.get(name)?;
        if t.shape.len() != 1 {
            return Err(Error::shape(
                name.to_string(),
                shape_string(&t.shape),
                expected_shape,
            ));
        }
        let dtype_error = || {
            let names: Vec<String> = accepted.iter().map(|&d| dtype_name(d)).collect();
            let expected = match names.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => "nothing".to_string(),
            };
            Error::Input(format!(
                "tensor `{name}` in {} has dtype {}, expected {expected}",
                self.source,
                dtype_name(t.dtype)
            ))
        };
        if !accepted.contains(&t.dtype) {
            return Err(dtype_error());
        }
        match t.dtype {
            Dtype::I64 => Ok(widen_integers::<i64>(&t.data)),
            Dtype::I32 => Ok(widen_integers::<i32>(&t.data)),
            Dtype::U8 => Ok(widen_integers::<u8>(&t.data)),
            _ => Err(dtype_error()),
        }
    }

    /// The f32 tensor `name` as an upstream gradient: a scalar (0-D) is [`Upstream::Scalar`], a
    /// 1-D vector [`Upstream::PerAnchor`] (one weight per anchor loss, for reduction `none`).
    ///
    /// Errors: [`Error::Input`] when it is missing or not f32; [`Error::Shape`] for other ranks.
    pub fn upstream(&self, name: &str) -> Result<Upstream> {
        let t = self.get(name)?;
        if t.dtype != Dtype::F32 {
            return Err(Error::Input(format!(
                "tensor `{name}` in {} has dtype {}, expected f32",
                self.source,
                dtype_name(t.dtype)
            )));
        }
        let values: Vec<f64> = t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect();
        match t.shape.len() {
            0 => Ok(Upstream::Scalar(values.first().copied().unwrap_or(1.0))),
            1 => Ok(Upstream::PerAnchor(values)),
            _ => Err(Error::shape(
                name.to_string(),
                shape_string(&t.shape),
                "a scalar [] or one weight per anchor loss [N]",
            )),
        }
    }
}

/// One f32 tensor to write: its name, shape (`[]` for a scalar) and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    /// The name in the file.
    pub name: String,
    /// The shape; the product of the dimensions is `data.len()` (`[]` holds one value).
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

impl OutputTensor {
    /// A tensor called `name` of `shape` holding `data`.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            shape,
            data,
        }
    }

    /// A 0-D tensor holding `x` (rounded to f32).
    pub fn scalar(name: impl Into<String>, x: f64) -> Self {
        Self::new(name, vec![], vec![x as f32])
    }

    /// A 1-D tensor of `values` (rounded to f32).
    pub fn vector(name: impl Into<String>, values: &[f64]) -> Self {
        Self::new(
            name,
            vec![values.len()],
            values.iter().map(|&x| x as f32).collect(),
        )
    }
}

/// The tensors `infonce eval` writes for `output`, in this order:
///
/// - `loss`: a scalar for reductions `mean` and `sum`, one value per anchor for `none`; symmetric
///   mode with `none` writes `loss_rows` and `loss_cols` (N each) instead;
/// - `lse` (one per anchor) and, in symmetric mode, `lse_cols`; both are left out for the simple
///   variant, which has no log-sum-exp;
/// - `grad_<input name>` for each input gradient, shaped as the input;
/// - `grad_temperature` (a scalar) when the temperature is learnable.
///
/// Values are rounded from f64 to f32.
pub fn output_tensors(output: &LossOutput) -> Vec<OutputTensor> {
    let mut v = Vec::new();
    match &output.loss {
        LossValue::Scalar(x) => v.push(OutputTensor::scalar("loss", *x)),
        LossValue::PerAnchor(l) => v.push(OutputTensor::vector("loss", l)),
        LossValue::Symmetric { rows, cols } => {
            v.push(OutputTensor::vector("loss_rows", rows));
            v.push(OutputTensor::vector("loss_cols", cols));
        }
    }
    if !output.lse.is_empty() {
        v.push(OutputTensor::vector("lse", &output.lse));
    }
    if let Some(c) = output.lse_cols.as_ref().filter(|c| !c.is_empty()) {
        v.push(OutputTensor::vector("lse_cols", c));
    }
    for g in &output.grads {
        v.push(OutputTensor::new(
            format!("grad_{}", g.name),
            vec![g.value.rows, g.value.cols],
            g.value.data.iter().map(|&x| x as f32).collect(),
        ));
    }
    if let Some(t) = output.grad_temperature {
        v.push(OutputTensor::scalar("grad_temperature", t));
    }
    v
}

/// Writes `tensors` (f32) as a safetensors file at `path`, atomically: to a temporary file in the
/// same directory, then renamed over `path`. On any error nothing is left behind (a file already
/// at `path` is untouched).
///
/// Errors: [`Error::Shape`] when a tensor's shape does not hold its data, [`Error::Input`] for
/// duplicate names, [`Error::Io`] naming the path when it cannot be written.
pub fn write_f32(path: impl AsRef<Path>, tensors: &[OutputTensor]) -> Result<()> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let expected: usize = t.shape.iter().product();
        if expected != t.data.len() {
            return Err(Error::shape(
                t.name.clone(),
                format!("{} values", t.data.len()),
                format!("{} = {expected} values", shape_string(&t.shape)),
            ));
        }
        if views.iter().any(|(n, _)| n == &t.name) {
            return Err(Error::Input(format!(
                "two output tensors are called `{}`",
                t.name
            )));
        }
        let view = safetensors::tensor::TensorView::new(
            Dtype::F32,
            t.shape.clone(),
            bytemuck::cast_slice(&t.data),
        )
        .map_err(|e| Error::Input(format!("output tensor `{}`: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    let bytes = safetensors::serialize(views, &None)
        .map_err(|e| Error::Input(format!("cannot serialise {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically: to a temporary file in the same directory (named after
/// `path`, the process id and the time, created exclusively and synced), then renamed over `path`.
/// On any error the temporary file is removed and a file already at `path` is untouched.
///
/// Errors: [`Error::Io`] naming `path` when it cannot be written (no file name, no such
/// directory, no permission, a directory in the way).
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let file_name = path.file_name().ok_or_else(|| {
        io_error(
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            "write",
            path,
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.{}-{nanos}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let attempt = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    };
    attempt().map_err(|e| {
        // The temporary file may not exist (open failed); either way it must not stay.
        let _ = fs::remove_file(&tmp);
        io_error(e, "write", path)
    })
}
