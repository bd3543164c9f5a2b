//! The wgpu backend: [`emu_core::Backend`] with every op as a WGSL compute
//! kernel, on whatever adapter wgpu finds (Vulkan, Metal, DX12, GL; in CI
//! Mesa's software Vulkan driver, lavapipe).
//!
//! Design:
//! * a tensor is a pooled device buffer plus metadata (dims, strides,
//!   offset, dtype); `permute`, `narrow`, `broadcast_to` and `reshape` of a
//!   contiguous tensor are views, the kernels index strided inputs directly
//!   or a strided copy makes them contiguous;
//! * every element is a 32-bit word. f16 and bf16 tensors are stored as the
//!   f32 values they are exactly equal to, and every kernel that produces a
//!   half-precision tensor rounds its output to that dtype (nearest even),
//!   so results are those of a backend that stores halves and computes each
//!   op in f32, which is what PyTorch's CPU kernels do;
//! * pipelines are compiled once per (kernel, specialisation) and cached;
//!   buffers come from a size-bucketed pool and go back to it when the last
//!   tensor using them is dropped; each op is one queue submission, so
//!   reusing a buffer is ordered after every earlier use;
//! * the host reads device memory only in [`Backend::download`].
//! * fused kernels replace the composites where they pay off: softmax,
//!   layer/RMS/group norm (one workgroup per row or group), and attention
//!   for decode steps (one workgroup per query row, keys in chunks with an
//!   online softmax; longer query blocks use the tiled matmuls, see
//!   [`FUSED_ATTENTION_MAX_QUERIES`]).
//!
//! ```no_run
//! use emu_backend_wgpu::WgpuBackend;
//! use emu_core::Tensor;
//! let gpu = WgpuBackend::new()?;
//! let x = Tensor::from_f32(&gpu, &[2, 2], vec![1.0, 2.0, 3.0, 4.0])?;
//! assert_eq!(x.matmul(&x)?.to_f32_vec()?, vec![7.0, 10.0, 15.0, 22.0]);
//! # Ok::<(), emu_core::Error>(())
//! ```

mod kernels;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use emu_core::backend::{
    default_attention, default_group_norm, AttnMask, Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp,
};
use emu_core::shape::{self, broadcast_dims, contiguous_strides, View};
use emu_core::{DType, Error, HostTensor, QuantTensor, Result};
use half::{bf16, f16};
use kernels::{Word, MAX_RANK, WG};

const NAME: &str = "wgpu";

/// Longest query block that [`Backend::attention`] runs through the fused
/// kernel ([`WgpuBackend::fused_attention`]).
pub const FUSED_ATTENTION_MAX_QUERIES: usize = 4;

/// Environment variable that picks the adapter: an index into
/// [`WgpuBackend::adapters`] or a case-insensitive substring of its name.
pub const ADAPTER_ENV: &str = "EMU_WGPU_ADAPTER";

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported {
        backend: NAME.to_string(),
        what: what.into(),
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: NAME.to_string(),
        reason: reason.into(),
    }
}

fn backend_err(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: NAME.to_string(),
        message: message.into(),
    }
}

/// A device buffer that returns to its pool when dropped.
struct Storage {
    buffer: Option<wgpu::Buffer>,
    size: u64,
    pool: Arc<Pool>,
}

impl Storage {
    fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("storage buffer is present until drop")
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.release(self.size, b);
        }
    }
}

/// Free device buffers by size bucket. Buckets are powers of two (at least
/// 256 bytes) so that buffers are reused across the slightly different
/// shapes of successive decode or diffusion steps.
struct Pool {
    device: wgpu::Device,
    free: Mutex<PoolState>,
    /// Largest buffer that can be bound as one storage binding.
    max_bytes: u64,
}

#[derive(Default)]
struct PoolState {
    buckets: HashMap<u64, Vec<wgpu::Buffer>>,
    free_bytes: u64,
}

/// Free buffers kept for reuse, beyond which released buffers are destroyed.
const POOL_KEEP_BYTES: u64 = 4 << 30;

impl Pool {
    fn bucket(&self, bytes: u64) -> u64 {
        let b = bytes.max(256).next_power_of_two();
        if b > self.max_bytes {
            bytes.div_ceil(256) * 256
        } else {
            b
        }
    }

    fn alloc(self: &Arc<Self>, bytes: u64) -> Result<Storage> {
        if bytes > self.max_bytes {
            return Err(unsupported(format!(
                "a buffer of {bytes} bytes: the adapter binds at most {} bytes per storage buffer",
                self.max_bytes
            )));
        }
        let size = self.bucket(bytes);
        let reused = {
            let mut st = self.free.lock().map_err(|_| backend_err("buffer pool lock poisoned"))?;
            let b = st.buckets.get_mut(&size).and_then(Vec::pop);
            if b.is_some() {
                st.free_bytes -= size;
            }
            b
        };
        let buffer = match reused {
            Some(b) => b,
            None => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("emu tensor"),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        Ok(Storage {
            buffer: Some(buffer),
            size,
            pool: self.clone(),
        })
    }

    fn release(&self, size: u64, buffer: wgpu::Buffer) {
        if let Ok(mut st) = self.free.lock() {
            if st.free_bytes + size <= POOL_KEEP_BYTES {
                st.free_bytes += size;
                st.buckets.entry(size).or_default().push(buffer);
                return;
            }
        }
        buffer.destroy();
    }
}

/// A tensor on the device: shared storage plus a strided view of it.
#[derive(Clone)]
pub struct WgpuTensor {
    storage: Arc<Storage>,
    dims: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
    dtype: DType,
    /// The values of integer tensors uploaded from the host, kept so that
    /// `index_select` can validate ids without reading the device.
    host_ids: Option<Arc<[u32]>>,
}

impl fmt::Debug for WgpuTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuTensor({:?}, {})", self.dims, self.dtype)
    }
}

impl WgpuTensor {
    fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    fn is_contiguous(&self) -> bool {
        shape::is_contiguous(&self.dims, &self.strides)
    }

    fn view(&self) -> View {
        View {
            dims: self.dims.clone(),
            strides: self.strides.clone(),
            offset: self.offset,
        }
    }

    /// This tensor's storage seen through `v`.
    fn with_view(&self, v: View) -> Self {
        WgpuTensor {
            dims: v.dims,
            strides: v.strides,
            offset: v.offset,
            ..self.clone()
        }
    }

    fn buffer(&self) -> &wgpu::Buffer {
        self.storage.buffer()
    }
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| unsupported(format!("{what} of {v} (kernels index with 32 bits)")))
}

