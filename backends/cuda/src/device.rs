//! One CUDA device as the backend uses it: the context, one stream that
//! every kernel, copy and GEMM is queued on (so work runs in submission
//! order and a freed buffer can be reused at once), a caching allocator,
//! the cuBLAS handle and the NVRTC-compiled kernel modules.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as blas;
use cudarc::driver::{result as drv, sys, CudaContext, CudaStream};
use emu_core::{DType, Error, Result};

use crate::kernels::Module;
use crate::NAME;

pub(crate) fn backend_err(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: NAME.to_string(),
        message: message.into(),
    }
}

pub(crate) fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported {
        backend: NAME.to_string(),
        what: what.into(),
    }
}

fn drv_err(what: &str, e: drv::DriverError) -> Error {
    backend_err(format!("{what}: {e:?}"))
}

/// Free blocks kept for reuse beyond which released blocks are freed.
const POOL_KEEP_FRACTION: u64 = 4; // a quarter of the device memory

#[derive(Default)]
struct Pool {
    /// Free blocks by size.
    free: BTreeMap<usize, Vec<u64>>,
    free_bytes: u64,
}

/// Rounds a request to the size of the block that serves it: powers of two
/// up to 1 MiB (small tensors of varying shapes share blocks), whole MiB
/// above (weights are not doubled).
pub(crate) fn block_size(bytes: usize) -> usize {
    const MIB: usize = 1 << 20;
    let b = bytes.max(256);
    if b <= MIB {
        b.next_power_of_two()
    } else {
        b.div_ceil(MIB) * MIB
    }
}

struct Loaded {
    module: sys::CUmodule,
    funcs: HashMap<String, sys::CUfunction>,
}

struct Blas(blas::cublasHandle_t);

/// Raw CUDA handles used under the locks below.
struct Handles {
    modules: HashMap<Module, Loaded>,
}

// SAFETY: CUDA modules, functions and cuBLAS handles may be used from any
// thread once the context is current there; the mutexes serialise use.
unsafe impl Send for Handles {}
unsafe impl Send for Blas {}

pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    pub arch: (i32, i32),
    pub sms: u32,
    pub total_mem: u64,
    /// Run f32 GEMMs on TF32 tensor cores (changes results; off by default).
    pub tf32: bool,
    pool: Mutex<Pool>,
    handles: Mutex<Handles>,
    blas: Mutex<Blas>,
}

/// A device buffer that goes back to the pool when dropped.
pub(crate) struct Storage {
    pub ptr: u64,
    pub bytes: usize,
    dev: Arc<Device>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.dev.release(self.ptr, self.bytes);
    }
}

/// Kernel arguments, each in its own 8-byte-aligned heap cell so that the
/// pointers handed to `cuLaunchKernel` stay valid.
#[derive(Default)]
pub(crate) struct Args(Vec<Vec<u64>>);

impl Args {
    pub fn push<T: Copy>(&mut self, v: T) -> &mut Self {
        let n = std::mem::size_of::<T>().div_ceil(8).max(1);
        let mut cell = vec![0u64; n];
        // SAFETY: the cell holds at least size_of::<T>() bytes and is 8-aligned.
        unsafe { std::ptr::write_unaligned(cell.as_mut_ptr() as *mut T, v) };
        self.0.push(cell);
        self
    }
}

