//! The emulated CUDA device (tools/emulated-cuda): a `libcuda.so` and a `libcublas.so` built from
//! this crate's own kernels on the host emulator, which cudarc loads like the real libraries.
//!
//! [`load`] makes a process use it: it opens both libraries with `RTLD_GLOBAL` before cudarc
//! opens the driver, so cudarc's later `dlopen("libcuda.so")` finds the already-loaded library by
//! its soname. A real driver, when one can be loaded, always wins: [`load`] then does nothing.
//! `scripts/emulated-cuda` builds the libraries and prints their directory; setting
//! `FUSED_INFONCE_EMULATED_CUDA` to it makes [`load_from_env`] (which the `infonce` program and
//! the GPU tests call) use them. `LD_LIBRARY_PATH=<dir>` works as well, for any program.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The environment variable naming the emulated device's directory.
pub const ENV_DIR: &str = "FUSED_INFONCE_EMULATED_CUDA";

/// The symbol the emulated `libcuda.so` exports (and a real driver does not).
#[cfg(not(feature = "candle-cuda"))]
const MARKER: &[u8] = b"fused_infonce_emulated_device\0";

/// Which driver a process ends up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// A real NVIDIA driver can be loaded; the emulated device was not loaded.
    Real,
    /// The emulated device is loaded, from this directory (`None`: it was already reachable,
    /// e.g. through `LD_LIBRARY_PATH`).
    Emulated(Option<PathBuf>),
}

static LOADED: Mutex<Option<Driver>> = Mutex::new(None);

/// Which `libcuda` the usual library names resolve to now: `Some(true)` the emulated device,
/// `Some(false)` a real driver, `None` none.
///
/// With the `candle-cuda` feature (cudarc's `dynamic-linking`) the process is linked against the
/// real `libcuda`: the emulated device cannot be swapped in, and this answers `Some(false)`.
#[cfg(feature = "candle-cuda")]
fn reachable_driver() -> Option<bool> {
    Some(false)
}

/// Which `libcuda` the usual library names resolve to now: `Some(true)` the emulated device,
/// `Some(false)` a real driver, `None` none.
#[cfg(not(feature = "candle-cuda"))]
fn reachable_driver() -> Option<bool> {
    for name in cudarc::get_lib_name_candidates("cuda") {
        // SAFETY: loading the driver library runs no code of ours; it is unloaded on drop.
        if let Ok(lib) = unsafe { libloading::Library::new(&name) } {
            // SAFETY: only the symbol's presence is checked; it is never called.
            let emulated = unsafe { lib.get::<unsafe extern "C" fn() -> i32>(MARKER) }.is_ok();
            return Some(emulated);
        }
    }
    None
}

/// Loads the emulated device from `dir` (which holds `libcuda.so` and `libcublas.so`) unless a
/// real driver is present; idempotent. Must run before the first CUDA call of the process (a
/// driver cudarc has already opened stays).
pub fn load(dir: &Path) -> Result<Driver> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = loaded.as_ref() {
        return Ok(d.clone());
    }
    let driver = match reachable_driver() {
        Some(false) => Driver::Real,
        Some(true) => Driver::Emulated(None),
        None => {
            for lib in ["libcuda.so", "libcublas.so"] {
                let path = dir.join(lib);
                // SAFETY: the emulated device's libraries; RTLD_GLOBAL keeps them findable by
                // soname for cudarc's own dlopen. They stay loaded for the life of the process.
                let handle = unsafe {
                    libloading::os::unix::Library::open(
                        Some(&path),
                        libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                    )
                }
                .map_err(|e| {
                    Error::Unsupported(format!(
                        "the emulated CUDA device could not be loaded from {}: {e}",
                        path.display()
                    ))
                })?;
                std::mem::forget(handle);
            }
            Driver::Emulated(Some(dir.to_path_buf()))
        }
    };
    *loaded = Some(driver.clone());
    Ok(driver)
}

/// [`load`] from the directory in `FUSED_INFONCE_EMULATED_CUDA`, if it is set (`Ok(None)`
/// otherwise).
pub fn load_from_env() -> Result<Option<Driver>> {
    match std::env::var_os(ENV_DIR) {
        Some(dir) if !dir.is_empty() => load(Path::new(&dir)).map(Some),
        _ => Ok(None),
    }
}

/// What [`load`] did in this process, if it ran.
pub fn loaded() -> Option<Driver> {
    LOADED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
