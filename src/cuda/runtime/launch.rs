//! The launch layer every kernel family (and the cuBLAS calls) goes through.
//!
//! - Each family computes its grid, block and shared memory in one function; [`launch`] checks the
//!   configuration against the device ([`checked`]), opts the function in to dynamic shared
//!   memory beyond 48 KiB when it needs it (never above the device's opt-in maximum), queues the
//!   kernel and, in debug builds, reports an asynchronous error right away.
//! - Arguments are collected in [`Args`], in the order of the kernel's `extern "C"` signature
//!   (which each launch site mirrors next to its call). Device buffers go in as
//!   [`Args::read`] (a `const T*` parameter) or [`Args::write`] (`T*`): the launch then waits for
//!   the work cudarc knows must come first (a write on another stream before a read; reads and
//!   writes before a write) and records its own use once it has been queued, so that on an
//!   engine's streams no output is read early and no input is freed too soon. A device address
//!   leaves `Args` only as a [`Ptr`] ([`Args::read_ptr`] / [`Args::write_ptr`], for kernel
//!   parameter structs and cuBLAS operands), whose buffer's guard the `Args` keeps; only the
//!   runtime reads the number inside.

use std::ffi::c_void;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, SyncOnDrop};

use super::device::Gpu;

/// A device address handed out by [`Args::read_ptr`] / [`Args::write_ptr`], valid while that
/// `Args` (which holds the buffer's guard) is alive; [`Ptr::NULL`] is a null pointer. It is a
/// kernel parameter as is (`#[repr(transparent)]` over the 64-bit address), for the fields of
/// `#[repr(C)]` parameter structs; nothing outside the runtime can read or forge the number.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ptr(u64);

impl Ptr {
    /// The null pointer (an absent optional buffer).
    pub const NULL: Ptr = Ptr(0);

    /// The address, for the runtime's own calls (cuBLAS).
    pub(in crate::cuda::runtime) fn addr(self) -> u64 {
        self.0
    }
}

// SAFETY: a plain 64-bit integer, passed by value as a device pointer parameter.
unsafe impl DeviceRepr for Ptr {}
use crate::error::{Error, Result};

/// Checks `cfg` against `gpu`'s limits (block size, grid size, shared memory) and returns it.
pub fn checked(gpu: &Gpu, kernel: &'static str, cfg: LaunchConfig) -> Result<LaunchConfig> {
    let p = gpu.properties();
    let threads = cfg.block_dim.0 as u64 * cfg.block_dim.1 as u64 * cfg.block_dim.2 as u64;
    let err = |reason: String| Err(Error::Launch { kernel, reason });
    if threads == 0 || threads > p.max_threads_per_block as u64 {
        return err(format!(
            "block of {threads} threads (device allows 1..={})",
            p.max_threads_per_block
        ));
    }
    if cfg.grid_dim.0 == 0 || cfg.grid_dim.0 > p.max_grid_x {
        return err(format!(
            "grid.x = {} (device allows 1..={})",
            cfg.grid_dim.0, p.max_grid_x
        ));
    }
    if cfg.grid_dim.1 == 0
        || cfg.grid_dim.1 > p.max_grid_y
        || cfg.grid_dim.2 == 0
        || cfg.grid_dim.2 > p.max_grid_y
    {
        return err(format!(
            "grid.y/z = {}/{} (device allows 1..={})",
            cfg.grid_dim.1, cfg.grid_dim.2, p.max_grid_y
        ));
    }
    if cfg.shared_mem_bytes > p.max_shared_per_block {
        return err(format!(
            "{} bytes of shared memory (device allows {})",
            cfg.shared_mem_bytes, p.max_shared_per_block
        ));
    }
    Ok(cfg)
}

/// `ceil(a / b)` as a grid dimension, or a launch error when it does not fit in u32.
pub fn grid_dim(kernel: &'static str, a: usize, b: usize) -> Result<u32> {
    let g = a.div_ceil(b.max(1)).max(1);
    u32::try_from(g).map_err(|_| Error::Launch {
        kernel,
        reason: format!("grid of {g} blocks does not fit in 32 bits"),
    })
}

/// One kernel parameter's value (the driver copies `size` bytes from its address, as the
/// kernel's signature says).
enum Param {
    U32(u32),
    U64(u64),
    F32(f32),
    /// A struct passed by value (8-byte aligned storage).
    Bytes(Box<[u64]>),
}

