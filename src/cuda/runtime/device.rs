//! The [`Gpu`] handle: a CUDA context and the stream every op of this crate runs on, the device's
//! properties, and the lazily loaded kernel modules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdevice_attribute as Attr};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};

use super::module;
use crate::error::{Error, Result};

/// What the crate needs to know about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProperties {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors.
    pub sm_count: u32,
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// Largest shared memory (static + dynamic) a block may opt in to, in bytes.
    pub max_shared_per_block: u32,
    /// Shared memory a block gets without opting in (48 KiB).
    pub shared_per_block: u32,
    /// Largest block size.
    pub max_threads_per_block: u32,
    /// Largest grid in x.
    pub max_grid_x: u32,
    /// Largest grid in y (and z).
    pub max_grid_y: u32,
    /// Whether this is the emulated CUDA device ([`super::emulated`]), not a GPU: results are
    /// computed by host builds of the kernels, and timings mean nothing.
    pub emulated: bool,
}

/// Whether the CUDA driver library can be loaded on this machine (never panics).
#[cfg(not(feature = "candle-cuda"))]
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names; loads nothing else.
    unsafe { sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded on this machine: always, in a build with the
/// `candle-cuda` feature, where candle turns on cudarc's `dynamic-linking` (the program is linked
/// against libcuda and does not start without it).
#[cfg(feature = "candle-cuda")]
pub fn driver_present() -> bool {
    true
}

/// The installed driver's CUDA version as (major, minor), e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    if !driver_present() {
        return Err(Error::NoCudaDriver);
    }
    let mut v = 0i32;
    // SAFETY: the library is present (checked above); the call writes one int.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result()?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// The number of CUDA devices (an error without a driver).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoCudaDriver);
    }
    Ok(CudaContext::device_count()?.max(0) as usize)
}

/// Properties of every device, without keeping contexts alive.
pub fn list_devices() -> Result<Vec<DeviceProperties>> {
    (0..device_count()?)
        .map(|i| {
            let ctx = CudaContext::new(i)?;
            properties(&ctx)
        })
        .collect()
}

/// The phrase the emulated device's name carries (tools/emulated-cuda/driver.cpp).
const EMULATED_NAME: &str = "fused-infonce emulated device";

/// The properties of `ctx`'s device: read once per device ordinal and kept (they do not change
/// while the process runs), so wrapping an engine's stream per call stays cheap.
fn properties(ctx: &Arc<CudaContext>) -> Result<DeviceProperties> {
    static CACHE: Mutex<Vec<DeviceProperties>> = Mutex::new(Vec::new());
    let ordinal = ctx.ordinal();
    if let Some(p) = CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|p| p.ordinal == ordinal)
    {
        return Ok(p.clone());
    }
    let p = read_properties(ctx)?;
    CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(p.clone());
    Ok(p)
}

fn read_properties(ctx: &Arc<CudaContext>) -> Result<DeviceProperties> {
    let attr = |a: Attr| -> Result<u32> { Ok(ctx.attribute(a)?.max(0) as u32) };
    let name = ctx.name()?;
    Ok(DeviceProperties {
        ordinal: ctx.ordinal(),
        emulated: name.contains(EMULATED_NAME),
        name,
        compute_capability: ctx.compute_capability()?,
        sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        total_memory: ctx.total_mem()?,
        max_shared_per_block: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        shared_per_block: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
        max_threads_per_block: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
        max_grid_x: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
        max_grid_y: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
    })
}

/// The process-wide handle on device 0 behind the host conveniences ([`crate::cuda::evaluate`], the
/// training sweep's CUDA backend): opened on first use and kept, since a context and its loaded
/// modules cost milliseconds to open and a host call per training step should not pay that. A
/// failure is returned and not kept, so a later call tries again.
pub fn default_gpu() -> Result<Arc<Gpu>> {
    static DEFAULT: Mutex<Option<Arc<Gpu>>> = Mutex::new(None);
    let mut g = DEFAULT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(gpu) = g.as_ref() {
        return Ok(gpu.clone());
    }
    let gpu = Arc::new(Gpu::new(0)?);
    *g = Some(gpu.clone());
    Ok(gpu)
}

