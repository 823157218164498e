//! Progress of a long computation (a benchmark, a sweep, a training run), reported to whoever
//! shows it: the `infonce` program draws a bar; a library caller may pass `&()` for none.

/// Receives progress reports. Every method has a do-nothing default.
pub trait Progress {
    /// What is being done now (replaces the previous message).
    fn message(&self, _what: &str) {}
    /// `n` more units of work are done.
    fn advance(&self, _n: u64) {}
    /// A line to show as it is (a note, a warning), without losing the progress display.
    fn note(&self, _line: &str) {}
}

/// No progress output.
impl Progress for () {}
