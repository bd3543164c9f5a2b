//! The ONNX Runtime backend: [`emu_core::Backend`] as a graph builder.
//!
//! A tensor is the output of a node in a graph of standard ONNX operators
//! (opset 17, default domain only); its shape and dtype are computed while the
//! graph is built. [`Backend::upload`] makes a graph input that carries its
//! data, every op appends nodes, and [`Backend::download`] serialises the part
//! of the graph the tensor depends on into an ONNX `ModelProto` and runs it
//! with ONNX Runtime. Sessions are cached by the serialised graph, so running
//! the same computation again on new data does not recompile it. A downloaded
//! value is remembered (on the host and as ONNX Runtime's value), and later
//! graphs start from it instead of recomputing its history.
//!
//! Offsets that can change while every shape stays the same — a middle
//! slice's start (the RoPE table row of a decode step), a `slice_set`
//! position (the KV-cache write), a causal mask offset — are fed as i64
//! inputs rather than baked in as constants. With emu-llm's static-capacity
//! KV cache, every greedy decode step after the prefill therefore runs one
//! cached session. The diffusion sampling loop downloads only its final
//! latents, so all its steps form one graph, compiled once per step count and
//! latent shape and reused by later generations.
//!
//! f16/bf16 tensors are stored as such, and every arithmetic op on them runs
//! in f32 and rounds once (Cast, op, Cast), as PyTorch's CPU kernels do; this
//! also keeps to the ops ONNX Runtime's CPU provider implements for every type.
//!
//! [`OnnxBackend::export`] writes a self-contained model (uploaded data as
//! initializers, chosen uploads as named inputs) that any ONNX Runtime loads.
//!
//! ONNX Runtime is loaded at run time from `ORT_DYLIB_PATH`;
//! [`OnnxBackend::new`] returns [`Error::BackendUnavailable`] without it.
//! Sessions run on the CPU provider unless `EMU_ONNX_EP=cuda[:N]` (or
//! [`OnnxBackend::with_options`]) asks for CUDA, which the library must have.

mod proto;
mod runtime;

pub use proto::{onnx_type, Attr, IR_VERSION, OPSET};
pub use runtime::{run_model_file, ExecutionProvider};

use emu_core::backend::{default_attention, AttnMask, Backend, BinaryOp, Conv2dParams, ReduceOp, UnaryOp, MASK_VALUE};
use emu_core::host::checked_numel;
use emu_core::shape::{self, broadcast_dims};
use emu_core::{DType, Error, HostTensor, QuantTensor, QuantType, Result};
use runtime::{backend_err, SessionCache, NAME};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What produces a tensor.
enum Kind {
    /// Uploaded data: a graph input when running, an initializer when exported.
    Input(HostTensor),
    /// Small structural data (shapes, axes, indices, fill values): always an initializer.
    Const(HostTensor),
    /// Constant weights an operator wants as an initializer (ONNX Runtime
    /// prepacks `MatMulNBits`' operands only then). When running, an
    /// initializer whose data lives outside the model under a name unique to
    /// the node, handed to the session when it is created (so the model
    /// bytes, the session cache key, stay small); when exported, like
    /// `Input`.
    Weight(HostTensor),
    /// A runtime integer (i64 `[1]`): an offset that can change while every
    /// shape stays the same (a middle slice's start, a KV-cache write
    /// position, a causal mask offset). Fed when running, so graphs that
    /// differ only in it (successive decode steps) share one compiled
    /// session; when exporting, bound by value to a named graph input (e.g.
    /// `position`) or else written as an initializer.
    Param(HostTensor),
    /// One ONNX node.
    Op {
        op_type: &'static str,
        inputs: Vec<OnnxTensor>,
        attrs: Vec<(&'static str, Attr)>,
    },
}

struct Node {
    id: u64,
    dims: Vec<usize>,
    dtype: DType,
    kind: Kind,
    /// The value, once downloaded.
    value: OnceLock<HostTensor>,
    /// The value as ONNX Runtime takes it, made on the first run that feeds
    /// it (or kept from the run that computed it), so weights and caches are
    /// not copied again for every graph that reads them.
    fed: OnceLock<runtime::Value>,
}

/// A tensor of the ONNX backend: a node output with its static shape and dtype.
#[derive(Clone)]
pub struct OnnxTensor(Arc<Node>);

impl std::fmt::Debug for OnnxTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.0.kind {
            Kind::Input(_) => "input",
            Kind::Weight(_) => "weight",
            Kind::Const(_) => "const",
            Kind::Param(_) => "param",
            Kind::Op { op_type, .. } => op_type,
        };
        write!(
            f,
            "OnnxTensor(#{} {what} {:?} {})",
            self.0.id, self.0.dims, self.0.dtype
        )
    }
}

