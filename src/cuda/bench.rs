//! Timing and device-peak helpers for the benchmarks.
