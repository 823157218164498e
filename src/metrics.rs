//! Embedding metrics on the CPU: alignment, uniformity, tolerance, penalty histogram, effective
//! negatives (spec/losses.md, Metrics).