impl OnnxTensor {
    pub fn dims(&self) -> &[usize] {
        &self.0.dims
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    /// The value if it is known without running anything.
    fn known(&self) -> Option<&HostTensor> {
        match &self.0.kind {
            Kind::Input(h) | Kind::Const(h) | Kind::Param(h) | Kind::Weight(h) => Some(h),
            Kind::Op { .. } => self.0.value.get(),
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn new_node(dims: Vec<usize>, dtype: DType, kind: Kind) -> OnnxTensor {
    OnnxTensor(Arc::new(Node {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        dims,
        dtype,
        kind,
        value: OnceLock::new(),
        fed: OnceLock::new(),
    }))
}

fn op(
    op_type: &'static str,
    inputs: Vec<OnnxTensor>,
    attrs: Vec<(&'static str, Attr)>,
    dims: Vec<usize>,
    dtype: DType,
) -> OnnxTensor {
    new_node(dims, dtype, Kind::Op { op_type, inputs, attrs })
}

fn const_i64(v: &[i64]) -> OnnxTensor {
    let h = HostTensor::from_i64(&[v.len()], v.to_vec()).expect("length matches");
    new_node(vec![v.len()], DType::I64, Kind::Const(h))
}

/// An i64 constant of shape `dims` holding `0, 1, ..` (`dims` has one non-unit dim).
fn arange_i64(dims: &[usize]) -> OnnxTensor {
    let n: usize = dims.iter().product();
    let h = HostTensor::from_i64(dims, (0..n as i64).collect()).expect("length matches");
    new_node(dims.to_vec(), DType::I64, Kind::Const(h))
}

/// A runtime offset (see [`Kind::Param`]).
fn param(v: usize) -> OnnxTensor {
    let h = HostTensor::from_i64(&[1], vec![v as i64]).expect("length matches");
    new_node(vec![1], DType::I64, Kind::Param(h))
}

fn dims_i64(d: &[usize]) -> OnnxTensor {
    const_i64(&d.iter().map(|&x| x as i64).collect::<Vec<_>>())
}

/// A rank-0 constant of `dtype`.
fn scalar(value: f64, dtype: DType) -> Result<OnnxTensor> {
    let h = if dtype.is_float() {
        HostTensor::from_f64(&[], vec![value])?.to_dtype(dtype)?
    } else {
        HostTensor::from_i64(&[], vec![value as i64])?.to_dtype(dtype)?
    };
    Ok(new_node(vec![], dtype, Kind::Const(h)))
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported {
        backend: NAME.to_string(),
        what: what.into(),
    }
}

fn is_half(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16)
}

fn cast_node(t: &OnnxTensor, dtype: DType) -> OnnxTensor {
    if t.dtype() == dtype {
        return t.clone();
    }
    op(
        "Cast",
        vec![t.clone()],
        vec![("to", Attr::Int(proto::onnx_type(dtype)))],
        t.dims().to_vec(),
        dtype,
    )
}

/// `Expand` to `dims`; ONNX Runtime's CPU provider has no bf16 Expand, so
/// bf16 goes through f32 (exact both ways).
fn expand(t: &OnnxTensor, dims: &[usize]) -> OnnxTensor {
    let dt = t.dtype();
    let x = if dt == DType::BF16 {
        cast_node(t, DType::F32)
    } else {
        t.clone()
    };
    let y = op(
        "Expand",
        vec![x.clone(), dims_i64(dims)],
        vec![],
        dims.to_vec(),
        x.dtype(),
    );
    cast_node(&y, dt)
}

/// Runs `f` on f32 copies of half-precision inputs and rounds the result back once.
fn in_f32(xs: &[&OnnxTensor], f: impl FnOnce(&[OnnxTensor]) -> Result<OnnxTensor>) -> Result<OnnxTensor> {
    let dt = xs[0].dtype();
    if is_half(dt) {
        let up: Vec<OnnxTensor> = xs.iter().map(|x| cast_node(x, DType::F32)).collect();
        Ok(cast_node(&f(&up)?, dt))
    } else {
        let same: Vec<OnnxTensor> = xs.iter().map(|x| (*x).clone()).collect();
        f(&same)
    }
}

fn check_dim(opn: &str, t: &OnnxTensor, dim: usize) -> Result<()> {
    shape::check_dim(opn, t.dims(), dim)
}

fn same_dtype(opn: &str, a: &OnnxTensor, b: &OnnxTensor) -> Result<()> {
    shape::check_same_dtype(opn, a.dtype(), b.dtype())
}

/// Elementwise node with the shape and dtype of `x`.
fn ew(op_type: &'static str, inputs: &[&OnnxTensor]) -> OnnxTensor {
    let x = inputs[0];
    op(
        op_type,
        inputs.iter().map(|t| (*t).clone()).collect(),
        vec![],
        x.dims().to_vec(),
        x.dtype(),
    )
}

fn ew2(op_type: &'static str, a: &OnnxTensor, b: &OnnxTensor) -> Result<OnnxTensor> {
    let dims = broadcast_dims(op_type, a.dims(), b.dims())?;
    Ok(op(op_type, vec![a.clone(), b.clone()], vec![], dims, a.dtype()))
}

/// Which uploads become graph inputs when serialising.
enum Mode<'a> {
    /// Running: every known value (uploads, earlier downloads, params) is fed.
    Run,
    /// Exporting: only the named uploads and bound params are inputs,
    /// everything else is an initializer.
    Export(&'a ExportNames),
}

/// The names an export gives to uploads, params and documented values.
struct ExportNames {
    inputs: HashMap<u64, String>,
    /// Traced param value -> input name.
    params: HashMap<i64, String>,
    /// Input/output name -> doc string.
    docs: HashMap<String, String>,
    /// Node id -> the tensor its users read instead.
    replace: HashMap<u64, OnnxTensor>,
    /// Total initializer bytes above which initializers go to an external
    /// file, and that file's name (relative to the model file).
    external: Option<(usize, String)>,
}

/// The nodes that `outputs` depend on, inputs before users (iterative, so deep graphs do not overflow the stack).
fn topo_order(outputs: &[&OnnxTensor], stop: &dyn Fn(&OnnxTensor) -> bool) -> Vec<OnnxTensor> {
    topo_order_with(outputs, stop, &HashMap::new())
}

/// [`topo_order`] where every use of a node in `replace` reads its replacement.
fn topo_order_with(
    outputs: &[&OnnxTensor],
    stop: &dyn Fn(&OnnxTensor) -> bool,
    replace: &HashMap<u64, OnnxTensor>,
) -> Vec<OnnxTensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for out in outputs {
        let mut stack: Vec<(OnnxTensor, usize)> = vec![((*out).clone(), 0)];
        if !seen.insert(out.0.id) {
            continue;
        }
        while let Some((t, next)) = stack.pop() {
            let inputs: &[OnnxTensor] = match &t.0.kind {
                Kind::Op { inputs, .. } if !stop(&t) => inputs,
                _ => &[],
            };
            if next < inputs.len() {
                let child = replace.get(&inputs[next].0.id).unwrap_or(&inputs[next]).clone();
                stack.push((t, next + 1));
                if seen.insert(child.0.id) {
                    stack.push((child, 0));
                }
            } else {
                order.push(t);
            }
        }
    }
    order
}

/// The not-yet-computed nodes of `t`'s graph that something besides that graph
/// still holds (a KV cache, a tensor the caller keeps, a branch built but not
/// yet downloaded). They become extra outputs of the run and are remembered,
/// so the next graph (the next decode step) starts from them instead of
/// recomputing the whole history.
fn held_elsewhere(t: &OnnxTensor) -> Vec<OnnxTensor> {
    let order = topo_order(&[t], &|n: &OnnxTensor| n.known().is_some());
    let mut uses: HashMap<u64, usize> = HashMap::new();
    for n in &order {
        if let Kind::Op { inputs, .. } = &n.0.kind {
            if n.known().is_none() {
                for i in inputs {
                    *uses.entry(i.0.id).or_insert(0) += 1;
                }
            }
        }
    }
    order
        .iter()
        .filter(|n| {
            n.0.id != t.0.id
                && matches!(n.0.kind, Kind::Op { .. })
                && n.known().is_none()
                // One reference is `order`'s own clone.
                && Arc::strong_count(&n.0) > uses.get(&n.0.id).copied().unwrap_or(0) + 1
        })
        .cloned()
        .collect()
}

/// A serialised model and the data to feed it.
struct Serialized {
    model: Vec<u8>,
    feeds: Vec<(String, OnnxTensor)>,
    /// Run mode: the initializers whose data the session is handed.
    weights: Vec<(String, OnnxTensor)>,
    /// Graph inputs as declared (name, dtype, dims).
    inputs: Vec<(String, DType, Vec<usize>)>,
    /// Bytes written to the external data sink.
    external_bytes: u64,
    /// Nodes of operators outside the default domain, by operator.
    contrib_ops: BTreeMap<String, usize>,
}

/// Initializers of at least this many bytes go to the external data file
/// (the `onnx` package's default `size_threshold`); smaller ones stay inline.
const EXTERNAL_MIN_TENSOR_BYTES: usize = 1024;
/// External tensors start at multiples of this (page-aligned, so ONNX
/// Runtime can map them directly).
const EXTERNAL_ALIGN: u64 = 4096;

fn serialize(
    outputs: &[(&str, &OnnxTensor)],
    mode: Mode<'_>,
    graph_name: &str,
    data_sink: Option<&mut dyn std::io::Write>,
) -> Result<Serialized> {
    let stop = |t: &OnnxTensor| match mode {
        Mode::Run => t.known().is_some(),
        Mode::Export(x) => x.inputs.contains_key(&t.0.id),
    };
    let outs: Vec<&OnnxTensor> = outputs.iter().map(|(_, t)| *t).collect();
    let no_replace = HashMap::new();
    let replace = match &mode {
        Mode::Export(x) => &x.replace,
        Mode::Run => &no_replace,
    };
    let resolve = |i: &OnnxTensor| replace.get(&i.0.id).map_or(i.0.id, |r| r.0.id);
    let order = topo_order_with(&outs, &stop, replace);
    let doc = |name: &str| match &mode {
        Mode::Export(x) => x.docs.get(name).cloned(),
        Mode::Run => None,
    };
    // Names follow the topological position, not node ids, so that the same
    // computation on new data serialises to the same bytes (session cache key).
    let mut names: HashMap<u64, String> = HashMap::new();
    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    let mut inputs = Vec::new();
    let mut declared = HashSet::new();
    let mut feeds = Vec::new();
    let mut extra_nodes = Vec::new();
    // Run mode's weights: (initializer index, external name, bytes).
    let mut held = Vec::new();
    let mut weights = Vec::new();
    for (k, t) in order.iter().enumerate() {
        let bound = match (&mode, &t.0.kind) {
            (Mode::Export(x), Kind::Param(h)) => h.to_i64_vec()?.first().and_then(|v| x.params.get(v)).cloned(),
            (Mode::Export(x), Kind::Input(_) | Kind::Weight(_) | Kind::Op { .. }) => x.inputs.get(&t.0.id).cloned(),
            _ => None,
        };
        let name = bound.clone().unwrap_or_else(|| format!("v{k}"));
        names.insert(t.0.id, name.clone());
        let fed = match (&mode, &t.0.kind) {
            (Mode::Run, _) if !matches!(t.0.kind, Kind::Const(_) | Kind::Weight(_)) => t.known(),
            _ => None,
        };
        if fed.is_some() {
            inputs.push(proto::ValueInfo {
                name: name.clone(),
                dtype: t.dtype(),
                dims: t.dims(),
                doc: None,
            });
            feeds.push((name, t.clone()));
            continue;
        }
        match &t.0.kind {
            Kind::Const(h) => initializers.push((name, h)),
            Kind::Weight(h) if matches!(mode, Mode::Run) => {
                held.push((
                    initializers.len(),
                    format!("emu-weight-{}", t.0.id),
                    h.as_bytes().len() as u64,
                ));
                weights.push((name.clone(), t.clone()));
                initializers.push((name, h));
            }
            Kind::Op { .. } if bound.is_some() => inputs.push(proto::ValueInfo {
                doc: doc(&name),
                name,
                dtype: t.dtype(),
                dims: t.dims(),
            }),
            Kind::Input(h) | Kind::Param(h) | Kind::Weight(h) => {
                if bound.is_some() {
                    // Several param nodes bind to one input: declare it once.
                    if declared.insert(name.clone()) {
                        inputs.push(proto::ValueInfo {
                            doc: doc(&name),
                            name,
                            dtype: t.dtype(),
                            dims: t.dims(),
                        });
                    }
                } else {
                    initializers.push((name, h));
                }
            }
            Kind::Op { .. } => {}
        }
    }
    for t in &order {
        if let Kind::Op {
            op_type,
            inputs: ins,
            attrs,
        } = &t.0.kind
        {
            let skip = match &mode {
                Mode::Run => t.known().is_some(),
                Mode::Export(x) => x.inputs.contains_key(&t.0.id),
            };
            if skip {
                continue;
            }
            nodes.push(proto::NodeDef {
                op_type,
                inputs: ins.iter().map(|i| names[&resolve(i)].clone()).collect(),
                output: names[&t.0.id].clone(),
                attrs,
            });
        }
    }
    // A graph output must be produced by a node; an output that is itself an
    // input or initializer goes through Identity under its requested name.
    let mut graph_outputs = Vec::new();
    for (i, (oname, t)) in outputs.iter().enumerate() {
        let src = names[&t.0.id].clone();
        let name = if oname.is_empty() {
            format!("out{i}")
        } else {
            oname.to_string()
        };
        if src != name || !matches!(t.0.kind, Kind::Op { .. }) || (matches!(mode, Mode::Run) && t.known().is_some()) {
            extra_nodes.push((src, name.clone()));
        }
        graph_outputs.push(proto::ValueInfo {
            doc: doc(&name),
            name,
            dtype: t.dtype(),
            dims: t.dims(),
        });
    }
    for (src, name) in &extra_nodes {
        nodes.push(proto::NodeDef {
            op_type: "Identity",
            inputs: vec![src.clone()],
            output: name.clone(),
            attrs: &[],
        });
    }
    // External data: when the initializers together exceed the threshold,
    // every large one is written to the sink and referenced by offset.
    let mut placed: Vec<Option<(String, u64, u64)>> = vec![None; initializers.len()];
    let mut external_bytes = 0u64;
    for (i, loc, len) in held {
        placed[i] = Some((loc, 0, len));
    }
    if let (Mode::Export(x), Some(sink)) = (&mode, data_sink) {
        if let Some((threshold, loc)) = &x.external {
            let total: usize = initializers.iter().map(|(_, h)| h.as_bytes().len()).sum();
            if total > *threshold {
                let io = |e: std::io::Error| backend_err(format!("writing external data {loc}: {e}"));
                for (slot, (_, h)) in placed.iter_mut().zip(&initializers) {
                    let b = h.as_bytes();
                    if b.len() < EXTERNAL_MIN_TENSOR_BYTES {
                        continue;
                    }
                    let pad = (EXTERNAL_ALIGN - external_bytes % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
                    sink.write_all(&vec![0u8; pad as usize]).map_err(io)?;
                    external_bytes += pad;
                    sink.write_all(b).map_err(io)?;
                    *slot = Some((loc.clone(), external_bytes, b.len() as u64));
                    external_bytes += b.len() as u64;
                }
            }
        }
    }
    let declared_inputs = inputs
        .iter()
        .map(|v| (v.name.clone(), v.dtype, v.dims.to_vec()))
        .collect();
    let mut contrib_ops = BTreeMap::new();
    for n in nodes.iter().filter(|n| proto::domain(n.op_type).is_some()) {
        *contrib_ops.entry(n.op_type.to_string()).or_insert(0) += 1;
    }
    let model = proto::model(&proto::GraphDef {
        name: graph_name,
        nodes,
        initializers,
        external: placed.iter().any(Option::is_some).then_some(proto::External { placed }),
        inputs,
        outputs: graph_outputs,
    });
    Ok(Serialized {
        model,
        feeds,
        weights,
        inputs: declared_inputs,
        external_bytes,
        contrib_ops,
    })
}

fn export_names(
    inputs: &[Port<'_>],
    params: &[ParamInput<'_>],
    outputs: &[Port<'_>],
    external: Option<(usize, String)>,
) -> Result<ExportNames> {
    let mut names = ExportNames {
        inputs: HashMap::new(),
        params: HashMap::new(),
        docs: HashMap::new(),
        replace: HashMap::new(),
        external,
    };
    for p in inputs {
        if !matches!(p.tensor.0.kind, Kind::Input(_) | Kind::Weight(_) | Kind::Op { .. }) {
            return Err(Error::InvalidArgument(format!(
                "export: input `{}` is a structural constant, not a value to feed",
                p.name
            )));
        }
        names.inputs.insert(p.tensor.0.id, p.name.to_string());
    }
    for p in params {
        if names.params.insert(p.traced as i64, p.name.to_string()).is_some() {
            return Err(Error::InvalidArgument(format!(
                "export: two params traced with the value {}",
                p.traced
            )));
        }
    }
    let docs = inputs
        .iter()
        .chain(outputs)
        .map(|p| (p.name, p.doc))
        .chain(params.iter().map(|p| (p.name, p.doc)));
    for (name, doc) in docs {
        if !doc.is_empty() {
            names.docs.insert(name.to_string(), doc.to_string());
        }
    }
    Ok(names)
}

/// A named, documented graph input or output of an export.
#[derive(Debug, Clone, Copy)]
pub struct Port<'a> {
    pub name: &'a str,
    pub tensor: &'a OnnxTensor,
    pub doc: &'a str,
}

impl<'a> Port<'a> {
    pub fn new(name: &'a str, tensor: &'a OnnxTensor, doc: &'a str) -> Self {
        Self { name, tensor, doc }
    }
}

/// A runtime offset exposed as an i64 `[1]` graph input: every offset that
/// the traced computation used with the value `traced` (a middle slice's
/// start, a cache write position, a causal mask offset) reads this input
/// instead. Trace at a value no structural offset takes (e.g. a decode
/// position past the head dimension), and check the export at other values.
#[derive(Debug, Clone, Copy)]
pub struct ParamInput<'a> {
    pub name: &'a str,
    pub traced: usize,
    pub doc: &'a str,
}

/// Initializer bytes above which [`OnnxBackend::export_to_file`] moves
/// weights to an external data file by default: protobuf limits a model to
/// 2 GiB, and the graph itself needs some room.
pub const EXTERNAL_DATA_THRESHOLD: usize = 2_000_000_000;

/// What [`OnnxBackend::export_to_file`] writes.
#[derive(Debug, Clone, Copy)]
pub struct ExportSpec<'a> {
    pub graph_name: &'a str,
    pub inputs: &'a [Port<'a>],
    pub params: &'a [ParamInput<'a>],
    pub outputs: &'a [Port<'a>],
    /// See [`EXTERNAL_DATA_THRESHOLD`]; 0 forces external data.
    pub external_data_threshold: usize,
    /// `(old, new)`: every use of `old` in the graph reads `new` (same shape
    /// and dtype) instead, e.g. an embedding the model computed on the host
    /// and uploaded, replaced by the same computation in the graph from a
    /// plainer input.
    pub replace: &'a [(&'a OnnxTensor, &'a OnnxTensor)],
}

/// A graph input or output as declared in an exported file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub doc: String,
}

