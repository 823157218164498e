//! The progress bar the long runs (`bench`, `sweep`) report to: the library's
//! [`Progress`] drawn with indicatif on standard error.

use fused_infonce::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar drawn with the indicatif `template`.
    pub fn new(template: &str, len: u64) -> Self {
        let bar = ProgressBar::new(len);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        Bar(bar)
    }

    /// Removes the bar (the table follows).
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn message(&self, what: &str) {
        self.0.set_message(what.to_string());
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn note(&self, line: &str) {
        self.0.println(line);
    }
}