impl Param {
    fn ptr(&mut self) -> *mut c_void {
        match self {
            Param::U32(v) => v as *mut u32 as *mut c_void,
            Param::U64(v) => v as *mut u64 as *mut c_void,
            Param::F32(v) => v as *mut f32 as *mut c_void,
            Param::Bytes(b) => b.as_mut_ptr() as *mut c_void,
        }
    }
}

/// A grid-stride launch over `n` elements: blocks of 256 threads, enough to cover `n` but at
/// most 16 per SM (the kernel loops over the rest).
pub fn grid_stride(gpu: &Gpu, n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(256)
        .clamp(1, gpu.properties().sm_count.max(1) as usize * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The arguments of one launch (or one cuBLAS call) and the guards of the device buffers it uses.
/// See the module documentation.
pub struct Args<'a> {
    gpu: &'a Gpu,
    params: Vec<Param>,
    guards: Vec<SyncOnDrop<'a>>,
}

impl std::fmt::Debug for Args<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("params", &self.params.len())
            .field("buffers", &self.guards.len())
            .finish()
    }
}

fn offset_bytes<T>(len: usize, offset: usize) -> Result<u64> {
    if offset > len {
        return Err(Error::Launch {
            kernel: "argument",
            reason: format!("offset {offset} past the end of a {len}-element buffer"),
        });
    }
    Ok((offset * std::mem::size_of::<T>()) as u64)
}

impl<'a> Args<'a> {
    /// No arguments yet, for a launch on `gpu`'s stream.
    pub fn new(gpu: &'a Gpu) -> Self {
        Self {
            gpu,
            params: Vec::new(),
            guards: Vec::new(),
        }
    }
    /// An `int` parameter.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.params.push(Param::U32(v as u32));
        self
    }
    /// An `int64_t` parameter.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.params.push(Param::U64(v as u64));
        self
    }
    /// A `uint64_t` parameter.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.params.push(Param::U64(v));
        self
    }
    /// A `float` parameter.
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.params.push(Param::F32(v));
        self
    }
    /// A null pointer parameter (an absent optional buffer).
    pub fn null(&mut self) -> &mut Self {
        self.u64(0)
    }
    /// A struct passed by value (laid out as the kernel's C struct: `#[repr(C)]`, asserted on
    /// both sides).
    pub fn value<V: DeviceRepr + Copy>(&mut self, v: V) -> &mut Self {
        let words = std::mem::size_of::<V>().div_ceil(8).max(1);
        let mut b = vec![0u64; words].into_boxed_slice();
        // SAFETY: `b` holds at least size_of::<V>() bytes, 8-byte aligned (≥ V's alignment for
        // the plain-old-data kernel structs this takes); V is Copy.
        unsafe { std::ptr::write_unaligned(b.as_mut_ptr() as *mut V, v) };
        self.params.push(Param::Bytes(b));
        self
    }
    /// The address of element `offset` of a buffer the launch reads, keeping its guard.
    pub fn read_ptr<T>(&mut self, buf: &'a CudaSlice<T>, offset: usize) -> Result<Ptr> {
        let off = offset_bytes::<T>(buf.len(), offset)?;
        let (p, g) = buf.device_ptr(self.gpu.stream());
        self.guards.push(g);
        Ok(Ptr(p + off))
    }
    /// The address of element `offset` of a buffer the launch writes, keeping its guard.
    pub fn write_ptr<T>(&mut self, buf: &'a mut CudaSlice<T>, offset: usize) -> Result<Ptr> {
        let off = offset_bytes::<T>(buf.len(), offset)?;
        let (p, g) = buf.device_ptr_mut(self.gpu.stream());
        self.guards.push(g);
        Ok(Ptr(p + off))
    }
    /// A `const T*` parameter: the buffer, read.
    pub fn read<T>(&mut self, buf: &'a CudaSlice<T>) -> &mut Self {
        let (p, g) = buf.device_ptr(self.gpu.stream());
        self.guards.push(g);
        self.u64(p)
    }
    /// A `const T*` parameter at element `offset` of the buffer.
    pub fn read_at<T>(&mut self, buf: &'a CudaSlice<T>, offset: usize) -> Result<&mut Self> {
        let p = self.read_ptr(buf, offset)?;
        Ok(self.u64(p.0))
    }
    /// A `const T*` parameter that may be absent (null).
    pub fn read_opt<T>(&mut self, buf: Option<&'a CudaSlice<T>>) -> &mut Self {
        match buf {
            Some(b) => self.read(b),
            None => self.null(),
        }
    }
    /// A `T*` parameter: the buffer, written (and possibly read).
    pub fn write<T>(&mut self, buf: &'a mut CudaSlice<T>) -> &mut Self {
        let (p, g) = buf.device_ptr_mut(self.gpu.stream());
        self.guards.push(g);
        self.u64(p)
    }
    /// A `T*` parameter at element `offset` of the buffer.
    pub fn write_at<T>(&mut self, buf: &'a mut CudaSlice<T>, offset: usize) -> Result<&mut Self> {
        let p = self.write_ptr(buf, offset)?;
        Ok(self.u64(p.0))
    }
    /// A `T*` parameter that may be absent (null).
    pub fn write_opt<T>(&mut self, buf: Option<&'a mut CudaSlice<T>>) -> &mut Self {
        match buf {
            Some(b) => self.write(b),
            None => self.null(),
        }
    }
}