/// What [`OnnxBackend::export_to_file`] wrote.
#[derive(Debug, Clone)]
pub struct ExportedFile {
    pub path: std::path::PathBuf,
    /// The external data file, when the weights went to one.
    pub external_data: Option<std::path::PathBuf>,
    pub external_bytes: u64,
    pub model_bytes: u64,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Nodes of ONNX Runtime's `com.microsoft` operators (`MatMulNBits`
    /// for quantized linears), by operator: a runtime needs them to load
    /// the file. Empty for a graph of standard operators only.
    pub contrib_ops: BTreeMap<String, usize>,
}

/// A quantized weight as operands of ONNX Runtime's `MatMulNBits`
/// (`com.microsoft`), 4-bit: one or two products of codes packed low-first
/// along K with one f32 scale and one 4-bit zero point per 32 weights (`w =
/// (code - zero_point) * scale`), summed, and for Q4_K the minima, which
/// that form has no room for, subtracted as a second product (see
/// [`nbits`]).
#[derive(Debug, Clone)]
struct NBits {
    parts: Vec<Part>,
    /// Q4_K: `ml = dmin * m` of every sub-block, `[K / 32, N]`.
    mins: Option<OnnxTensor>,
}

#[derive(Debug, Clone)]
struct Part {
    codes: OnnxTensor,
    scales: OnnxTensor,
    zero_points: OnnxTensor,
}