impl Device {
    pub fn open(ordinal: usize, tf32: bool) -> Result<Arc<Device>> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| crate::unavailable(format!("cannot open device {ordinal}: {e:?}")))?;
        // The backend orders all work on its own stream; cudarc's per-slice
        // event tracking is for its safe API, which is not used here.
        // SAFETY: no cudarc CudaSlice is ever created by this backend.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| crate::unavailable(format!("cannot create a stream: {e:?}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        let arch = ctx
            .compute_capability()
            .map_err(|e| crate::unavailable(format!("cannot read the compute capability: {e:?}")))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(1)
            .max(1) as u32;
        let total_mem = ctx.total_mem().unwrap_or(0) as u64;
        let handle = cudarc::cublas::result::create_handle()
            .map_err(|e| crate::unavailable(format!("cannot start cuBLAS: {e:?}")))?;
        // SAFETY: a fresh handle and this backend's live stream.
        unsafe { cudarc::cublas::result::set_stream(handle, stream.cu_stream() as blas::cudaStream_t) }
            .map_err(|e| crate::unavailable(format!("cannot bind cuBLAS to the stream: {e:?}")))?;
        Ok(Arc::new(Device {
            ctx,
            stream,
            ordinal,
            name,
            arch,
            sms,
            total_mem,
            tf32,
            pool: Mutex::new(Pool::default()),
            handles: Mutex::new(Handles {
                modules: HashMap::new(),
            }),
            blas: Mutex::new(Blas(handle)),
        }))
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| drv_err("binding the context", e))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| drv_err("synchronizing the stream", e))
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        self.bind()?;
        let (f, t) = self.ctx.mem_get_info().map_err(|e| drv_err("querying memory", e))?;
        Ok((f as u64, t as u64))
    }

    /// A buffer of at least `bytes` bytes, from the pool when one is free.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<Storage> {
        let size = block_size(bytes);
        {
            let mut pool = self.pool.lock().map_err(|_| backend_err("memory pool lock poisoned"))?;
            // Any free block up to 1/8 larger serves the request.
            let hit = pool
                .free
                .range_mut(size..=size + size / 8)
                .find_map(|(&s, v)| v.pop().map(|p| (s, p)));
            if let Some((s, ptr)) = hit {
                pool.free_bytes -= s as u64;
                pool.free.retain(|_, v| !v.is_empty());
                return Ok(Storage {
                    ptr,
                    bytes: s,
                    dev: self.clone(),
                });
            }
        }
        self.bind()?;
        // SAFETY: plain allocation in the bound context.
        let ptr = match unsafe { drv::malloc_sync(size) } {
            Ok(p) => p,
            Err(_) => {
                // Out of memory with blocks cached: give them back and retry.
                self.trim(0)?;
                unsafe { drv::malloc_sync(size) }.map_err(|e| {
                    let (free, total) = self.mem_info().unwrap_or((0, 0));
                    backend_err(format!(
                        "allocating {size} bytes on {} failed ({e:?}); {} MiB free of {} MiB",
                        self.name,
                        free >> 20,
                        total >> 20
                    ))
                })?
            }
        };
        Ok(Storage {
            ptr,
            bytes: size,
            dev: self.clone(),
        })
    }

    fn release(&self, ptr: u64, bytes: usize) {
        let keep = self.total_mem / POOL_KEEP_FRACTION;
        if let Ok(mut pool) = self.pool.lock() {
            pool.free.entry(bytes).or_default().push(ptr);
            pool.free_bytes += bytes as u64;
            if pool.free_bytes <= keep {
                return;
            }
        }
        let _ = self.trim(keep / 2);
    }

    /// Frees cached blocks, largest first, until at most `keep` bytes stay cached.
    pub fn trim(&self, keep: u64) -> Result<()> {
        let mut pool = self.pool.lock().map_err(|_| backend_err("memory pool lock poisoned"))?;
        if pool.free_bytes <= keep {
            return Ok(());
        }
        // Queued kernels may still use the blocks.
        self.bind()?;
        self.synchronize()?;
        while pool.free_bytes > keep {
            let Some((&size, _)) = pool.free.iter().next_back() else {
                break;
            };
            let (ptr, now_empty) = {
                let v = pool.free.get_mut(&size).expect("key just seen");
                (v.pop(), v.is_empty())
            };
            if now_empty {
                pool.free.remove(&size);
            }
            if let Some(ptr) = ptr {
                pool.free_bytes -= size as u64;
                // SAFETY: the block is idle (stream synchronised) and owned by the pool.
                unsafe { drv::free_sync(ptr) }.map_err(|e| drv_err("freeing memory", e))?;
            }
        }
        Ok(())
    }

    pub fn upload(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst holds at least bytes.len() bytes; synchronising before
        // returning keeps the host slice alive for the whole copy.
        unsafe { drv::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }
            .map_err(|e| drv_err("copying to the device", e))?;
        self.synchronize()
    }

    pub fn download(&self, src: u64, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: src holds at least out.len() bytes; the copy completes before return.
        unsafe { drv::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
            .map_err(|e| drv_err("copying from the device", e))?;
        self.synchronize()
    }

    fn function(&self, module: Module, name: &str) -> Result<sys::CUfunction> {
        let mut h = self
            .handles
            .lock()
            .map_err(|_| backend_err("module cache lock poisoned"))?;
        if let std::collections::hash_map::Entry::Vacant(slot) = h.modules.entry(module) {
            let arch = format!("compute_{}{}", self.arch.0, self.arch.1);
            let cache = crate::kernels::ptx_cache_dir();
            let load = |ptx: String| -> std::result::Result<sys::CUmodule, String> {
                let image = CString::new(ptx).map_err(|_| "PTX with a NUL byte".to_string())?;
                // SAFETY: a NUL-terminated PTX image, loaded into the bound context.
                unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| format!("{e:?}"))
            };
            let (ptx, origin) = crate::kernels::compile_cached(module, &arch, cache.as_deref()).map_err(backend_err)?;
            let loaded = match (load(ptx), origin, &cache) {
                // A cached entry the driver refuses is dropped and compiled afresh.
                (Err(_), crate::kernels::PtxOrigin::Cache, Some(dir)) => {
                    crate::kernels::forget_cached(module, &arch, dir);
                    load(crate::kernels::compile(module, &arch).map_err(backend_err)?)
                }
                (r, _, _) => r,
            };
            let raw = loaded.map_err(|e| {
                backend_err(format!(
                    "the driver cannot load the PTX of {} ({e}); an NVRTC newer than the driver \
                     produces PTX it cannot read: use the NVRTC of the driver's CUDA version",
                    module.name()
                ))
            })?;
            slot.insert(Loaded {
                module: raw,
                funcs: HashMap::new(),
            });
        }
        let loaded = h.modules.get_mut(&module).expect("inserted above");
        if let Some(f) = loaded.funcs.get(name) {
            return Ok(*f);
        }
        let cname = CString::new(name).map_err(|_| backend_err("kernel name with a NUL byte"))?;
        // SAFETY: a live module of this context.
        let f = unsafe { drv::module::get_function(loaded.module, cname) }
            .map_err(|e| backend_err(format!("kernel `{name}` missing from {}: {e:?}", module.name())))?;
        loaded.funcs.insert(name.to_string(), f);
        Ok(f)
    }

    /// Queues one kernel launch on the stream.
    pub fn launch(&self, module: Module, name: &str, grid: u32, block: u32, args: &mut Args) -> Result<()> {
        self.bind()?;
        let f = self.function(module, name)?;
        let mut ptrs: Vec<*mut c_void> = args.0.iter_mut().map(|c| c.as_mut_ptr() as *mut c_void).collect();
        // SAFETY: the argument list matches the kernel's signature (each call
        // site mirrors its `extern "C"` declaration) and every device pointer
        // refers to a live buffer large enough for the launch.
        unsafe {
            drv::launch_kernel(
                f,
                (grid.max(1), 1, 1),
                (block, 1, 1),
                0,
                self.stream.cu_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| drv_err(&format!("launching `{name}`"), e))
    }

    /// `C = A B` in row-major terms for `batch` matrices (see [`crate::gemm`]).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(&self, dtype: DType, g: &crate::gemm::Gemm) -> Result<()> {
        use blas::cudaDataType::*;
        let (ty, compute) = match dtype {
            DType::F32 if self.tf32 => (CUDA_R_32F, blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32),
            DType::F32 => (CUDA_R_32F, blas::cublasComputeType_t::CUBLAS_COMPUTE_32F),
            DType::F16 => (CUDA_R_16F, blas::cublasComputeType_t::CUBLAS_COMPUTE_32F),
            DType::BF16 => (CUDA_R_16BF, blas::cublasComputeType_t::CUBLAS_COMPUTE_32F),
            other => return Err(unsupported(format!("matmul of {other}"))),
        };
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1f32, 0f32);
        self.bind()?;
        let h = self.blas.lock().map_err(|_| backend_err("cuBLAS lock poisoned"))?;
        // SAFETY: the operands' pointers, leading dimensions and batch strides
        // were derived from live tensors by `gemm::plan`, which checks that
        // every matrix lies inside its buffer's view.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                h.0,
                op(g.first.trans),
                op(g.second.trans),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &alpha as *const f32 as *const c_void,
                g.first.ptr as *const c_void,
                ty,
                g.first.ld as i32,
                g.first.batch_stride,
                g.second.ptr as *const c_void,
                ty,
                g.second.ld as i32,
                g.second.batch_stride,
                &beta as *const f32 as *const c_void,
                g.out.ptr as *mut c_void,
                ty,
                g.out.ld as i32,
                g.out.batch_stride,
                g.batch as i32,
                compute,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| backend_err(format!("cuBLAS GEMM ({}x{}x{}, {dtype}): {e:?}", g.m, g.n, g.k)))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.bind();
        let _ = self.synchronize();
        let _ = self.trim(0);
        if let Ok(h) = self.blas.lock() {
            // SAFETY: the handle is not used after this.
            let _ = unsafe { cudarc::cublas::result::destroy_handle(h.0) };
        }
        if let Ok(h) = self.handles.lock() {
            for l in h.modules.values() {
                // SAFETY: no kernel of the module is queued (stream synchronised).
                let _ = unsafe { drv::module::unload(l.module) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_round_small_to_powers_of_two_and_large_to_mib() {
        assert_eq!(block_size(0), 256);
        assert_eq!(block_size(300), 512);
        assert_eq!(block_size(1 << 20), 1 << 20);
        assert_eq!(block_size((1 << 20) + 1), 2 << 20);
        assert_eq!(block_size(90 << 20), 90 << 20);
        assert_eq!(block_size((90 << 20) + 5), 91 << 20);
    }

    #[test]
    fn kernel_arguments_keep_their_bytes() {
        let mut a = Args::default();
        a.push(7i64).push(2.5f32).push(0xabcdu16);
        assert_eq!(a.0[0][0], 7);
        assert_eq!(a.0[1][0] as u32, 2.5f32.to_bits());
        assert_eq!(a.0[2][0] as u16, 0xabcd);
    }
}