/// Parameters of a strided kernel (see `kernels`): element count, layout
/// and per-operand offsets/strides.
fn strided_params(dims: &[usize], ops: &[(usize, &[usize])]) -> Result<Vec<u32>> {
    let stride_refs: Vec<&[usize]> = ops.iter().map(|(_, s)| *s).collect();
    let (cd, cs) = shape::coalesce(dims, &stride_refs);
    if cd.len() > MAX_RANK {
        return Err(unsupported(format!(
            "strided views of rank {} (at most {MAX_RANK} after merging dims)",
            cd.len()
        )));
    }
    let mut p = vec![0u32; kernels::extra_param(ops.len())];
    p[0] = u32_of("element count", dims.iter().product())?;
    p[1] = cd.len() as u32;
    for (i, &d) in cd.iter().enumerate() {
        p[2 + i] = u32_of("dimension", d)?;
    }
    for (k, (off, _)) in ops.iter().enumerate() {
        p[10 + 9 * k] = u32_of("offset", *off)?;
        for (i, &s) in cs[k].iter().enumerate() {
            p[11 + 9 * k + i] = u32_of("stride", s)?;
        }
    }
    Ok(p)
}

/// Longest axis one invocation of the reduce kernel runs through serially.
/// Besides parallelism, llvmpipe (lavapipe) silently ends a shader
/// invocation's loops after 65535 iterations in all, so longer axes would
/// come out wrong there; `reduce` splits them. (`argmax` keeps one pass:
/// vocabularies are below that, and real GPUs have no such limit.)
const SERIAL_REDUCE_MAX: usize = 16384;

fn groups_1d(n: usize) -> [u32; 3] {
    let total = n.div_ceil(WG as usize).max(1);
    let x = total.min(65535);
    [x as u32, total.div_ceil(x) as u32, 1]
}

fn groups_rows(rows: usize) -> [u32; 3] {
    let x = rows.clamp(1, 65535);
    [x as u32, rows.div_ceil(x).max(1) as u32, 1]
}

/// One kernel launch of an op.
struct Launch<'a> {
    pipeline: Arc<wgpu::ComputePipeline>,
    params: Vec<u32>,
    inputs: Vec<&'a wgpu::Buffer>,
    output: &'a wgpu::Buffer,
    groups: [u32; 3],
}

struct Context {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    pool: Arc<Pool>,
    /// Bind group layouts by number of inputs.
    layouts: Vec<wgpu::BindGroupLayout>,
    pipeline_layouts: Vec<wgpu::PipelineLayout>,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Quantized weights on the device, by the address of their host bytes;
    /// the `Weak` tells whether that tensor still lives (an address can be
    /// reused once it is freed).
    quant: Mutex<QuantCache>,
}

/// Device copies of quantized weights (see `Context::quant`).
type QuantCache = HashMap<usize, (std::sync::Weak<Vec<u8>>, Arc<Storage>)>;

/// The wgpu backend. Cheap to clone (clones share the device, pipelines and
/// buffer pool).
#[derive(Clone)]
pub struct WgpuBackend {
    ctx: Arc<Context>,
}