/// Maps `w`'s blocks onto [`NBits`]; both formats fit exactly, on the 4-bit
/// kernels (integer zero points keep ONNX Runtime on its packed 4-bit
/// path; its 8-bit and float-zero-point paths dequantize the whole weight
/// on every call).
///
/// Q8_0: `q = 16 hi + lo` with `lo = q & 15` and `hi = q >> 4` (in -8..=7),
/// so `d q = (hi + 8 - 8) (16 d) + (lo - 0) d`: two 4-bit products whose
/// every weight is exact in f32, 8 bits a weight as before.
///
/// Q4_K: a sub-block's weights are `dl q - ml` (`dl = d sc`, `ml = dmin m`),
/// so `x · w = sum_j dl_j (q_j · x_j) - sum_j ml_j sum(x_j)`: codes `q`
/// with zero point 0 and scale `dl` give the first sum, and the sums of `x`
/// over each 32-wide sub-block times the minima the second (the same
/// regrouping as the CPU kernels).
fn nbits(w: &QuantTensor) -> Result<NBits> {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    let blocks = k / 32;
    let rb = w.row_bytes();
    let bytes = w.bytes();
    let f16_at = |b: &[u8], o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
    let input = |h: HostTensor| new_node(h.dims().to_vec(), h.dtype(), Kind::Weight(h));
    // 4-bit zero points: packed two to a byte, each row's padded to a byte.
    let zp_bytes = n * blocks.div_ceil(2);
    let part = |codes: Vec<u8>, scales: Vec<f32>, zp: u8| -> Result<Part> {
        Ok(Part {
            codes: input(HostTensor::from_bytes(&[n, blocks, 16], DType::U8, codes)?),
            scales: input(HostTensor::from_f32(&[n, blocks], scales)?),
            zero_points: input(HostTensor::from_bytes(
                &[zp_bytes],
                DType::U8,
                vec![zp | (zp << 4); zp_bytes],
            )?),
        })
    };
    // 32 codes low-first, two to a byte.
    fn pack(q: impl Fn(usize) -> u8) -> impl Iterator<Item = u8> {
        (0..16).map(move |i| q(2 * i) | (q(2 * i + 1) << 4))
    }
    Ok(match w.qtype() {
        QuantType::Q8_0 => {
            let (mut lo, mut hi) = (Vec::with_capacity(n * k / 2), Vec::with_capacity(n * k / 2));
            let (mut s_lo, mut s_hi) = (Vec::with_capacity(n * blocks), Vec::with_capacity(n * blocks));
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                s_lo.push(d);
                s_hi.push(16.0 * d);
                let q = &blk[2..];
                lo.extend(pack(|i| q[i] & 15));
                hi.extend(pack(|i| (((q[i] as i8) >> 4) + 8) as u8));
            }
            NBits {
                parts: vec![part(hi, s_hi, 8)?, part(lo, s_lo, 0)?],
                mins: None,
            }
        }
        QuantType::Q4K => {
            let mut codes = Vec::with_capacity(n * k / 2);
            let mut scales = Vec::with_capacity(n * blocks);
            let mut mins = vec![0f32; blocks * n];
            for (r, row) in bytes.chunks_exact(rb).enumerate() {
                for (s, sb) in row.chunks_exact(144).enumerate() {
                    let (d, dmin) = (f16_at(sb, 0), f16_at(sb, 2));
                    let qs = &sb[16..];
                    for j in 0..8 {
                        let (sc, m) = emu_core::quant::scale_min_k4(j, &sb[4..16]);
                        scales.push(d * sc as f32);
                        mins[(s * 8 + j) * n + r] = dmin * m as f32;
                        let (g, shift) = (j / 2, 4 * (j % 2));
                        codes.extend(pack(|i| (qs[g * 32 + i] >> shift) & 15));
                    }
                }
            }
            NBits {
                parts: vec![part(codes, scales, 0)?],
                mins: Some(input(HostTensor::from_f32(&[blocks, n], mins)?)),
            }
        }
    })
}

/// The ONNX Runtime backend. Cheap to clone; clones share the session cache.
#[derive(Debug, Clone)]
pub struct OnnxBackend {
    sessions: Arc<SessionCache>,
    /// `MatMulNBits` operands of quantized weights, by the address of their
    /// block bytes (see [`nbits`]).
    quant: Arc<Mutex<QuantCache>>,
}

type QuantCache = HashMap<usize, (std::sync::Weak<Vec<u8>>, NBits)>;

impl OnnxBackend {
    /// Loads ONNX Runtime from `ORT_DYLIB_PATH` (once per process) and uses its
    /// default thread count. [`Error::BackendUnavailable`] when the library is missing.
    pub fn new() -> Result<Self> {
        Self::with_threads(0)
    }

    /// Like [`OnnxBackend::new`] with a fixed number of intra-op threads (0: ONNX Runtime's default).
    /// The first such request in a process sizes the shared thread pool
    /// that all sessions run on; a backend asking for another size later
    /// gets a pool per session.
    /// The execution provider comes from `EMU_ONNX_EP` (`cpu`, `cuda`,
    /// `cuda:N`; CPU when unset).
    pub fn with_threads(threads: usize) -> Result<Self> {
        Self::with_options(threads, ExecutionProvider::from_env()?)
    }

