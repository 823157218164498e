//! The steps several kernel paths share, below them: normalising the inputs' rows and chaining
//! gradients back through it ([`normalize`]), the hard-negative thresholds of `hard:k`
//! ([`select`], over the pair sets of [`pairs`] that the metrics kernels read too), the loss's
//! reduction ([`reduce`]) and dtype conversions ([`convert`]: gradients in the input dtype, the
//! tf32 path's inputs). Each is a kernel of `kernels/` behind one function; none imports a path.

pub mod convert;
pub mod normalize;
pub mod pairs;
pub mod reduce;
pub mod select;
