//! Built-in synthetic data: seeded clustered unit vectors with class labels.