    /// ONNX Runtime with `threads` intra-op threads (0: its default) on the
    /// execution provider `ep`. [`Error::BackendUnavailable`] when the
    /// library is missing or lacks that provider (e.g. CUDA with the
    /// CPU-only wheel).
    pub fn with_options(threads: usize, ep: ExecutionProvider) -> Result<Self> {
        runtime::environment()?;
        ep.check_available()?;
        Ok(Self {
            sessions: Arc::new(SessionCache::new(threads, ep)),
            quant: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Where this backend's sessions run.
    pub fn execution_provider(&self) -> ExecutionProvider {
        self.sessions.execution_provider()
    }

    /// The `slice_set` writes in the not-yet-computed graph of `out`, in the
    /// order they were made: `(destination before, result)`. For a decode
    /// step of a model with a preallocated KV cache these are the cache
    /// updates, `(past, present)` per buffer, which an export names as
    /// inputs and outputs.
    pub fn slice_set_updates(&self, out: &OnnxTensor) -> Vec<(OnnxTensor, OnnxTensor)> {
        let order = topo_order(&[out], &|n: &OnnxTensor| n.known().is_some());
        let mut found: Vec<(OnnxTensor, OnnxTensor)> = order
            .into_iter()
            .filter_map(|n| match &n.0.kind {
                Kind::Op {
                    op_type: "ScatterElements",
                    inputs,
                    ..
                } if n.known().is_none() => Some((inputs[0].clone(), n.clone())),
                _ => None,
            })
            .collect();
        found.sort_by_key(|(_, n)| n.0.id);
        found
    }

    /// The upload in the graph of `out` that holds exactly `value` (same
    /// dtype, shape and bytes), e.g. an embedding a model computed on the
    /// host, so that an export can name it as an input.
    pub fn find_upload(&self, out: &OnnxTensor, value: &HostTensor) -> Option<OnnxTensor> {
        topo_order(&[out], &|_: &OnnxTensor| false)
            .into_iter()
            .find(|n| matches!(&n.0.kind, Kind::Input(h) if h.dtype() == value.dtype() && h.dims() == value.dims() && h.as_bytes() == value.as_bytes()))
    }

    /// Number of compiled sessions held (each distinct graph compiles once).
    pub fn cached_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Serialises the computation of `outputs` as a standalone ONNX model:
    /// the uploads listed in `inputs` become graph inputs under the given
    /// names, every other upload an initializer.
    pub fn export(
        &self,
        inputs: &[(&str, &OnnxTensor)],
        outputs: &[(&str, &OnnxTensor)],
        graph_name: &str,
    ) -> Result<Vec<u8>> {
        let names = export_names(
            &inputs.iter().map(|(n, t)| Port::new(n, t, "")).collect::<Vec<_>>(),
            &[],
            &[],
            None,
        )?;
        Ok(serialize(outputs, Mode::Export(&names), graph_name, None)?.model)
    }

    /// Writes the computation of `spec.outputs` to `path` as a standalone
    /// ONNX model with documented inputs and outputs. Tensors listed in
    /// `spec.inputs` (uploads, or computed values such as a KV cache from an
    /// earlier step: the graph then starts there) become graph inputs, every runtime offset traced with a
    /// value listed in `spec.params` becomes that i64 `[1]` input, and all
    /// other uploads become initializers. When the initializers exceed
    /// `spec.external_data_threshold` bytes, every initializer of 1 KiB or
    /// more is stored in `<file name>.data` beside the model (ONNX external
    /// data), as protobuf cannot hold a model over 2 GiB.
    pub fn export_to_file(&self, spec: &ExportSpec<'_>, path: &std::path::Path) -> Result<ExportedFile> {
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::InvalidArgument(format!("export: bad file name {}", path.display())))?;
        let data_name = format!("{file_name}.data");
        let data_path = path.with_file_name(&data_name);
        let mut names = export_names(
            spec.inputs,
            spec.params,
            spec.outputs,
            Some((spec.external_data_threshold, data_name)),
        )?;
        for (old, new) in spec.replace {
            if old.dims() != new.dims() || old.dtype() != new.dtype() {
                return Err(Error::InvalidArgument(format!(
                    "export: replacement {:?} {} for {:?} {}",
                    new.dims(),
                    new.dtype(),
                    old.dims(),
                    old.dtype()
                )));
            }
            names.replace.insert(old.0.id, (*new).clone());
        }
        let io = |p: &std::path::Path, e: std::io::Error| backend_err(format!("writing {}: {e}", p.display()));
        let mut sink = std::io::BufWriter::new(std::fs::File::create(&data_path).map_err(|e| io(&data_path, e))?);
        let outputs: Vec<(&str, &OnnxTensor)> = spec.outputs.iter().map(|p| (p.name, p.tensor)).collect();
        let s = serialize(&outputs, Mode::Export(&names), spec.graph_name, Some(&mut sink))?;
        std::io::Write::flush(&mut sink).map_err(|e| io(&data_path, e))?;
        drop(sink);
        let external_data = if s.external_bytes > 0 {
            Some(data_path)
        } else {
            std::fs::remove_file(&data_path).map_err(|e| io(&data_path, e))?;
            None
        };
        // Protobuf's hard limit for one message.
        if s.model.len() >= i32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "export: the graph of {} bytes exceeds protobuf's 2 GiB; lower external_data_threshold",
                s.model.len()
            )));
        }
        let declared: HashSet<&str> = s.inputs.iter().map(|(n, _, _)| n.as_str()).collect();
        let expected = spec
            .inputs
            .iter()
            .map(|p| p.name)
            .chain(spec.params.iter().map(|p| p.name));
        for name in expected {
            if !declared.contains(name) {
                return Err(Error::InvalidArgument(format!(
                    "export: input `{name}` does not reach the outputs of `{}`",
                    spec.graph_name
                )));
            }
        }
        std::fs::write(path, &s.model).map_err(|e| io(path, e))?;
        let info = |name: &str, dtype: DType, dims: &[usize]| TensorInfo {
            name: name.to_string(),
            dtype,
            dims: dims.to_vec(),
            doc: names.docs.get(name).cloned().unwrap_or_default(),
        };
        Ok(ExportedFile {
            path: path.to_path_buf(),
            external_data,
            external_bytes: s.external_bytes,
            model_bytes: s.model.len() as u64,
            inputs: s.inputs.iter().map(|(n, dt, d)| info(n, *dt, d)).collect(),
            outputs: spec
                .outputs
                .iter()
                .map(|p| info(p.name, p.tensor.dtype(), p.tensor.dims()))
                .collect(),
            contrib_ops: s.contrib_ops,
        })
    }

    fn check_ids_in_range(&self, ids: &OnnxTensor, size: usize, dim: usize, dims: &[usize]) -> Result<()> {
        if let Some(h) = ids.known() {
            if let Some(bad) = h.to_i64_vec()?.into_iter().find(|&i| i < 0 || i as usize >= size) {
                return Err(Error::shape(format!(
                    "index_select: index {bad} out of range for dim {dim} of {dims:?}"
                )));
            }
        }
        Ok(())
    }
}

impl Backend for OnnxBackend {
    type Tensor = OnnxTensor;