impl fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuBackend({} on {:?})", self.ctx.info.name, self.ctx.info.backend)
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn usable(a: &wgpu::Adapter) -> bool {
    a.get_downlevel_capabilities()
        .flags
        .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

impl WgpuBackend {
    /// The adapter named by `EMU_WGPU_ADAPTER` if set, else wgpu's default
    /// (high-performance) adapter. `WGPU_BACKEND` (`vulkan`, `metal`, `dx12`,
    /// `gl`) restricts which APIs are searched.
    pub fn new() -> Result<Self> {
        match std::env::var(ADAPTER_ENV) {
            Ok(sel) if !sel.trim().is_empty() => Self::with_adapter(Some(sel.trim())),
            _ => Self::with_adapter(None),
        }
    }

    /// Descriptions of the adapters that can run compute shaders, in the
    /// order that an index selector refers to.
    pub fn adapters() -> Vec<String> {
        let inst = instance();
        pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
            .into_iter()
            .filter(usable)
            .map(|a| describe(&a.get_info()))
            .collect()
    }

    /// Opens the adapter chosen by `selector` (an index into
    /// [`Self::adapters`] or a case-insensitive name substring), or the
    /// default one for `None`.
    pub fn with_adapter(selector: Option<&str>) -> Result<Self> {
        let inst = instance();
        let adapter = match selector {
            None => pollster::block_on(inst.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                ..Default::default()
            }))
            .map_err(|e| unavailable(format!("no GPU adapter found ({e}); on Linux install a Vulkan driver (e.g. Mesa's lavapipe: mesa-vulkan-drivers)")))?,
            Some(sel) => {
                let all: Vec<wgpu::Adapter> = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
                    .into_iter()
                    .filter(usable)
                    .collect();
                let names: Vec<String> = all.iter().map(|a| describe(&a.get_info())).collect();
                let pick = match sel.parse::<usize>() {
                    Ok(i) => i,
                    Err(_) => {
                        let low = sel.to_lowercase();
                        names.iter().position(|n| n.to_lowercase().contains(&low)).ok_or_else(|| {
                            unavailable(format!("no adapter matches {ADAPTER_ENV}=`{sel}`; adapters: {names:?}"))
                        })?
                    }
                };
                all.into_iter().nth(pick).ok_or_else(|| {
                    unavailable(format!("adapter index {pick} out of range; adapters: {names:?}"))
                })?
            }
        };
        if !usable(&adapter) {
            return Err(unavailable(format!(
                "adapter {} cannot run compute shaders",
                describe(&adapter.get_info())
            )));
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("emu"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| unavailable(format!("cannot open {}: {e}", describe(&adapter.get_info()))))?;
        if limits.max_compute_invocations_per_workgroup < 256 || limits.max_compute_workgroup_storage_size < 8192 {
            return Err(unavailable(format!(
                "adapter {} allows {} invocations and {} bytes of shared memory per workgroup; the kernels need 256 and 8192",
                describe(&adapter.get_info()),
                limits.max_compute_invocations_per_workgroup,
                limits.max_compute_workgroup_storage_size
            )));
        }
        let max_bytes = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let pool = Arc::new(Pool {
            device: device.clone(),
            free: Mutex::new(PoolState::default()),
            max_bytes,
        });
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut layouts = Vec::new();
        let mut pipeline_layouts = Vec::new();
        for nin in 0..=4u32 {
            let mut entries = vec![storage(0, true)];
            for i in 0..nin {
                entries.push(storage(i + 1, true));
            }
            entries.push(storage(nin + 1, false));
            let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: None,
                entries: &entries,
            });
            let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
            layouts.push(bgl);
            pipeline_layouts.push(pl);
        }
        Ok(Self {
            ctx: Arc::new(Context {
                info: adapter.get_info(),
                device,
                queue,
                limits,
                pool,
                layouts,
                pipeline_layouts,
                pipelines: Mutex::new(HashMap::new()),
                quant: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The adapter this backend runs on, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)`.
    pub fn adapter_name(&self) -> String {
        describe(&self.ctx.info)
    }

    /// Whether the adapter computes in host memory (a CPU driver such as
    /// lavapipe), so that its buffers count against the host's memory.
    pub fn uses_host_memory(&self) -> bool {
        self.ctx.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The limits the device was opened with.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.ctx.limits
    }

    /// Blocks until every submitted kernel has finished (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| backend_err(format!("waiting for the device: {e}")))
    }

    /// [`Backend::attention`] as one fused kernel launch, one workgroup per
    /// query row, whatever the number of queries (the trait method uses it
    /// for at most [`FUSED_ATTENTION_MAX_QUERIES`] of them). `None` when
    /// the kernel does not cover the call: malformed or mixed-dtype
    /// operands, no keys, head sizes above 256, or a bias that does not
    /// broadcast to the `[B, H, Tq, Tk]` scores.
    pub fn fused_attention(
        &self,
        q: &WgpuTensor,
        k: &WgpuTensor,
        v: &WgpuTensor,
        mask: &AttnMask<'_, WgpuTensor>,
        scale: f64,
    ) -> Result<Option<WgpuTensor>> {
        let (qd, kd, vd) = (&q.dims, &k.dims, &v.dims);
        let fits = qd.len() == 4
            && kd.len() == 4
            && kd == vd
            && qd[0] == kd[0]
            && qd[3] == kd[3]
            && kd[1] != 0
            && qd[1] % kd[1] == 0;
        if !fits || q.dtype != k.dtype || q.dtype != v.dtype || !q.dtype.is_float() {
            return Ok(None);
        }
        let (b, h, tq, d) = (qd[0], qd[1], qd[2], qd[3]);
        let (hkv, tk) = (kd[1], kd[2]);
        let sdims = [b, h, tq, tk];
        let bias = match mask.bias {
            Some(bias) => {
                let covered = bias.dtype.is_float()
                    && bias.dims.len() <= 4
                    && broadcast_dims("attention bias", &sdims, &bias.dims).is_ok_and(|bd| bd == sdims);
                if !covered {
                    return Ok(None);
                }
                Some(bias)
            }
            None => None,
        };
        if tk == 0 || d == 0 || d > kernels::ATTN_MAX_D as usize {
            return Ok(None);
        }
        let out = self.alloc(&[b, h, tq, d], q.dtype)?;
        let rows = out.numel() / d;
        if rows == 0 {
            return Ok(Some(out));
        }
        let mut p = vec![
            u32_of("attention rows", rows)?,
            u32_of("heads", h)?,
            u32_of("queries", tq)?,
            u32_of("keys", tk)?,
            u32_of("head size", d)?,
            u32_of("heads per kv head", h / hkv)?,
            (scale as f32).to_bits(),
            bias.is_some() as u32,
            mask.causal_offset.is_some() as u32,
            u32_of("causal offset", mask.causal_offset.unwrap_or(0))?,
            (mask.causal_offset.is_some() && bias.is_none()) as u32,
        ];
        for t in [q, k, v] {
            p.push(u32_of("offset", t.offset)?);
            for &s in &t.strides {
                p.push(u32_of("stride", s)?);
            }
        }
        match bias {
            Some(bt) => {
                p.push(u32_of("offset", bt.offset)?);
                for s in shape::broadcast_strides(&bt.dims, &bt.strides, &sdims) {
                    p.push(u32_of("stride", s)?);
                }
            }
            None => p.extend([0; 5]),
        }
        let key = format!("attention {}", dt_key(q.dtype));
        let pipeline = self.pipeline(&key, 4, || kernels::attention(q.dtype))?;
        self.submit(&[Launch {
            pipeline,
            params: p,
            inputs: vec![
                q.buffer(),
                k.buffer(),
                v.buffer(),
                bias.map_or(q.buffer(), |t| t.buffer()),
            ],
            output: out.buffer(),
            groups: groups_rows(rows),
        }])?;
        Ok(Some(out))
    }

    /// The device copy of `w`'s block bytes, uploaded on first use and kept
    /// while `w` (or a clone) lives; copies of dropped tensors are freed here.
    fn quant_buffer(&self, w: &QuantTensor) -> Result<Arc<Storage>> {
        let shared = w.shared_bytes();
        let key = Arc::as_ptr(shared) as usize;
        let mut cache = self
            .ctx
            .quant
            .lock()
            .map_err(|_| backend_err("quantized weight cache lock poisoned"))?;
        if let Some((weak, storage)) = cache.get(&key) {
            if weak.upgrade().is_some_and(|a| Arc::ptr_eq(&a, shared)) {
                return Ok(storage.clone());
            }
        }
        cache.retain(|_, (weak, _)| weak.strong_count() > 0);
        let bytes = w.bytes();
        let padded = bytes.len().next_multiple_of(4).max(4);
        let storage = Arc::new(self.ctx.pool.alloc(padded as u64)?);
        // Copies go in whole words: the bytes as they are, then the last
        // partial word zero-padded (no padded copy of the whole weight).
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.ctx.queue.write_buffer(storage.buffer(), 0, &bytes[..whole]);
        }
        if whole < padded {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.ctx.queue.write_buffer(storage.buffer(), whole as u64, &tail);
        }
        cache.insert(key, (Arc::downgrade(shared), storage.clone()));
        Ok(storage)
    }

    fn pipeline(&self, key: &str, nin: usize, src: impl FnOnce() -> String) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut cache = self
            .ctx
            .pipelines
            .lock()
            .map_err(|_| backend_err("pipeline cache lock poisoned"))?;
        if let Some(p) = cache.get(key) {
            return Ok(p.clone());
        }
        let module = self.ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(src().into()),
        });
        let p = Arc::new(
            self.ctx
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key),
                    layout: Some(&self.ctx.pipeline_layouts[nin]),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                }),
        );
        cache.insert(key.to_string(), p.clone());
        Ok(p)
    }

    /// Records the launches into one command buffer and submits it.
    fn submit(&self, launches: &[Launch<'_>]) -> Result<()> {
        let ctx = &self.ctx;
        let mut keep = Vec::with_capacity(launches.len());
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        for l in launches {
            let pbuf = ctx.pool.alloc(4 * l.params.len() as u64)?;
            let bytes: Vec<u8> = l.params.iter().flat_map(|w| w.to_le_bytes()).collect();
            ctx.queue.write_buffer(pbuf.buffer(), 0, &bytes);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: pbuf.buffer().as_entire_binding(),
            }];
            for (i, b) in l.inputs.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: b.as_entire_binding(),
                });
            }
            entries.push(wgpu::BindGroupEntry {
                binding: l.inputs.len() as u32 + 1,
                resource: l.output.as_entire_binding(),
            });
            let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &ctx.layouts[l.inputs.len()],
                entries: &entries,
            });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                });
                pass.set_pipeline(&l.pipeline);
                pass.set_bind_group(0, &bg, &[]);
                let [x, y, z] = l.groups;
                pass.dispatch_workgroups(x, y, z);
            }
            keep.push(pbuf);
        }
        ctx.queue.submit([enc.finish()]);
        // Non-blocking: lets wgpu retire finished submissions and free what
        // they held, so long runs without downloads do not accumulate them.
        let _ = ctx.device.poll(wgpu::PollType::Poll);
        // Params buffers go back to the pool only now: a later write into a
        // reused one is then queued after this submission.
        drop(keep);
        Ok(())
    }

    fn alloc(&self, dims: &[usize], dtype: DType) -> Result<WgpuTensor> {
        let n = emu_core::host::checked_numel(dims)?;
        let bytes = (n as u64)
            .checked_mul(4)
            .ok_or_else(|| Error::shape(format!("shape {dims:?} overflows")))?;
        if n > u32::MAX as usize {
            return Err(unsupported(format!(
                "tensors of {n} elements (kernels index with 32 bits)"
            )));
        }
        Ok(WgpuTensor {
            storage: Arc::new(self.ctx.pool.alloc(bytes)?),
            dims: dims.to_vec(),
            strides: contiguous_strides(dims),
            offset: 0,
            dtype,
            host_ids: None,
        })
    }

    fn check_dtype(&self, dtype: DType) -> Result<()> {
        if self.supports(dtype) {
            Ok(())
        } else {
            Err(unsupported(format!("{dtype} tensors (f32, f16, bf16, u32, i32 only)")))
        }
    }

    /// A contiguous tensor with the same values (the input itself if it is one).
    fn contiguous(&self, t: &WgpuTensor) -> Result<WgpuTensor> {
        if t.is_contiguous() {
            return Ok(t.clone());
        }
        let out = self.alloc(&t.dims, t.dtype)?;
        self.copy_into(t, &out)?;
        Ok(out)
    }

    /// Copies `src`'s values into the (same-shaped) view `dst`.
    fn copy_into(&self, src: &WgpuTensor, dst: &WgpuTensor) -> Result<()> {
        let n = src.numel();
        if n == 0 {
            return Ok(());
        }
        let params = strided_params(&src.dims, &[(src.offset, &src.strides), (dst.offset, &dst.strides)])?;
        let pipeline = self.pipeline("copy", 1, kernels::copy)?;
        self.submit(&[Launch {
            pipeline,
            params,
            inputs: vec![src.buffer()],
            output: dst.buffer(),
            groups: groups_1d(n),
        }])
    }

    fn float_only(&self, op: &str, t: &WgpuTensor) -> Result<()> {
        if t.dtype.is_float() {
            Ok(())
        } else {
            Err(Error::DType(format!("{op} needs a float tensor, found {}", t.dtype)))
        }
    }

    fn same_dtype(&self, op: &str, a: &WgpuTensor, b: &WgpuTensor) -> Result<()> {
        shape::check_same_dtype(op, a.dtype, b.dtype)
    }

    /// A one-input kernel over a strided input producing a contiguous output.
    fn map1(
        &self,
        key: &str,
        src: impl FnOnce() -> String,
        t: &WgpuTensor,
        extra: &[u32],
        out_dtype: DType,
    ) -> Result<WgpuTensor> {
        let out = self.alloc(&t.dims, out_dtype)?;
        let n = t.numel();
        if n == 0 {
            return Ok(out);
        }
        let mut params = strided_params(&t.dims, &[(t.offset, &t.strides)])?;
        params.extend_from_slice(extra);
        let pipeline = self.pipeline(key, 1, src)?;
        self.submit(&[Launch {
            pipeline,
            params,
            inputs: vec![t.buffer()],
            output: out.buffer(),
            groups: groups_1d(n),
        }])?;
        Ok(out)
    }

    fn check_dim(op: &str, t: &WgpuTensor, dim: usize) -> Result<()> {
        shape::check_dim(op, &t.dims, dim)
    }

    /// One invocation per output element, each folding dimension `dim` of
    /// the input (reductions and argmax share this launch shape).
    /// `reduce` of an axis longer than [`SERIAL_REDUCE_MAX`]: chunks of it
    /// first, then the partial results, in f32 so half types round once.
    fn reduce_in_chunks(&self, op: ReduceOp, t: &WgpuTensor, dim: usize, keepdim: bool) -> Result<WgpuTensor> {
        let x = if t.dtype == DType::F32 {
            t.clone()
        } else {
            self.cast(t, DType::F32)?
        };
        let r = x.dims[dim];
        let (c, q, rem) = (SERIAL_REDUCE_MAX, r / SERIAL_REDUCE_MAX, r % SERIAL_REDUCE_MAX);
        let partial = if op == ReduceOp::Mean { ReduceOp::Sum } else { op };
        let mut parts = Vec::with_capacity(2);
        if q > 0 {
            let mut dims = x.dims.clone();
            dims[dim] = q;
            dims.insert(dim + 1, c);
            let head = self.reshape(&self.narrow(&x, dim, 0, q * c)?, &dims)?;
            parts.push(self.reduce(partial, &head, dim + 1, false)?);
        }
        if rem > 0 {
            parts.push(self.reduce(partial, &self.narrow(&x, dim, q * c, rem)?, dim, true)?);
        }
        let refs: Vec<&WgpuTensor> = parts.iter().collect();
        let mut out = self.reduce(partial, &self.concat(&refs, dim)?, dim, keepdim)?;
        if op == ReduceOp::Mean {
            out = self.affine(&out, 1.0 / r as f64, 0.0)?;
        }
        if t.dtype != DType::F32 {
            out = self.cast(&out, t.dtype)?;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn along_dim(
        &self,
        op: &str,
        t: &WgpuTensor,
        dim: usize,
        keepdim: bool,
        out_dtype: DType,
        key: &str,
        src: impl FnOnce() -> String,
    ) -> Result<WgpuTensor> {
        let dims = shape::reduce_dims(op, &t.dims, dim, keepdim)?;
        self.float_only(op, t)?;
        let tc = self.contiguous(t)?;
        let (outer, r, inner) = shape::split_at_dim(&tc.dims, dim);
        let out = self.alloc(&dims, out_dtype)?;
        let n = outer * inner;
        if n > 0 {
            let pipeline = self.pipeline(key, 1, src)?;
            self.submit(&[Launch {
                pipeline,
                params: vec![
                    u32_of("elements", n)?,
                    u32_of("dimension", r)?,
                    u32_of("inner size", inner)?,
                    u32_of("offset", tc.offset)?,
                ],
                inputs: vec![tc.buffer()],
                output: out.buffer(),
                groups: groups_1d(n),
            }])?;
        }
        Ok(out)
    }

    /// Row-wise kernel (softmax, norms) over the last dimension.
    fn rows_kernel(
        &self,
        key: &str,
        src: impl FnOnce() -> String,
        x: &WgpuTensor,
        extra_inputs: [Option<&WgpuTensor>; 2],
        params_tail: &[u32],
    ) -> Result<WgpuTensor> {
        let x = self.contiguous(x)?;
        let cols = *x
            .dims
            .last()
            .ok_or_else(|| Error::shape(format!("{key}: input is a scalar")))?;
        let rows = x.numel().checked_div(cols).unwrap_or(0);
        let out = self.alloc(&x.dims, x.dtype)?;
        if rows == 0 {
            return Ok(out);
        }
        let mut params = vec![
            u32_of("rows", rows)?,
            u32_of("row length", cols)?,
            u32_of("offset", x.offset)?,
        ];
        params.extend_from_slice(params_tail);
        let nin = if key.starts_with("softmax") { 1 } else { 3 };
        let mut inputs = vec![x.buffer()];
        if nin == 3 {
            for e in extra_inputs {
                inputs.push(e.map_or(x.buffer(), |t| t.buffer()));
            }
        }
        let pipeline = self.pipeline(key, nin, src)?;
        self.submit(&[Launch {
            pipeline,
            params,
            inputs,
            output: out.buffer(),
            groups: groups_rows(rows),
        }])?;
        Ok(out)
    }

    /// A per-channel vector (norm weight/bias) as a contiguous tensor of `n` elements.
    fn vector_arg(&self, op: &str, v: Option<&WgpuTensor>, n: usize, dtype: DType) -> Result<Option<WgpuTensor>> {
        match v {
            None => Ok(None),
            Some(v) => {
                shape::check_channel_vector(op, &v.dims, v.dtype, n, dtype)?;
                Ok(Some(self.contiguous(v)?))
            }
        }
    }
}

fn dt_key(dtype: DType) -> &'static str {
    dtype.name()
}

impl Backend for WgpuBackend {
    type Tensor = WgpuTensor;

    fn name(&self) -> &str {
        NAME
    }

    fn supports(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::U32 | DType::I32)
    }

    fn dims(&self, t: &WgpuTensor) -> Vec<usize> {
        t.dims.clone()
    }

    fn dtype(&self, t: &WgpuTensor) -> DType {
        t.dtype
    }

    fn upload(&self, host: &HostTensor) -> Result<WgpuTensor> {
        self.check_dtype(host.dtype())?;
        let mut out = self.alloc(host.dims(), host.dtype())?;
        let raw = host.as_bytes();
        let words: Vec<u8> = match host.dtype() {
            DType::F16 => raw
                .chunks_exact(2)
                .flat_map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
                .collect(),
            DType::BF16 => raw
                .chunks_exact(2)
                .flat_map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
                .collect(),
            _ => raw.to_vec(),
        };
        if matches!(host.dtype(), DType::U32 | DType::I32) {
            out.host_ids = Some(
                raw.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        if !words.is_empty() {
            self.ctx.queue.write_buffer(out.buffer(), 0, &words);
        }
        Ok(out)
    }

    fn download(&self, t: &WgpuTensor) -> Result<HostTensor> {
        let t = self.contiguous(t)?;
        let n = t.numel();
        let bytes = 4 * n as u64;
        let mut words = Vec::with_capacity(n * 4);
        if n > 0 {
            let staging = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("emu download"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            enc.copy_buffer_to_buffer(t.buffer(), 4 * t.offset as u64, &staging, 0, bytes);
            self.ctx.queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            staging.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
            self.synchronize()?;
            rx.recv()
                .map_err(|_| backend_err("buffer mapping was dropped"))?
                .map_err(|e| backend_err(format!("reading back a tensor: {e}")))?;
            {
                let view = staging
                    .get_mapped_range(..)
                    .map_err(|e| backend_err(format!("reading back a tensor: {e}")))?;
                words.extend_from_slice(&view);
            }
            staging.unmap();
        }
        let data: Vec<u8> = match t.dtype {
            DType::F16 => words
                .chunks_exact(4)
                .flat_map(|c| f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect(),
            DType::BF16 => words
                .chunks_exact(4)
                .flat_map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect(),
            _ => words,
        };
        HostTensor::from_bytes(&t.dims, t.dtype, data)
    }

    fn full(&self, dims: &[usize], value: f64, dtype: DType) -> Result<WgpuTensor> {
        self.check_dtype(dtype)?;
        let out = self.alloc(dims, dtype)?;
        let word = match dtype {
            DType::F32 => (value as f32).to_bits(),
            DType::F16 => f16::from_f64(value).to_f32().to_bits(),
            DType::BF16 => bf16::from_f64(value).to_f32().to_bits(),
            DType::U32 => value as u32,
            _ => (value as i32) as u32,
        };
        let n = out.numel();
        if n > 0 {
            let pipeline = self.pipeline("fill", 0, kernels::fill)?;
            self.submit(&[Launch {
                pipeline,
                params: vec![n as u32, 0, word],
                inputs: vec![],
                output: out.buffer(),
                groups: groups_1d(n),
            }])?;
        }
        Ok(out)
    }

    fn cast(&self, t: &WgpuTensor, dtype: DType) -> Result<WgpuTensor> {
        self.check_dtype(dtype)?;
        if dtype == t.dtype {
            return Ok(t.clone());
        }
        let from = Word::of(t.dtype);
        // Widening to f32 and reinterpreting u32<->i32 keep every word.
        let key = format!("cast {from:?} {}", dt_key(dtype));
        self.map1(&key, || kernels::cast(from, dtype), t, &[], dtype)
    }

    fn reshape(&self, t: &WgpuTensor, dims: &[usize]) -> Result<WgpuTensor> {
        t.view().check_reshape(dims)?;
        let c = self.contiguous(t)?;
        Ok(WgpuTensor {
            dims: dims.to_vec(),
            strides: contiguous_strides(dims),
            ..c
        })
    }

    fn permute(&self, t: &WgpuTensor, perm: &[usize]) -> Result<WgpuTensor> {
        Ok(t.with_view(t.view().permute(perm)?))
    }

    fn narrow(&self, t: &WgpuTensor, dim: usize, start: usize, len: usize) -> Result<WgpuTensor> {
        Ok(t.with_view(t.view().narrow(dim, start, len)?))
    }

    fn concat(&self, ts: &[&WgpuTensor], dim: usize) -> Result<WgpuTensor> {
        let shapes: Vec<&[usize]> = ts.iter().map(|t| t.dims.as_slice()).collect();
        let dims = shape::concat_dims(&shapes, dim)?;
        let first = ts[0];
        for t in ts {
            self.same_dtype("concat", first, t)?;
        }
        let out = self.alloc(&dims, first.dtype)?;
        let pipeline = self.pipeline("copy", 1, kernels::copy)?;
        let mut launches = Vec::new();
        let mut at = 0;
        for t in ts {
            let n = t.numel();
            if n > 0 {
                let view_off = at * out.strides[dim];
                launches.push(Launch {
                    pipeline: pipeline.clone(),
                    params: strided_params(&t.dims, &[(t.offset, &t.strides), (view_off, &out.strides)])?,
                    inputs: vec![t.buffer()],
                    output: out.buffer(),
                    groups: groups_1d(n),
                });
            }
            at += t.dims[dim];
        }
        if !launches.is_empty() {
            self.submit(&launches)?;
        }
        Ok(out)
    }

    fn slice_set(&self, dst: WgpuTensor, src: &WgpuTensor, dim: usize, start: usize) -> Result<WgpuTensor> {
        shape::check_slice_set(&dst.dims, &src.dims, dim, start)?;
        self.same_dtype("slice_set", &dst, src)?;
        // A broadcast view aliases elements: write into a private copy instead.
        let dst = if dst.view().aliases() {
            let out = self.alloc(&dst.dims, dst.dtype)?;
            self.copy_into(&dst, &out)?;
            out
        } else {
            dst
        };
        let view = self.narrow(&dst, dim, start, src.dims[dim])?;
        self.copy_into(src, &view)?;
        Ok(WgpuTensor { host_ids: None, ..dst })
    }

    fn index_select(&self, t: &WgpuTensor, ids: &WgpuTensor, dim: usize) -> Result<WgpuTensor> {
        let host = ids
            .host_ids
            .as_deref()
            .map(|h| (h, ids.offset, ids.strides.first().copied().unwrap_or(0)));
        let dims = shape::index_select_dims(&t.dims, dim, &ids.dims, ids.dtype, host)?;
        let tc = self.contiguous(t)?;
        let idc = self.contiguous(ids)?;
        let (outer, d, inner) = shape::split_at_dim(&tc.dims, dim);
        let nids = ids.dims[0];
        let out = self.alloc(&dims, t.dtype)?;
        let n = out.numel();
        if n > 0 {
            let _ = outer;
            let pipeline = self.pipeline("index_select", 2, kernels::index_select)?;
            self.submit(&[Launch {
                pipeline,
                params: vec![
                    u32_of("elements", n)?,
                    u32_of("dimension", d)?,
                    u32_of("inner size", inner)?,
                    u32_of("ids", nids)?,
                    u32_of("offset", tc.offset)?,
                    u32_of("offset", idc.offset)?,
                ],
                inputs: vec![tc.buffer(), idc.buffer()],
                output: out.buffer(),
                groups: groups_1d(n),
            }])?;
        }
        Ok(out)
    }

    fn broadcast_to(&self, t: &WgpuTensor, dims: &[usize]) -> Result<WgpuTensor> {
        Ok(t.with_view(t.view().broadcast_to(dims)?))
    }

    fn unary(&self, op: UnaryOp, t: &WgpuTensor) -> Result<WgpuTensor> {
        self.float_only(&format!("{op:?}"), t)?;
        let key = format!("unary {op:?} {}", dt_key(t.dtype));
        self.map1(&key, || kernels::unary(op, t.dtype), t, &[], t.dtype)
    }

    fn binary(&self, op: BinaryOp, a: &WgpuTensor, b: &WgpuTensor) -> Result<WgpuTensor> {
        self.same_dtype("binary op", a, b)?;
        self.float_only(&format!("{op:?}"), a)?;
        let dims = broadcast_dims(&format!("{op:?}"), &a.dims, &b.dims)?;
        let out = self.alloc(&dims, a.dtype)?;
        let n = out.numel();
        if n == 0 {
            return Ok(out);
        }
        let (sa, sb) = (
            shape::broadcast_strides(&a.dims, &a.strides, &dims),
            shape::broadcast_strides(&b.dims, &b.strides, &dims),
        );
        let params = strided_params(&dims, &[(a.offset, &sa), (b.offset, &sb)])?;
        let key = format!("binary {op:?} {}", dt_key(a.dtype));
        let pipeline = self.pipeline(&key, 2, || kernels::binary(op, a.dtype))?;
        self.submit(&[Launch {
            pipeline,
            params,
            inputs: vec![a.buffer(), b.buffer()],
            output: out.buffer(),
            groups: groups_1d(n),
        }])?;
        Ok(out)
    }

    fn affine(&self, t: &WgpuTensor, mul: f64, add: f64) -> Result<WgpuTensor> {
        self.float_only("affine", t)?;
        let key = format!("affine {}", dt_key(t.dtype));
        let extra = [(mul as f32).to_bits(), (add as f32).to_bits()];
        self.map1(&key, || kernels::affine(t.dtype), t, &extra, t.dtype)
    }

    fn reduce(&self, op: ReduceOp, t: &WgpuTensor, dim: usize, keepdim: bool) -> Result<WgpuTensor> {
        Self::check_dim("reduce", t, dim)?;
        if t.dims[dim] > SERIAL_REDUCE_MAX {
            self.float_only("reduce", t)?;
            return self.reduce_in_chunks(op, t, dim, keepdim);
        }
        let key = format!("reduce {op:?} {}", dt_key(t.dtype));
        self.along_dim("reduce", t, dim, keepdim, t.dtype, &key, || {
            kernels::reduce(op, t.dtype)
        })
    }

    fn argmax(&self, t: &WgpuTensor, dim: usize) -> Result<WgpuTensor> {
        self.along_dim("argmax", t, dim, false, DType::U32, "argmax", kernels::argmax)
    }

    fn linear_quant(&self, x: &WgpuTensor, w: &QuantTensor, b: Option<&WgpuTensor>) -> Result<WgpuTensor> {
        let bias = b.map(|b| (b.dims.as_slice(), b.dtype));
        let (n, k) = emu_core::backend::check_linear_quant(&x.dims, x.dtype, w, bias)?;
        self.float_only("linear_quant", x)?;
        let m: usize = x.dims[..x.dims.len() - 1].iter().product();
        if m == 0 || n == 0 || k == 0 {
            return emu_core::backend::default_linear_quant(self, x, w, b);
        }
        let mut od = x.dims[..x.dims.len() - 1].to_vec();
        od.push(n);
        let out = self.alloc(&od, x.dtype)?;
        let x = self.contiguous(x)?;
        let b = b.map(|b| self.contiguous(b)).transpose()?;
        let wbuf = self.quant_buffer(w)?;
        let key = format!("linear_quant {} {}", w.qtype(), dt_key(x.dtype));
        let pipeline = self.pipeline(&key, 3, || kernels::linear_quant(w.qtype(), x.dtype))?;
        let [gx, gy, _] = groups_rows(n);
        let rows_per = kernels::LQ_ROWS as usize;
        // At most 65535 row groups per launch.
        let chunk = 65535 * rows_per;
        let mut launches = Vec::new();
        for first in (0..m).step_by(chunk) {
            let rows = chunk.min(m - first);
            let p = vec![
                u32_of("rows", m)?,
                u32_of("output features", n)?,
                u32_of("input features", k)?,
                u32_of("offset", x.offset)?,
                b.is_some() as u32,
                b.as_ref().map_or(Ok(0), |b| u32_of("offset", b.offset))?,
                u32_of("weight row bytes", w.row_bytes())?,
                u32_of("row", first)?,
            ];
            launches.push(Launch {
                pipeline: pipeline.clone(),
                params: p,
                inputs: vec![x.buffer(), wbuf.buffer(), b.as_ref().map_or(x.buffer(), |b| b.buffer())],
                output: out.buffer(),
                groups: [gx, gy, rows.div_ceil(rows_per) as u32],
            });
        }
        self.submit(&launches)?;
        Ok(out)
    }

    fn matmul(&self, a: &WgpuTensor, b: &WgpuTensor) -> Result<WgpuTensor> {
        self.same_dtype("matmul", a, b)?;
        self.float_only("matmul", a)?;
        let (ad, bd) = (&a.dims, &b.dims);
        if ad.len() < 2 || bd.len() < 2 || ad[ad.len() - 1] != bd[bd.len() - 2] {
            return Err(Error::shape(format!("matmul: {ad:?} x {bd:?}")));
        }
        let (ar, br) = (ad.len(), bd.len());
        let batch = broadcast_dims("matmul batch", &ad[..ar - 2], &bd[..br - 2])?;
        let (m, k, n) = (ad[ar - 2], ad[ar - 1], bd[br - 1]);
        let mut dims = batch.clone();
        dims.extend([m, n]);
        let out = self.alloc(&dims, a.dtype)?;
        let nbatch: usize = batch.iter().product();
        if out.numel() == 0 {
            return Ok(out);
        }
        if k == 0 {
            return self.full(&dims, 0.0, a.dtype);
        }
        // Batch strides of each operand seen through the broadcast batch shape.
        let bstr = |t: &WgpuTensor| -> Vec<usize> {
            let r = t.dims.len() - 2;
            let off = batch.len() - r;
            (0..batch.len())
                .map(|i| {
                    if i < off || t.dims[i - off] == 1 {
                        0
                    } else {
                        t.strides[i - off]
                    }
                })
                .collect()
        };
        let (sa, sb) = (bstr(a), bstr(b));
        // Drop size-1 batch dims; more than 6 real ones do not occur in models.
        let keep: Vec<usize> = (0..batch.len()).filter(|&i| batch[i] != 1).collect();
        if keep.len() > 6 {
            return Err(unsupported(format!("matmul with {} batch dimensions", keep.len())));
        }
        if nbatch > 65535 {
            return Err(unsupported(format!(
                "matmul with {nbatch} batch matrices (at most 65535)"
            )));
        }
        let mut p = vec![0u32; 28];
        p[0] = u32_of("rows", m)?;
        p[1] = u32_of("columns", n)?;
        p[2] = u32_of("inner size", k)?;
        p[3] = keep.len() as u32;
        for (j, &i) in keep.iter().enumerate() {
            p[4 + j] = u32_of("batch", batch[i])?;
            p[13 + j] = u32_of("stride", sa[i])?;
            p[22 + j] = u32_of("stride", sb[i])?;
        }
        p[10] = u32_of("offset", a.offset)?;
        p[11] = u32_of("stride", a.strides[ar - 2])?;
        p[12] = u32_of("stride", a.strides[ar - 1])?;
        p[19] = u32_of("offset", b.offset)?;
        p[20] = u32_of("stride", b.strides[br - 2])?;
        p[21] = u32_of("stride", b.strides[br - 1])?;
        if m == 1 {
            let key = format!("matvec {}", dt_key(a.dtype));
            let pipeline = self.pipeline(&key, 2, || kernels::matvec(a.dtype))?;
            let [x, y, _] = groups_rows(n.div_ceil(kernels::MV_COLS as usize));
            self.submit(&[Launch {
                pipeline,
                params: p,
                inputs: vec![a.buffer(), b.buffer()],
                output: out.buffer(),
                groups: [x, y, nbatch as u32],
            }])?;
            return Ok(out);
        }
        let key = format!("matmul {}", dt_key(a.dtype));
        let pipeline = self.pipeline(&key, 2, || kernels::matmul(a.dtype))?;
        let t = kernels::MM_TILE as usize;
        self.submit(&[Launch {
            pipeline,
            params: p,
            inputs: vec![a.buffer(), b.buffer()],
            output: out.buffer(),
            groups: [
                u32_of("column tiles", n.div_ceil(t))?,
                u32_of("row tiles", m.div_ceil(t))?,
                nbatch as u32,
            ],
        }])?;
        Ok(out)
    }

    fn conv2d(&self, x: &WgpuTensor, w: &WgpuTensor, bias: Option<&WgpuTensor>, p: Conv2dParams) -> Result<WgpuTensor> {
        self.same_dtype("conv2d", x, w)?;
        self.float_only("conv2d", x)?;
        if x.dims.len() != 4 || w.dims.len() != 4 {
            return Err(Error::shape(format!(
                "conv2d: input {:?} and weight {:?} must be 4-D",
                x.dims, w.dims
            )));
        }
        let (n, c, h, wi) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        let (o, cg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        if p.groups == 0 || c % p.groups != 0 || o % p.groups != 0 || cg * p.groups != c {
            return Err(Error::shape(format!(
                "conv2d: input {:?} and weight {:?} do not fit {} groups",
                x.dims, w.dims, p.groups
            )));
        }
        if p.dilation.0 == 0 || p.dilation.1 == 0 {
            return Err(Error::shape("conv2d: dilation must be positive"));
        }
        let (oh, ow) = p.output_hw((h, wi), (kh, kw))?;
        let bias = match bias {
            Some(b) => {
                self.same_dtype("conv2d bias", x, b)?;
                if b.dims != [o] {
                    return Err(Error::shape(format!(
                        "conv2d: bias {:?} for {o} output channels",
                        b.dims
                    )));
                }
                Some(self.contiguous(b)?)
            }
            None => None,
        };
        let xc = self.contiguous(x)?;
        let wc = self.contiguous(w)?;
        let out = self.alloc(&[n, o, oh, ow], x.dtype)?;
        let total = out.numel();
        if total == 0 {
            return Ok(out);
        }
        let params = [
            total,
            c,
            h,
            wi,
            o,
            cg,
            kh,
            kw,
            oh,
            ow,
            p.stride.0,
            p.stride.1,
            p.padding.0,
            p.padding.1,
            p.dilation.0,
            p.dilation.1,
            o / p.groups,
            bias.is_some() as usize,
            xc.offset,
            wc.offset,
            bias.as_ref().map_or(0, |b| b.offset),
        ]
        .iter()
        .map(|&v| u32_of("conv2d parameter", v))
        .collect::<Result<Vec<_>>>()?;
        let key = format!("conv2d {}", dt_key(x.dtype));
        let pipeline = self.pipeline(&key, 3, || kernels::conv2d(x.dtype))?;
        self.submit(&[Launch {
            pipeline,
            params,
            inputs: vec![
                xc.buffer(),
                wc.buffer(),
                bias.as_ref().map_or(xc.buffer(), |b| b.buffer()),
            ],
            output: out.buffer(),
            groups: groups_1d(total),
        }])?;
        Ok(out)
    }

    fn avg_pool2d(&self, x: &WgpuTensor, kernel: (usize, usize), stride: (usize, usize)) -> Result<WgpuTensor> {
        self.float_only("avg_pool2d", x)?;
        if x.dims.len() != 4 {
            return Err(Error::shape(format!("avg_pool2d: input {:?} must be NCHW", x.dims)));
        }
        let (n, c, h, w) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 || kernel.0 > h || kernel.1 > w {
            return Err(Error::shape(format!(
                "avg_pool2d: kernel {kernel:?} / stride {stride:?} do not fit {:?}",
                x.dims
            )));
        }
        let (oh, ow) = ((h - kernel.0) / stride.0 + 1, (w - kernel.1) / stride.1 + 1);
        let xc = self.contiguous(x)?;
        let out = self.alloc(&[n, c, oh, ow], x.dtype)?;
        let total = out.numel();
        if total > 0 {
            let params = [total, h, w, oh, ow, kernel.0, kernel.1, stride.0, stride.1, xc.offset]
                .iter()
                .map(|&v| u32_of("avg_pool2d parameter", v))
                .collect::<Result<Vec<_>>>()?;
            let key = format!("avg_pool2d {}", dt_key(x.dtype));
            let pipeline = self.pipeline(&key, 1, || kernels::avg_pool2d(x.dtype))?;
            self.submit(&[Launch {
                pipeline,
                params,
                inputs: vec![xc.buffer()],
                output: out.buffer(),
                groups: groups_1d(total),
            }])?;
        }
        Ok(out)
    }

    fn upsample_nearest2d(&self, x: &WgpuTensor, h: usize, w: usize) -> Result<WgpuTensor> {
        if x.dims.len() != 4 {
            return Err(Error::shape(format!(
                "upsample_nearest2d: input {:?} must be NCHW",
                x.dims
            )));
        }
        let (n, c, ih, iw) = (x.dims[0], x.dims[1], x.dims[2], x.dims[3]);
        if h == 0 || w == 0 || ih == 0 || iw == 0 {
            return Err(Error::shape(format!("upsample_nearest2d: {:?} to {h}x{w}", x.dims)));
        }
        let xc = self.contiguous(x)?;
        let out = self.alloc(&[n, c, h, w], x.dtype)?;
        let total = out.numel();
        if total > 0 {
            // PyTorch computes the scale in f32 on the host side too.
            let (sh, sw) = ((ih as f32 / h as f32).to_bits(), (iw as f32 / w as f32).to_bits());
            let mut params = [total, ih, iw, h, w]
                .iter()
                .map(|&v| u32_of("upsample parameter", v))
                .collect::<Result<Vec<_>>>()?;
            params.extend([sh, sw, u32_of("offset", xc.offset)?]);
            let pipeline = self.pipeline("upsample_nearest2d", 1, kernels::upsample_nearest2d)?;
            self.submit(&[Launch {
                pipeline,
                params,
                inputs: vec![xc.buffer()],
                output: out.buffer(),
                groups: groups_1d(total),
            }])?;
        }
        Ok(out)
    }

    fn softmax_last_dim(&self, x: &WgpuTensor) -> Result<WgpuTensor> {
        self.float_only("softmax", x)?;
        let key = format!("softmax {}", dt_key(x.dtype));
        self.rows_kernel(&key, || kernels::softmax(x.dtype), x, [None, None], &[])
    }

    fn layer_norm(
        &self,
        x: &WgpuTensor,
        w: Option<&WgpuTensor>,
        b: Option<&WgpuTensor>,
        eps: f64,
    ) -> Result<WgpuTensor> {
        self.float_only("layer_norm", x)?;
        let cols = x.dims.last().copied().unwrap_or(0);
        let w = self.vector_arg("layer_norm", w, cols, x.dtype)?;
        let b = self.vector_arg("layer_norm", b, cols, x.dtype)?;
        let tail = [
            (eps as f32).to_bits(),
            w.is_some() as u32,
            b.is_some() as u32,
            u32_of("offset", w.as_ref().map_or(0, |t| t.offset))?,
            u32_of("offset", b.as_ref().map_or(0, |t| t.offset))?,
        ];
        let key = format!("layer_norm {}", dt_key(x.dtype));
        self.rows_kernel(
            &key,
            || kernels::norm(false, false, x.dtype),
            x,
            [w.as_ref(), b.as_ref()],
            &tail,
        )
    }

    /// The fused kernel for single-query decode steps and short query
    /// blocks; longer blocks go through the composite, whose tiled matmuls
    /// reuse each key row across 64 queries (on lavapipe the one-row kernel
    /// is 2-8x faster than the composite at 1 query of a 512-2048 key cache
    /// and falls behind from about 8 queries on).
    fn attention(
        &self,
        q: &WgpuTensor,
        k: &WgpuTensor,
        v: &WgpuTensor,
        mask: &AttnMask<'_, WgpuTensor>,
        scale: f64,
    ) -> Result<WgpuTensor> {
        if q.dims.len() == 4 && q.dims[2] <= FUSED_ATTENTION_MAX_QUERIES {
            if let Some(y) = self.fused_attention(q, k, v, mask, scale)? {
                return Ok(y);
            }
        }
        default_attention(self, q, k, v, mask, scale)
    }

    /// The row kernel of `layer_norm` over (sample, group) rows, with the
    /// per-channel weight and bias applied in the same pass; calls it does
    /// not cover (malformed ones included) go through the composite.
    fn group_norm(
        &self,
        x: &WgpuTensor,
        num_groups: usize,
        w: Option<&WgpuTensor>,
        b: Option<&WgpuTensor>,
        eps: f64,
    ) -> Result<WgpuTensor> {
        let dims = &x.dims;
        let fits = dims.len() >= 2
            && num_groups != 0
            && dims[1].is_multiple_of(num_groups)
            && x.dtype.is_float()
            && [w, b]
                .iter()
                .all(|t| t.is_none_or(|t| t.dtype == x.dtype && t.dims == [dims[1]]));
        if !fits {
            return default_group_norm(self, x, num_groups, w, b, eps);
        }
        let (n, c) = (dims[0], dims[1]);
        let rest: usize = dims[2..].iter().product();
        let per_group = c / num_groups;
        let xc = self.contiguous(x)?;
        let rows = self.reshape(&xc, &[n * num_groups, per_group * rest])?;
        let w = w.map(|t| self.contiguous(t)).transpose()?;
        let b = b.map(|t| self.contiguous(t)).transpose()?;
        let tail = [
            (eps as f32).to_bits(),
            w.is_some() as u32,
            b.is_some() as u32,
            u32_of("offset", w.as_ref().map_or(0, |t| t.offset))?,
            u32_of("offset", b.as_ref().map_or(0, |t| t.offset))?,
            u32_of("channel size", rest)?,
            u32_of("groups", num_groups)?,
            u32_of("channels per group", per_group)?,
        ];
        let key = format!("group_norm {}", dt_key(x.dtype));
        let y = self.rows_kernel(
            &key,
            || kernels::norm(false, true, x.dtype),
            &rows,
            [w.as_ref(), b.as_ref()],
            &tail,
        )?;
        self.reshape(&y, dims)
    }

    fn rms_norm(&self, x: &WgpuTensor, w: &WgpuTensor, eps: f64) -> Result<WgpuTensor> {
        self.float_only("rms_norm", x)?;
        let cols = x.dims.last().copied().unwrap_or(0);
        let w = self.vector_arg("rms_norm", Some(w), cols, x.dtype)?;
        let tail = [
            (eps as f32).to_bits(),
            1,
            0,
            u32_of("offset", w.as_ref().map_or(0, |t| t.offset))?,
            0,
        ];
        let key = format!("rms_norm {}", dt_key(x.dtype));
        self.rows_kernel(
            &key,
            || kernels::norm(true, false, x.dtype),
            x,
            [w.as_ref(), None],
            &tail,
        )
    }
}
