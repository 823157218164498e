//! A small training loop (linear encoder + normalisation) driven by this crate's loss.
