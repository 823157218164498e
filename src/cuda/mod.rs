//! The CUDA backend: device handle, embedded kernels, device matrices and kernel launches.