/// A CUDA device with the stream this crate's ops are queued on.
///
/// Create one with [`Gpu::new`] (its own context's default stream) or wrap an engine's stream with
/// [`Gpu::from_stream`], so the loss runs in order with the engine's other work. Kernel modules
/// are loaded on first use and cached.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    props: DeviceProperties,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("props", &self.props).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` on a new stream of its primary context.
    ///
    /// Returns [`Error::NoCudaDriver`] when the driver library is missing (never panics),
    /// [`Error::NoDevice`] when there is no such device.
    pub fn new(ordinal: usize) -> Result<Self> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(Error::NoDevice(if n == 0 {
                "the CUDA driver reports no device".to_string()
            } else {
                format!("device {ordinal} requested, {n} present")
            }));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Self::from_stream(stream)
    }

    /// Opens device 0; the error says why there is no usable GPU (no driver, no device), which is
    /// how tests and tools decide to skip GPU work.
    pub fn first() -> std::result::Result<Self, Error> {
        Self::new(0)
    }

    /// Wraps a caller's stream (e.g. a training engine's), so every op of this crate is queued on
    /// it, in order with the caller's work.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let props = properties(&ctx)?;
        Ok(Self {
            ctx,
            stream,
            props,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's properties.
    pub fn properties(&self) -> &DeviceProperties {
        &self.props
    }
    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream ops are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for the stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// The kernel `function` of the embedded module `module` (the `kernels/<module>.cu` file),
    /// loading the module on first use.
    pub fn function(&self, module: &'static str, function: &str) -> Result<CudaFunction> {
        let m = {
            let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(module) {
                Some(m) => m.clone(),
                None => {
                    let m = self.load_module(module)?;
                    cache.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(function).map_err(|e| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_FOUND {
                Error::Unsupported(format!("kernel `{function}` is not in module `{module}`"))
            } else {
                Error::Driver(e)
            }
        })
    }

    fn load_module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        if !module::kernels_built() {
            return Err(Error::KernelsNotBuilt);
        }
        let bytes = module::fatbin(name).ok_or_else(|| {
            Error::Unsupported(format!("no embedded kernel module `{name}` in this build"))
        })?;
        let image = cudarc::nvrtc::Ptx::from_binary(bytes.to_vec());
        self.ctx.load_module(image).map_err(|e: DriverError| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_BINARY_FOR_GPU
                || e.0 == sys::cudaError_enum::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            {
                let (maj, min) = self.props.compute_capability;
                Error::NoKernelImage(format!(
                    "module `{name}` was built for {:?} and has no code for sm_{maj}{min} that this \
                     driver can load ({e}); rebuild with FUSED_INFONCE_CUDA_ARCHS including sm_{maj}{min}",
                    module::TARGET_ARCHS
                ))
            } else {
                Error::Driver(e)
            }
        })
    }

    /// In debug builds, waits for the stream and reports an asynchronous error of the launch of
    /// `kernel` right away (release builds report it at the next synchronising call). Not on the
    /// emulated device: it reports a kernel's faults from the launch itself, and a host
    /// synchronisation after every launch would order all streams and hide the races its checks
    /// look for.
    pub fn check_launch(&self, kernel: &'static str) -> Result<()> {
        if cfg!(debug_assertions) && !self.props.emulated {
            self.stream.synchronize().map_err(|e| Error::Launch {
                kernel,
                reason: format!("asynchronous error after launch: {e}"),
            })?;
        }
        Ok(())
    }
}

/// Opens device 0 for a test or a tool.
///
/// The emulated device is loaded first when `FUSED_INFONCE_EMULATED_CUDA` names one
/// ([`super::emulated::load_from_env`]; a real driver wins). Returns `None`, after writing
/// `skipped: no CUDA device (<reason>)` for `what` to stderr, only when no CUDA driver can be
/// loaded at all and `FUSED_INFONCE_REQUIRE_GPU` is not `1`. Anything else that keeps device 0
/// from opening — a driver that loads but reports no device or fails, the emulated device failing
/// to load — panics: a test must fail there, not pass while checking nothing.
///
/// The line is written to the process's stderr directly, not through `eprintln!`, so that
/// `cargo test` shows it even for passing tests whose output it captures.
pub fn gpu_or_skip(what: &str) -> Option<Gpu> {
    if let Err(e) = super::emulated::load_from_env() {
        panic!("{what}: {e}");
    }
    let required = std::env::var("FUSED_INFONCE_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(Error::NoCudaDriver) if !required => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{what}: skipped: no CUDA device ({})",
                Error::NoCudaDriver
            );
            None
        }
        Err(e) => panic!("{what}: the CUDA device cannot be opened: {e}"),
    }
}