/// Queues kernel `name` of module `module` (the kernel family `family`, for messages) on `gpu`'s
/// stream with `cfg` (checked against the device) and `args`, in the order of the kernel's
/// signature. Sets the function's dynamic-shared-memory maximum when static + dynamic shared
/// memory exceeds the 48 KiB a block gets without opting in (CUDA C++ Programming Guide,
/// "Shared Memory"), after checking the sum against the device's opt-in maximum.
///
/// # Safety
/// `args` must match the kernel's parameters in number, order and type, every buffer must hold
/// what the kernel reads and writes for this configuration, and the configuration must be the
/// one the kernel is written for (block size, shared memory): the launch site says why, next to
/// the signature it mirrors.
pub unsafe fn launch(
    gpu: &Gpu,
    family: &'static str,
    module: &'static str,
    name: &str,
    cfg: LaunchConfig,
    mut args: Args<'_>,
) -> Result<()> {
    let f = gpu.function(module, name)?;
    let cfg = checked(gpu, family, cfg)?;
    let dynamic = cfg.shared_mem_bytes;
    if dynamic > 0 {
        let p = gpu.properties();
        let fixed = f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        let total = fixed.max(0) as u64 + dynamic as u64;
        if total > p.max_shared_per_block as u64 {
            return Err(Error::Launch {
                kernel: family,
                reason: format!(
                    "{fixed} bytes of static and {dynamic} of dynamic shared memory (the device \
                     allows {} per block)",
                    p.max_shared_per_block
                ),
            });
        }
        if total > p.shared_per_block as u64 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic as i32,
            )?;
        }
    }
    let mut ptrs: Vec<*mut c_void> = args.params.iter_mut().map(Param::ptr).collect();
    // SAFETY: the caller's contract (above); `ptrs` point into `args`, alive until the launch
    // has been queued (the driver copies the values).
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            cfg.grid_dim,
            cfg.block_dim,
            cfg.shared_mem_bytes,
            gpu.stream().cu_stream(),
            &mut ptrs,
        )
    }?;
    // The guards record the buffers' use now that the launch is queued.
    drop(ptrs);
    drop(args);
    gpu.check_launch(family)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_values_keep_their_bytes() {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct P {
            a: u64,
            b: i32,
            c: f32,
            d: u8,
        }
        // SAFETY: plain old data.
        unsafe impl DeviceRepr for P {}
        let mut p = Param::Bytes(vec![0u64; 3].into_boxed_slice());
        if let Param::Bytes(b) = &mut p {
            let v = P {
                a: 7,
                b: -3,
                c: 1.5,
                d: 9,
            };
            unsafe { std::ptr::write_unaligned(b.as_mut_ptr() as *mut P, v) };
        }
        let q = unsafe { std::ptr::read_unaligned(p.ptr() as *const P) };
        assert_eq!((q.a, q.b, q.c, q.d), (7, -3, 1.5, 9));
    }

    #[test]
    fn offsets_past_the_end_are_errors() {
        assert_eq!(offset_bytes::<f32>(10, 10).unwrap(), 40);
        assert!(offset_bytes::<f32>(10, 11).is_err());
    }
}
