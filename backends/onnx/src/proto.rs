//! A minimal protobuf writer for the subset of `onnx.proto` this backend emits
//! (ModelProto, GraphProto, NodeProto, TensorProto, ValueInfoProto,
//! AttributeProto, OperatorSetIdProto).
//!
//! Field numbers follow `onnx/onnx.proto` (proto2). Repeated scalars are
//! written unpacked, which every protobuf parser must accept.

use emu_core::{DType, HostTensor};

/// The ONNX IR version that opset 17 requires.
pub const IR_VERSION: i64 = 8;
/// The default-domain opset the emitted graphs use.
pub const OPSET: i64 = 17;

/// An attribute value of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
}

#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u32) {
        self.varint(((field << 3) | wire) as u64);
    }
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }
    fn float(&mut self, field: u32, f: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&f.to_le_bytes());
    }
}

/// `TensorProto.DataType` of a dtype.
pub fn onnx_type(dtype: DType) -> i64 {
    match dtype {
        DType::F32 => 1,
        DType::U8 => 2,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::Bool => 9,
        DType::F16 => 10,
        DType::F64 => 11,
        DType::U32 => 12,
        DType::BF16 => 16,
    }
}

/// One node: `op_type(inputs) -> output` with attributes.
pub struct NodeDef<'a> {
    pub op_type: &'a str,
    pub inputs: Vec<String>,
    pub output: String,
    pub attrs: &'a [(&'static str, Attr)],
}

/// A graph input or output: name, dtype and static shape.
pub struct ValueInfo<'a> {
    pub name: String,
    pub dtype: DType,
    pub dims: &'a [usize],
    pub doc: Option<String>,
}

/// Everything a serialised model holds.
pub struct GraphDef<'a> {
    pub name: &'a str,
    pub nodes: Vec<NodeDef<'a>>,
    pub initializers: Vec<(String, &'a HostTensor)>,
    /// Where initializers live outside the model file, if any do.
    pub external: Option<External>,
    pub inputs: Vec<ValueInfo<'a>>,
    pub outputs: Vec<ValueInfo<'a>>,
}

/// Initializers stored outside the model (ONNX external data): per
/// initializer (in [`GraphDef::initializers`] order) its `(location,
/// offset, length)` — a file name relative to the model, or a name whose
/// data the session is handed when it is created — or `None` for one kept
/// inline.
pub struct External {
    pub placed: Vec<Option<(String, u64, u64)>>,
}

fn string_entry(key: &str, value: &str) -> Vec<u8> {
    let mut b = Buf::default();
    b.str(1, key);
    b.str(2, value);
    b.0
}

fn tensor(name: &str, t: &HostTensor, external: Option<(&str, u64, u64)>) -> Vec<u8> {
    let mut b = Buf::default();
    for &d in t.dims() {
        b.int(1, d as i64);
    }
    b.int(2, onnx_type(t.dtype()));
    b.str(8, name);
    match external {
        // raw_data is little-endian, exactly HostTensor's layout.
        None => b.bytes(9, t.as_bytes()),
        Some((location, offset, length)) => {
            b.bytes(13, &string_entry("location", location));
            b.bytes(13, &string_entry("offset", &offset.to_string()));
            b.bytes(13, &string_entry("length", &length.to_string()));
            // data_location = EXTERNAL
            b.int(14, 1);
        }
    }
    b.0
}

fn attribute(name: &str, a: &Attr) -> Vec<u8> {
    let mut b = Buf::default();
    b.str(1, name);
    match a {
        Attr::Float(f) => {
            b.float(2, *f);
            b.int(20, 1);
        }
        Attr::Int(i) => {
            b.int(3, *i);
            b.int(20, 2);
        }
        Attr::Str(s) => {
            b.str(4, s);
            b.int(20, 3);
        }
        Attr::Ints(v) => {
            for &i in v {
                b.int(8, i);
            }
            b.int(20, 7);
        }
    }
    b.0
}

fn node(n: &NodeDef<'_>) -> Vec<u8> {
    let mut b = Buf::default();
    for i in &n.inputs {
        b.str(1, i);
    }
    b.str(2, &n.output);
    b.str(3, &n.output);
    b.str(4, n.op_type);
    if let Some(d) = domain(n.op_type) {
        b.str(7, d);
    }
    for (name, a) in n.attrs {
        b.bytes(5, &attribute(name, a));
    }
    b.0
}

fn value_info(v: &ValueInfo<'_>) -> Vec<u8> {
    let mut shape = Buf::default();
    for &d in v.dims {
        let mut dim = Buf::default();
        dim.int(1, d as i64);
        shape.bytes(1, &dim.0);
    }
    let mut tt = Buf::default();
    tt.int(1, onnx_type(v.dtype));
    tt.bytes(2, &shape.0);
    let mut ty = Buf::default();
    ty.bytes(1, &tt.0);
    let mut b = Buf::default();
    b.str(1, &v.name);
    b.bytes(2, &ty.0);
    if let Some(doc) = &v.doc {
        b.str(3, doc);
    }
    b.0
}

/// Version of the `com.microsoft` domain (ONNX Runtime's contrib operators)
/// imported by graphs that use one.
pub const MS_OPSET: i64 = 1;

/// The domain of an operator outside the default one.
pub(crate) fn domain(op_type: &str) -> Option<&'static str> {
    (op_type == "MatMulNBits").then_some("com.microsoft")
}

/// Serialises a graph as an ONNX `ModelProto` (opset [`OPSET`] of the
/// default domain, and [`MS_OPSET`] of `com.microsoft` where a node needs it).
pub fn model(g: &GraphDef<'_>) -> Vec<u8> {
    let mut graph = Buf::default();
    for n in &g.nodes {
        graph.bytes(1, &node(n));
    }
    graph.str(2, g.name);
    for (i, (name, t)) in g.initializers.iter().enumerate() {
        let ext = g
            .external
            .as_ref()
            .and_then(|e| e.placed.get(i))
            .and_then(|p| p.as_ref())
            .map(|(loc, o, l)| (loc.as_str(), *o, *l));
        graph.bytes(5, &tensor(name, t, ext));
    }
    for v in &g.inputs {
        graph.bytes(11, &value_info(v));
    }
    for v in &g.outputs {
        graph.bytes(12, &value_info(v));
    }
    let mut opset = Buf::default();
    opset.str(1, "");
    opset.int(2, OPSET);
    let mut m = Buf::default();
    m.int(1, IR_VERSION);
    m.str(2, "emu-rs");
    m.str(3, env!("CARGO_PKG_VERSION"));
    m.bytes(7, &graph.0);
    m.bytes(8, &opset.0);
    if g.nodes.iter().any(|n| domain(n.op_type).is_some()) {
        let mut ms = Buf::default();
        ms.str(1, "com.microsoft");
        ms.int(2, MS_OPSET);
        m.bytes(8, &ms.0);
    }
    m.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_keys_follow_the_wire_format() {
        let mut b = Buf::default();
        b.int(1, 300);
        assert_eq!(b.0, vec![0x08, 0xac, 0x02]);
        let mut b = Buf::default();
        b.int(2, -1);
        // Negative int64 are ten-byte two's complement varints.
        assert_eq!(b.0.len(), 11);
        let mut b = Buf::default();
        b.str(4, "Add");
        assert_eq!(b.0, vec![0x22, 3, b'A', b'd', b'd']);
    }
}