    fn name(&self) -> &str {
        NAME
    }

    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::Bool
    }

    fn dims(&self, t: &OnnxTensor) -> Vec<usize> {
        t.dims().to_vec()
    }

    fn dtype(&self, t: &OnnxTensor) -> DType {
        t.dtype()
    }

    fn upload(&self, host: &HostTensor) -> Result<OnnxTensor> {
        if !self.supports(host.dtype()) {
            return Err(unsupported(format!("{} tensors (use u8)", host.dtype())));
        }
        Ok(new_node(host.dims().to_vec(), host.dtype(), Kind::Input(host.clone())))
    }

    /// Runs the graph up to `t` now: the next sampling step then starts from
    /// its value, so every step is the same graph and one cached session
    /// serves the whole loop (otherwise the loop unrolls into one graph,
    /// compiled anew for each step count).
    fn materialize(&self, t: &OnnxTensor) -> Result<OnnxTensor> {
        self.download(t)?;
        Ok(t.clone())
    }

    fn download(&self, t: &OnnxTensor) -> Result<HostTensor> {
        if let Some(h) = t.known() {
            return Ok(h.clone());
        }
        let kept = held_elsewhere(t);
        let names: Vec<String> = (0..kept.len()).map(|i| format!("kept{i}")).collect();
        let mut outputs = vec![("out", t)];
        outputs.extend(names.iter().map(String::as_str).zip(kept.iter()));
        let s = serialize(&outputs, Mode::Run, "emu", None)?;
        for (_, t) in &s.feeds {
            if t.0.fed.get().is_none() {
                let h = t.known().ok_or_else(|| backend_err("a fed value is unknown"))?;
                let _ = t.0.fed.set(runtime::to_value(h)?);
            }
        }
        let feeds: Vec<(&str, &runtime::Value)> = s
            .feeds
            .iter()
            .filter_map(|(n, t)| Some((n.as_str(), t.0.fed.get()?)))
            .collect();
        let mut weights = Vec::with_capacity(s.weights.len());
        for (n, t) in &s.weights {
            weights.push((n.as_str(), t.known().ok_or_else(|| backend_err("a weight is unknown"))?));
        }
        let outs = self.sessions.run(s.model, &feeds, &weights)?;
        if outs.len() != outputs.len() {
            return Err(backend_err(format!(
                "the graph returned {} outputs instead of {}",
                outs.len(),
                outputs.len()
            )));
        }
        let mut outs = outs.into_iter();
        let (h, hv) = outs.next().ok_or_else(|| backend_err("the graph returned no output"))?;
        for (k, (v, value)) in kept.iter().zip(outs) {
            if v.dims() == k.dims() && v.dtype() == k.dtype() {
                let _ = k.0.value.set(v);
                let _ = k.0.fed.set(value);
            }
        }
        if h.dims() != t.dims() || h.dtype() != t.dtype() {
            return Err(backend_err(format!(
                "graph output {:?} {} differs from the expected {:?} {}",
                h.dims(),
                h.dtype(),
                t.dims(),
                t.dtype()
            )));
        }
        let _ = t.0.value.set(h.clone());
        let _ = t.0.fed.set(hv);
        Ok(h)
    }

    fn full(&self, dims: &[usize], value: f64, dtype: DType) -> Result<OnnxTensor> {
        checked_numel(dims)?;
        if !self.supports(dtype) {
            return Err(unsupported(format!("{dtype} tensors")));
        }
        let s = scalar(value, dtype)?;
        if dims.is_empty() {
            return Ok(s);
        }
        Ok(expand(&s, dims))
    }

    fn cast(&self, t: &OnnxTensor, dtype: DType) -> Result<OnnxTensor> {
        if !self.supports(dtype) {
            return Err(unsupported(format!("casting to {dtype}")));
        }
        Ok(cast_node(t, dtype))
    }

    fn reshape(&self, t: &OnnxTensor, dims: &[usize]) -> Result<OnnxTensor> {
        if checked_numel(dims)? != checked_numel(t.dims())? {
            return Err(Error::shape(format!("reshape: cannot view {:?} as {dims:?}", t.dims())));
        }
        if dims == t.dims() {
            return Ok(t.clone());
        }
        // allowzero: a 0 in the target shape is a real 0, not "copy the input dim".
        Ok(op(
            "Reshape",
            vec![t.clone(), dims_i64(dims)],
            vec![("allowzero", Attr::Int(1))],
            dims.to_vec(),
            t.dtype(),
        ))
    }

    fn permute(&self, t: &OnnxTensor, perm: &[usize]) -> Result<OnnxTensor> {
        let rank = t.dims().len();
        let mut seen = vec![false; rank];
        if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::shape(format!(
                "permute: {perm:?} is not a permutation of the dims of {:?}",
                t.dims()
            )));
        }
        let dims = perm.iter().map(|&p| t.dims()[p]).collect();
        Ok(op(
            "Transpose",
            vec![t.clone()],
            vec![("perm", Attr::Ints(perm.iter().map(|&p| p as i64).collect()))],
            dims,
            t.dtype(),
        ))
    }

    fn narrow(&self, t: &OnnxTensor, dim: usize, start: usize, len: usize) -> Result<OnnxTensor> {
        check_dim("narrow", t, dim)?;
        if start.checked_add(len).is_none_or(|end| end > t.dims()[dim]) {
            return Err(Error::shape(format!(
                "narrow: {start}..{start}+{len} out of range for dim {dim} of {:?}",
                t.dims()
            )));
        }
        if start == 0 && len == t.dims()[dim] {
            return Ok(t.clone());
        }
        let mut dims = t.dims().to_vec();
        dims[dim] = len;
        // A prefix or suffix is fixed by the shapes; a middle slice's start
        // is free (a RoPE table row at the decode position), so it is fed.
        let (starts, ends) = if start > 0 && start + len < t.dims()[dim] {
            let p = param(start);
            let end = op(
                "Add",
                vec![p.clone(), const_i64(&[len as i64])],
                vec![],
                vec![1],
                DType::I64,
            );
            (p, end)
        } else {
            (const_i64(&[start as i64]), const_i64(&[(start + len) as i64]))
        };
        Ok(op(
            "Slice",
            vec![t.clone(), starts, ends, const_i64(&[dim as i64])],
            vec![],
            dims,
            t.dtype(),
        ))
    }

    fn concat(&self, ts: &[&OnnxTensor], dim: usize) -> Result<OnnxTensor> {
        let first = ts.first().ok_or_else(|| Error::shape("concat of no tensors"))?;
        check_dim("concat", first, dim)?;
        let mut total = 0;
        for t in ts {
            same_dtype("concat", first, t)?;
            let ok = t.dims().len() == first.dims().len()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b);
            if !ok {
                return Err(Error::shape(format!(
                    "concat along {dim}: {:?} does not fit {:?}",
                    t.dims(),
                    first.dims()
                )));
            }
            total += t.dims()[dim];
        }
        if ts.len() == 1 {
            return Ok((*first).clone());
        }
        let mut dims = first.dims().to_vec();
        dims[dim] = total;
        Ok(op(
            "Concat",
            ts.iter().map(|t| (*t).clone()).collect(),
            vec![("axis", Attr::Int(dim as i64))],
            dims,
            first.dtype(),
        ))
    }

    fn slice_set(&self, dst: OnnxTensor, src: &OnnxTensor, dim: usize, start: usize) -> Result<OnnxTensor> {
        check_dim("slice_set", &dst, dim)?;
        same_dtype("slice_set", &dst, src)?;
        let fits = src.dims().len() == dst.dims().len()
            && src
                .dims()
                .iter()
                .zip(dst.dims())
                .enumerate()
                .all(|(i, (s, d))| if i == dim { start + s <= *d } else { s == d });
        if !fits {
            return Err(Error::shape(format!(
                "slice_set: {:?} at {start} along {dim} does not fit into {:?}",
                src.dims(),
                dst.dims()
            )));
        }
        if src.dims() == dst.dims() {
            return Ok(src.clone());
        }
        // A graph value is immutable: ScatterElements writes `src` into a
        // copy of `dst` at indices `start + i` along `dim`. `start` is fed
        // (a KV-cache write position), so every decode step is one graph.
        let mut idx_dims = vec![1; dst.dims().len()];
        idx_dims[dim] = src.dims()[dim];
        let idx = op(
            "Add",
            vec![arange_i64(&idx_dims), param(start)],
            vec![],
            idx_dims,
            DType::I64,
        );
        let idx = op(
            "Expand",
            vec![idx, dims_i64(src.dims())],
            vec![],
            src.dims().to_vec(),
            DType::I64,
        );
        Ok(op(
            "ScatterElements",
            vec![dst.clone(), idx, src.clone()],
            vec![("axis", Attr::Int(dim as i64))],
            dst.dims().to_vec(),
            dst.dtype(),
        ))
    }

    fn index_select(&self, t: &OnnxTensor, ids: &OnnxTensor, dim: usize) -> Result<OnnxTensor> {
        check_dim("index_select", t, dim)?;
        if ids.dims().len() != 1 || !matches!(ids.dtype(), DType::U32 | DType::I64 | DType::I32 | DType::U8) {
            return Err(Error::shape(format!(
                "index_select: ids must be a 1-D integer tensor, found {:?} {}",
                ids.dims(),
                ids.dtype()
            )));
        }
        self.check_ids_in_range(ids, t.dims()[dim], dim, t.dims())?;
        let mut dims = t.dims().to_vec();
        dims[dim] = ids.dims()[0];
        Ok(op(
            "Gather",
            vec![t.clone(), cast_node(ids, DType::I64)],
            vec![("axis", Attr::Int(dim as i64))],
            dims,
            t.dtype(),
        ))
    }

    fn broadcast_to(&self, t: &OnnxTensor, dims: &[usize]) -> Result<OnnxTensor> {
        let out = broadcast_dims("broadcast_to", t.dims(), dims)?;
        if out != dims {
            return Err(Error::shape(format!(
                "broadcast_to: {:?} cannot expand to {dims:?}",
                t.dims()
            )));
        }
        if dims == t.dims() {
            return Ok(t.clone());
        }
        Ok(expand(t, dims))
    }

    fn unary(&self, uop: UnaryOp, t: &OnnxTensor) -> Result<OnnxTensor> {
        if !t.dtype().is_float() {
            return Err(Error::DType(format!(
                "{uop:?} needs a float tensor, found {}",
                t.dtype()
            )));
        }
        in_f32(&[t], |xs| {
            let x = &xs[0];
            let dt = x.dtype();
            Ok(match uop {
                UnaryOp::Neg => ew("Neg", &[x]),
                UnaryOp::Abs => ew("Abs", &[x]),
                UnaryOp::Exp => ew("Exp", &[x]),
                UnaryOp::Log => ew("Log", &[x]),
                UnaryOp::Sqrt => ew("Sqrt", &[x]),
                UnaryOp::Sqr => ew("Mul", &[x, x]),
                UnaryOp::Recip => ew("Reciprocal", &[x]),
                UnaryOp::Tanh => ew("Tanh", &[x]),
                UnaryOp::Sigmoid => ew("Sigmoid", &[x]),
                UnaryOp::Sin => ew("Sin", &[x]),
                UnaryOp::Cos => ew("Cos", &[x]),
                UnaryOp::Relu => ew("Relu", &[x]),
                UnaryOp::Silu => ew("Mul", &[x, &ew("Sigmoid", &[x])]),
                UnaryOp::Gelu => {
                    // 0.5 x (1 + erf(x / sqrt 2)); opset 17 has no Gelu operator.
                    let e = ew("Erf", &[&ew2("Mul", x, &scalar(std::f64::consts::FRAC_1_SQRT_2, dt)?)?]);
                    let one_plus = ew2("Add", &e, &scalar(1.0, dt)?)?;
                    ew2("Mul", &ew2("Mul", x, &scalar(0.5, dt)?)?, &one_plus)?
                }
                UnaryOp::GeluTanh => {
                    // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                    let x3 = ew("Mul", &[&ew("Mul", &[x, x]), x]);
                    let inner = ew2("Add", x, &ew2("Mul", &x3, &scalar(0.044715, dt)?)?)?;
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    let th = ew("Tanh", &[&ew2("Mul", &inner, &scalar(c, dt)?)?]);
                    let one_plus = ew2("Add", &th, &scalar(1.0, dt)?)?;
                    ew2("Mul", &ew2("Mul", x, &scalar(0.5, dt)?)?, &one_plus)?
                }
            })
        })
    }

    fn binary(&self, bop: BinaryOp, a: &OnnxTensor, b: &OnnxTensor) -> Result<OnnxTensor> {
        same_dtype("binary op", a, b)?;
        broadcast_dims(&format!("{bop:?}"), a.dims(), b.dims())?;
        let name = match bop {
            BinaryOp::Add => "Add",
            BinaryOp::Sub => "Sub",
            BinaryOp::Mul => "Mul",
            BinaryOp::Div => "Div",
            BinaryOp::Maximum => "Max",
            BinaryOp::Minimum => "Min",
        };
        in_f32(&[a, b], |xs| ew2(name, &xs[0], &xs[1]))
    }

    fn affine(&self, t: &OnnxTensor, mul: f64, add: f64) -> Result<OnnxTensor> {
        in_f32(&[t], |xs| {
            let mut y = xs[0].clone();
            let dt = y.dtype();
            if mul != 1.0 {
                y = ew2("Mul", &y, &scalar(mul, dt)?)?;
            }
            if add != 0.0 {
                y = ew2("Add", &y, &scalar(add, dt)?)?;
            }
            Ok(y)
        })
    }

    fn reduce(&self, rop: ReduceOp, t: &OnnxTensor, dim: usize, keepdim: bool) -> Result<OnnxTensor> {
        check_dim("reduce", t, dim)?;
        if t.dims()[dim] == 0 {
            return Err(Error::shape(format!(
                "reduce: dimension {dim} of {:?} is empty",
                t.dims()
            )));
        }
        let mut dims = t.dims().to_vec();
        if keepdim {
            dims[dim] = 1;
        } else {
            dims.remove(dim);
        }
        let keep = ("keepdims", Attr::Int(keepdim as i64));
        in_f32(&[t], |xs| {
            let x = xs[0].clone();
            let dt = x.dtype();
            Ok(match rop {
                // Opset 13+ takes ReduceSum's axes as an input, the others (until 18) as an attribute.
                ReduceOp::Sum => op("ReduceSum", vec![x, const_i64(&[dim as i64])], vec![keep], dims, dt),
                _ => {
                    let name = match rop {
                        ReduceOp::Mean => "ReduceMean",
                        ReduceOp::Max => "ReduceMax",
                        _ => "ReduceMin",
                    };
                    op(
                        name,
                        vec![x],
                        vec![("axes", Attr::Ints(vec![dim as i64])), keep],
                        dims,
                        dt,
                    )
                }
            })
        })
    }

    fn argmax(&self, t: &OnnxTensor, dim: usize) -> Result<OnnxTensor> {
        check_dim("argmax", t, dim)?;
        if t.dims()[dim] == 0 {
            return Err(Error::shape(format!(
                "argmax: dimension {dim} of {:?} is empty",
                t.dims()
            )));
        }
        let mut dims = t.dims().to_vec();
        dims.remove(dim);
        let x = if is_half(t.dtype()) {
            cast_node(t, DType::F32)
        } else {
            t.clone()
        };
        let am = op(
            "ArgMax",
            vec![x],
            vec![
                ("axis", Attr::Int(dim as i64)),
                ("keepdims", Attr::Int(0)),
                ("select_last_index", Attr::Int(0)),
            ],
            dims,
            DType::I64,
        );
        Ok(cast_node(&am, DType::U32))
    }

    fn linear_quant(&self, x: &OnnxTensor, w: &QuantTensor, b: Option<&OnnxTensor>) -> Result<OnnxTensor> {
        let bias = b.map(|b| (b.dims(), b.dtype()));
        let (n, k) = emu_core::backend::check_linear_quant(x.dims(), x.dtype(), w, bias)?;
        let xd = x.dims().to_vec();
        let m: usize = xd[..xd.len() - 1].iter().product();
        if !x.dtype().is_float() || m == 0 || n == 0 || k == 0 {
            return emu_core::backend::default_linear_quant(self, x, w, b);
        }
        let operands = {
            let shared = w.shared_bytes();
            let key = Arc::as_ptr(shared) as usize;
            let mut cache = self
                .quant
                .lock()
                .map_err(|_| backend_err("quantized weight cache lock poisoned"))?;
            match cache.get(&key) {
                Some((weak, ops)) if weak.upgrade().is_some_and(|a| Arc::ptr_eq(&a, shared)) => ops.clone(),
                _ => {
                    cache.retain(|_, (weak, _)| weak.strong_count() > 0);
                    let ops = nbits(w)?;
                    cache.insert(key, (Arc::downgrade(shared), ops.clone()));
                    ops
                }
            }
        };
        let q = operands;
        let mut od = xd[..xd.len() - 1].to_vec();
        od.push(n);
        let ins: Vec<&OnnxTensor> = std::iter::once(x).chain(b).collect();
        in_f32(&ins, |xs| {
            let x2 = self.reshape(&xs[0], &[m, k])?;
            let mut y: Option<OnnxTensor> = None;
            for p in &q.parts {
                let t = op(
                    "MatMulNBits",
                    vec![x2.clone(), p.codes.clone(), p.scales.clone(), p.zero_points.clone()],
                    vec![
                        ("K", Attr::Int(k as i64)),
                        ("N", Attr::Int(n as i64)),
                        ("bits", Attr::Int(4)),
                        ("block_size", Attr::Int(32)),
                    ],
                    vec![m, n],
                    DType::F32,
                );
                y = Some(match y {
                    Some(acc) => ew2("Add", &acc, &t)?,
                    None => t,
                });
            }
            let mut y = y.ok_or_else(|| backend_err("linear_quant: no product"))?;
            if let Some(mins) = &q.mins {
                // sum(x) over each 32-wide sub-block, [m, K / 32], times the minima.
                let sums = self.reduce(ReduceOp::Sum, &self.reshape(&x2, &[m, k / 32, 32])?, 2, false)?;
                y = ew2("Sub", &y, &self.matmul(&sums, mins)?)?;
            }
            let y = match xs.get(1) {
                Some(bias) => ew2("Add", &y, bias)?,
                None => y,
            };
            self.reshape(&y, &od)
        })
    }

    fn matmul(&self, a: &OnnxTensor, b: &OnnxTensor) -> Result<OnnxTensor> {
        same_dtype("matmul", a, b)?;
        let (ad, bd) = (a.dims(), b.dims());
        if ad.len() < 2 || bd.len() < 2 || ad[ad.len() - 1] != bd[bd.len() - 2] {
            return Err(Error::shape(format!("matmul: {ad:?} x {bd:?}")));
        }
        let mut dims = broadcast_dims("matmul batch", &ad[..ad.len() - 2], &bd[..bd.len() - 2])?;
        dims.push(ad[ad.len() - 2]);
        dims.push(bd[bd.len() - 1]);
        in_f32(&[a, b], |xs| {
            Ok(op(
                "MatMul",
                vec![xs[0].clone(), xs[1].clone()],
                vec![],
                dims,
                xs[0].dtype(),
            ))
        })
    }

    fn conv2d(&self, x: &OnnxTensor, w: &OnnxTensor, bias: Option<&OnnxTensor>, p: Conv2dParams) -> Result<OnnxTensor> {
        same_dtype("conv2d", x, w)?;
        let (xd, wd) = (x.dims(), w.dims());
        if xd.len() != 4 || wd.len() != 4 || p.groups == 0 || xd[1] != wd[1] * p.groups || wd[0] % p.groups != 0 {
            return Err(Error::shape(format!(
                "conv2d: input {xd:?}, weight {wd:?}, groups {}",
                p.groups
            )));
        }
        let (oh, ow) = p.output_hw((xd[2], xd[3]), (wd[2], wd[3]))?;
        if let Some(b) = bias {
            same_dtype("conv2d bias", x, b)?;
            if b.dims() != [wd[0]] {
                return Err(Error::shape(format!(
                    "conv2d: bias {:?} for {} output channels",
                    b.dims(),
                    wd[0]
                )));
            }
        }
        let dims = vec![xd[0], wd[0], oh, ow];
        let i = |v: usize| v as i64;
        let attrs = vec![
            ("kernel_shape", Attr::Ints(vec![i(wd[2]), i(wd[3])])),
            ("strides", Attr::Ints(vec![i(p.stride.0), i(p.stride.1)])),
            (
                "pads",
                Attr::Ints(vec![i(p.padding.0), i(p.padding.1), i(p.padding.0), i(p.padding.1)]),
            ),
            ("dilations", Attr::Ints(vec![i(p.dilation.0), i(p.dilation.1)])),
            ("group", Attr::Int(i(p.groups))),
        ];
        let mut ins = vec![x, w];
        ins.extend(bias);
        in_f32(&ins, |xs| Ok(op("Conv", xs.to_vec(), attrs, dims, xs[0].dtype())))
    }

    fn avg_pool2d(&self, x: &OnnxTensor, kernel: (usize, usize), stride: (usize, usize)) -> Result<OnnxTensor> {
        let d = x.dims();
        if d.len() != 4
            || kernel.0 == 0
            || kernel.1 == 0
            || stride.0 == 0
            || stride.1 == 0
            || d[2] < kernel.0
            || d[3] < kernel.1
        {
            return Err(Error::shape(format!(
                "avg_pool2d: input {d:?}, kernel {kernel:?}, stride {stride:?}"
            )));
        }
        let dims = vec![
            d[0],
            d[1],
            (d[2] - kernel.0) / stride.0 + 1,
            (d[3] - kernel.1) / stride.1 + 1,
        ];
        let i = |v: usize| v as i64;
        let attrs = vec![
            ("kernel_shape", Attr::Ints(vec![i(kernel.0), i(kernel.1)])),
            ("strides", Attr::Ints(vec![i(stride.0), i(stride.1)])),
        ];
        in_f32(&[x], |xs| {
            Ok(op("AveragePool", xs.to_vec(), attrs, dims, xs[0].dtype()))
        })
    }

    fn upsample_nearest2d(&self, x: &OnnxTensor, h: usize, w: usize) -> Result<OnnxTensor> {
        let d = x.dims();
        if d.len() != 4 || h == 0 || w == 0 || d[2] == 0 || d[3] == 0 {
            return Err(Error::shape(format!("upsample_nearest2d: input {d:?} to {h}x{w}")));
        }
        // PyTorch's source index, `min(floor(dst * (in / out)), in - 1)` in f32,
        // as two Gathers with precomputed indices: exact where Resize's
        // coordinate arithmetic could round differently.
        let src = |i: usize, o: usize| -> Vec<i64> {
            (0..o)
                .map(|dst| (((dst as f32) * (i as f32 / o as f32)).floor() as i64).min(i as i64 - 1))
                .collect()
        };
        let rows = op(
            "Gather",
            vec![x.clone(), const_i64(&src(d[2], h))],
            vec![("axis", Attr::Int(2))],
            vec![d[0], d[1], h, d[3]],
            x.dtype(),
        );
        Ok(op(
            "Gather",
            vec![rows, const_i64(&src(d[3], w))],
            vec![("axis", Attr::Int(3))],
            vec![d[0], d[1], h, w],
            x.dtype(),
        ))
    }

    // ---- fused overrides -------------------------------------------------

    /// The default attention, with the causal mask computed in the graph from
    /// a fed offset instead of uploaded from the host, so that decode steps
    /// share a graph and an exported decode graph takes the position as input.
    fn attention(
        &self,
        q: &OnnxTensor,
        k: &OnnxTensor,
        v: &OnnxTensor,
        mask: &AttnMask<'_, OnnxTensor>,
        scale: f64,
    ) -> Result<OnnxTensor> {
        let (qd, kd) = (q.dims(), k.dims());
        let Some(offset) = mask.causal_offset.filter(|_| qd.len() == 4 && kd.len() == 4) else {
            // No causal part, or malformed shapes that the default reports.
            return default_attention(self, q, k, v, mask, scale);
        };
        let (tq, tk) = (qd[2], kd[2]);
        // Scores are f32 for half inputs, else q's dtype.
        let sdt = if is_half(q.dtype()) { DType::F32 } else { q.dtype() };
        let limit = op(
            "Add",
            vec![arange_i64(&[tq, 1]), param(offset)],
            vec![],
            vec![tq, 1],
            DType::I64,
        );
        let hide = op(
            "Greater",
            vec![arange_i64(&[1, tk]), limit],
            vec![],
            vec![tq, tk],
            DType::Bool,
        );
        let causal = op(
            "Where",
            vec![hide, scalar(MASK_VALUE, sdt)?, scalar(0.0, sdt)?],
            vec![],
            vec![tq, tk],
            sdt,
        );
        let bias = match mask.bias {
            Some(b) => self.binary(BinaryOp::Add, &cast_node(b, sdt), &causal)?,
            None => causal,
        };
        let mask = AttnMask {
            causal_offset: None,
            bias: Some(&bias),
        };
        default_attention(self, q, k, v, &mask, scale)
    }

    fn softmax_last_dim(&self, x: &OnnxTensor) -> Result<OnnxTensor> {
        if x.dims().is_empty() {
            return Err(Error::shape("softmax of a scalar"));
        }
        in_f32(&[x], |xs| {
            Ok(op(
                "Softmax",
                xs.to_vec(),
                vec![("axis", Attr::Int(-1))],
                xs[0].dims().to_vec(),
                xs[0].dtype(),
            ))
        })
    }

    fn layer_norm(
        &self,
        x: &OnnxTensor,
        w: Option<&OnnxTensor>,
        b: Option<&OnnxTensor>,
        eps: f64,
    ) -> Result<OnnxTensor> {
        let last = *x.dims().last().ok_or_else(|| Error::shape("layer_norm of a scalar"))?;
        for p in [w, b].into_iter().flatten() {
            same_dtype("layer_norm", x, p)?;
            if p.dims() != [last] {
                return Err(Error::shape(format!(
                    "layer_norm: parameter {:?} for input {:?}",
                    p.dims(),
                    x.dims()
                )));
            }
        }
        // The affine part runs in f32 too and rounds once, like PyTorch's kernel.
        let scale = match w {
            Some(w) => w.clone(),
            None => self.full(&[last], 1.0, x.dtype())?,
        };
        let mut ins = vec![x, &scale];
        ins.extend(b);
        in_f32(&ins, |xs| {
            Ok(op(
                "LayerNormalization",
                xs.to_vec(),
                vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))],
                xs[0].dims().to_vec(),
                xs[0].dtype(),
            ))
        })
    }
}
