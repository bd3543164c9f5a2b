//! A small pickle interpreter for what `torch.save` writes.
//!
//! Nothing is ever executed: `GLOBAL`s are names, and `REDUCE` is interpreted
//! only for the few callables a state dict needs (`_rebuild_tensor_v2/v3`,
//! `_rebuild_parameter`, `collections.OrderedDict`); any other call becomes an
//! opaque [`Value::Object`]. Persistent ids (`BINPERSID`) must be torch storage
//! references. Every length read from the stream is checked against the bytes
//! that remain before anything is allocated, nesting is bounded so that
//! dropping a value cannot overflow the stack, and values are shared (`Rc`)
//! rather than deep-copied on `BINGET`, so memory stays proportional to the
//! input.

use crate::DType;
use std::collections::HashMap;
use std::rc::Rc;

/// Deepest container nesting accepted (state dicts need about 5).
const MAX_DEPTH: usize = 200;

/// Elements copied by copy-on-write of shared containers, in total; bounds the
/// time a hostile stream can make us spend.
const MAX_COPIED: usize = 50_000_000;

/// Element type of a torch storage or tensor, as named in the pickle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TorchDType {
    Known(DType),
    /// Kept by name: loading such a tensor is an error, listing it is not.
    Other(String),
}

impl TorchDType {
    pub(crate) fn size_in_bytes(&self) -> Option<usize> {
        match self {
            TorchDType::Known(d) => Some(d.size_in_bytes()),
            TorchDType::Other(n) => match n.as_str() {
                "int16" | "short" | "uint16" | "ShortStorage" => Some(2),
                "int8" | "CharStorage" => Some(1),
                "uint64" => Some(8),
                n if n.starts_with("float8") => Some(1),
                _ => None,
            },
        }
    }
}

/// A storage reference from a persistent id `('storage', type, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageRef {
    pub(crate) key: String,
    /// `None` for `UntypedStorage` (bytes; the tensor carries its dtype).
    pub(crate) dtype: Option<TorchDType>,
    /// Elements of `dtype` (bytes for untyped storages).
    pub(crate) numel: u64,
}

/// A tensor rebuilt from `_rebuild_tensor_v2/v3`: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub(crate) storage: StorageRef,
    pub(crate) dtype: TorchDType,
    pub(crate) offset: u64,
    pub(crate) size: Vec<u64>,
    pub(crate) stride: Vec<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Seq {
    depth: usize,
    items: Vec<Value>,
}

// Scalar payloads are only looked at by tests and `Debug`; they are kept so
// that a value is what the pickle says it is.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits; only its existence matters here.
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq>),
    List(Rc<Seq>),
    /// Insertion-ordered key/value pairs (keys are usually strings).
    Dict(Rc<Seq>),
    Global(Rc<(String, String)>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// The result of a call this reader does not interpret (its arguments
    /// are dropped: nothing a state dict needs lives inside one).
    Object,
    /// The result of calling a global this reader does not interpret (it
    /// is never called); kept by name so that errors can say what was refused.
    Refused(Rc<(String, String)>),
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) | Value::Dict(s) => s.depth,
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Object => "object",
            Value::Refused(_) => "refused call",
        }
    }
}

fn seq(items: Vec<Value>) -> Result<Rc<Seq>, String> {
    let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
    if depth > MAX_DEPTH {
        return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(Rc::new(Seq { depth, items }))
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Start indices in `stack` of the open `MARK`s.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    copied: usize,
}

/// Runs a pickle program and returns the value it leaves (its `STOP` result).
pub(crate) fn load(data: &[u8]) -> Result<Value, String> {
    let mut vm = Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
    };
    vm.run()
}

fn torch_dtype_from_storage(name: &str) -> Option<TorchDType> {
    let known = match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        "UntypedStorage" => return None,
        other => return Some(TorchDType::Other(other.to_string())),
    };
    Some(TorchDType::Known(known))
}

fn torch_dtype_from_name(name: &str) -> TorchDType {
    TorchDType::Known(match name {
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "uint32" => DType::U32,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        other => return TorchDType::Other(other.to_string()),
    })
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "pickle ends early (needs {n} bytes at offset {}, has {})",
                    self.pos,
                    self.data.len() - self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// A length read from the stream; bounded by the bytes that remain, so
    /// that nothing is allocated on a corrupt length.
    fn len_checked(&self, n: u64) -> Result<usize, String> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.pos)
            .ok_or_else(|| {
                format!(
                    "length {n} at offset {} exceeds the {} bytes left",
                    self.pos,
                    self.data.len() - self.pos
                )
            })
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated text argument")?;
        self.pos += nl + 1;
        std::str::from_utf8(&rest[..nl]).map_err(|_| "text argument is not UTF-8".to_string())
    }

    fn utf8(&mut self, n: usize) -> Result<Value, String> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| format!("string at offset {} is not UTF-8", self.pos - n))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".into());
        }
        self.stack.last_mut().ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let start = self.marks.pop().ok_or("MARK expected")?;
        Ok(self.stack.split_off(start))
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<(), String> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("memo key {idx} was never stored"))?;
        self.push(v);
        Ok(())
    }

    /// Mutable access to a shared container (copy on write), with the copy
    /// counted against [`MAX_COPIED`].
    fn make_mut<'v>(copied: &mut usize, rc: &'v mut Rc<Seq>) -> Result<&'v mut Seq, String> {
        if Rc::strong_count(rc) > 1 {
            *copied += rc.items.len();
            if *copied > MAX_COPIED {
                return Err("pickle copies too much data (hostile or corrupt?)".into());
            }
        }
        Ok(Rc::make_mut(rc))
    }

    fn extend_top(&mut self, items: Vec<Value>, dict: bool) -> Result<(), String> {
        if dict && items.len() % 2 == 1 {
            return Err("SETITEMS with an odd number of items".into());
        }
        let mut copied = self.copied;
        let target = self.top()?;
        let (rc, ok) = match target {
            Value::List(rc) => (rc, !dict),
            Value::Dict(rc) => (rc, dict),
            other => return Err(format!("cannot add items to a {}", other.kind())),
        };
        if !ok {
            return Err(format!(
                "{} items added to the wrong container",
                if dict { "dict" } else { "list" }
            ));
        }
        let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        if depth > MAX_DEPTH {
            return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        let s = Self::make_mut(&mut copied, rc)?;
        s.depth = s.depth.max(depth);
        s.items.extend(items);
        self.copied = copied;
        Ok(())
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            let r = self.step(op);
            match r {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => return Err(format!("pickle opcode 0x{op:02x} at offset {at}: {e}")),
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<Option<Value>, String> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if proto > 5 {
                    return Err(format!("unsupported pickle protocol {proto}"));
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint only.
            }
            b'.' => {
                let v = self.pop()?;
                return Ok(Some(v));
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = self.u32()? as i32;
                self.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8()? as u64
                } else {
                    self.u32()? as u64
                };
                let n = self.len_checked(n)?;
                let b = self.take(n)?;
                self.push(long_le(b));
            }
            b'I' => {
                let line = self.line()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().map_err(|_| format!("bad INT `{s}`"))?),
                };
                self.push(v);
            }
            b'L' => {
                let line = self.line()?;
                let s = line.strip_suffix('L').unwrap_or(line);
                self.push(s.parse().map(Value::Int).unwrap_or(Value::BigInt));
            }
            b'G' => {
                let b = self.take(8)?;
                let v = f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                self.push(Value::Float(v));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => self.u32()? as u64,
                    0x8c => self.u8()? as u64,
                    _ => self.u64()?,
                };
                let n = self.len_checked(n)?;
                let v = self.utf8(n)?;
                self.push(v);
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'T' | b'B' => self.u32()? as u64,
                    b'U' | b'C' => self.u8()? as u64,
                    _ => self.u64()?,
                };
                let n = self.len_checked(n)?;
                let b = self.take(n)?;
                // Protocol-1 strings are text to Python 3 (latin-1 by default).
                let v = if matches!(op, b'T' | b'U') {
                    Value::Str(Rc::from(b.iter().map(|&c| c as char).collect::<String>()))
                } else {
                    Value::Bytes(Rc::from(b))
                };
                self.push(v);
            }
            b')' => self.push(Value::Tuple(seq(Vec::new())?)),
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(seq(items)?));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::Tuple(seq(items)?));
            }
            b']' => self.push(Value::List(seq(Vec::new())?)),
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(seq(items)?));
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_top(vec![v], false)?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_top(items, false)?;
            }
            b'}' => self.push(Value::Dict(seq(Vec::new())?)),
            b'd' => {
                let items = self.pop_mark()?;
                if items.len() % 2 == 1 {
                    return Err("DICT with an odd number of items".into());
                }
                self.push(Value::Dict(seq(items)?));
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.extend_top(vec![k, v], true)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.extend_top(items, true)?;
            }
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                self.push(Value::Global(Rc::new((module, name))));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.push(Value::Global(Rc::new((m.to_string(), n.to_string())))),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = reduce(func, args)?;
                self.push(v);
            }
            0x81 => {
                self.pop()?;
                self.pop()?;
                self.push(Value::Object);
            }
            0x92 => {
                self.pop()?;
                self.pop()?;
                self.pop()?;
                self.push(Value::Object);
            }
            b'b' => {
                // The state of an OrderedDict (its `_metadata`), a tensor
                // (hooks, flags) or an opaque object is not needed.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent_load(pid)?;
                self.push(v);
            }
            b'q' => {
                let i = self.u8()? as u32;
                self.memo_put(i)?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                self.memo_put(i)?;
            }
            b'p' => {
                let i = self.line()?.parse().map_err(|_| "bad PUT index")?;
                self.memo_put(i)?;
            }
            b'h' => {
                let i = self.u8()? as u32;
                self.memo_get(i)?;
            }
            b'j' => {
                let i = self.u32()?;
                self.memo_get(i)?;
            }
            b'g' => {
                let i = self.line()?.parse().map_err(|_| "bad GET index")?;
                self.memo_get(i)?;
            }
            other => return Err(format!("unsupported or invalid opcode 0x{other:02x}")),
        }
        Ok(None)
    }
}

/// A little-endian two's-complement integer (`LONG1`/`LONG4`).
fn long_le(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() > 8 {
        return Value::BigInt;
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    let mut buf = [if neg { 0xff } else { 0 }; 8];
    buf[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(buf))
}

fn items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Tuple(s) | Value::List(s) => Some(&s.items),
        _ => None,
    }
}

fn int(v: &Value, what: &str) -> Result<u64, String> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        other => Err(format!("{what}: expected a non-negative int, found {}", other.kind())),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    items(v)
        .ok_or_else(|| format!("{what}: expected a tuple"))?
        .iter()
        .map(|x| int(x, what))
        .collect()
}

fn reduce(func: Value, args: Value) -> Result<Value, String> {
    let Value::Global(g) = &func else {
        return Ok(Value::Object);
    };
    let (module, name) = (g.0.as_str(), g.1.as_str());
    match (module, name) {
        ("collections", "OrderedDict") | ("builtins", "dict") => {
            // OrderedDict() or OrderedDict([(k, v), ...]).
            let mut pairs = Vec::new();
            if let Some(first) = items(&args).and_then(|a| a.first()) {
                for p in items(first).ok_or("OrderedDict argument is not a list of pairs")? {
                    match items(p) {
                        Some([k, v]) => pairs.extend([k.clone(), v.clone()]),
                        _ => return Err("OrderedDict argument is not a list of pairs".into()),
                    }
                }
            }
            Ok(Value::Dict(seq(pairs)?))
        }
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor_v3") => {
            let a = items(&args).ok_or("tensor rebuild arguments are not a tuple")?;
            let v3 = name.ends_with("v3");
            if a.len() < if v3 { 7 } else { 4 } {
                return Err(format!("{name} needs more arguments than the {} given", a.len()));
            }
            let Value::Storage(storage) = &a[0] else {
                return Err(format!("{name}: first argument is a {}, not a storage", a[0].kind()));
            };
            let dtype = if v3 {
                match &a[6] {
                    Value::Global(d) if d.0 == "torch" => torch_dtype_from_name(&d.1),
                    other => return Err(format!("{name}: dtype argument is a {}", other.kind())),
                }
            } else {
                storage
                    .dtype
                    .clone()
                    .ok_or("_rebuild_tensor_v2 on an untyped storage")?
            };
            let size = ints(&a[2], "tensor size")?;
            let stride = ints(&a[3], "tensor stride")?;
            if size.len() != stride.len() {
                return Err(format!("tensor size {size:?} and stride {stride:?} differ in rank"));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: (**storage).clone(),
                dtype,
                offset: int(&a[1], "storage offset")?,
                size,
                stride,
            })))
        }
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            match items(&args).and_then(|a| a.first()) {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(format!("{name}: first argument is not a tensor")),
            }
        }
        _ => Ok(Value::Refused(g.clone())),
    }
}

fn persistent_load(pid: Value) -> Result<Value, String> {
    let a = items(&pid).ok_or("persistent id is not a tuple")?;
    match a {
        [Value::Str(tag), Value::Global(ty), Value::Str(key), _location, numel] if &**tag == "storage" => {
            if ty.0 != "torch" && ty.0 != "torch.storage" {
                return Err(format!("unknown storage type {}.{}", ty.0, ty.1));
            }
            Ok(Value::Storage(Rc::new(StorageRef {
                key: key.to_string(),
                dtype: torch_dtype_from_storage(&ty.1),
                numel: int(numel, "storage size")?,
            })))
        }
        _ => Err("persistent id is not a torch storage reference".into()),
    }
}

/// What [`tensors`] found: the tensors and the refused calls in their place.
pub(crate) struct Found {
    pub(crate) tensors: Vec<(String, TensorRef)>,
    /// `module.name` of every global call that was refused (not interpreted)
    /// where a tensor or dict could have been, in pickle order.
    pub(crate) refused: Vec<String>,
}

/// Every tensor reachable from `root` through dicts (keys joined with `.`),
/// in pickle order; other values are skipped.
pub(crate) fn tensors(root: &Value) -> Result<Found, String> {
    let mut found = Found {
        tensors: Vec::new(),
        refused: Vec::new(),
    };
    let mut visited = 0usize;
    walk(root, "", &mut found, &mut visited)?;
    Ok(found)
}

fn walk(v: &Value, prefix: &str, out: &mut Found, visited: &mut usize) -> Result<(), String> {
    *visited += 1;
    if *visited > MAX_COPIED {
        return Err("pickle holds too many values".into());
    }
    match v {
        Value::Tensor(t) => out.tensors.push((prefix.to_string(), (**t).clone())),
        Value::Refused(g) => {
            let name = format!("{}.{}", g.0, g.1);
            if !out.refused.contains(&name) {
                out.refused.push(name);
            }
        }
        Value::Dict(s) => {
            for kv in s.items.chunks_exact(2) {
                let k = match &kv[0] {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                walk(&kv[1], &key, out, visited)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_programs() {
        // {'a': 1, 'b': [True, None, 2.5]} at protocol 2.
        let p =
            b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00b]q\x01(\x88NG@\x04\x00\x00\x00\x00\x00\x00eu.";
        let v = load(p).unwrap();
        let Value::Dict(d) = v else { panic!("not a dict") };
        assert_eq!(d.items.len(), 4);
        assert!(matches!(&d.items[1], Value::Int(1)));
        let Value::List(l) = &d.items[3] else {
            panic!("not a list")
        };
        assert!(matches!(l.items[2], Value::Float(x) if x == 2.5));
        assert!(matches!(long_le(&[0xff]), Value::Int(-1)));
        assert!(matches!(long_le(&[0x00, 0x01]), Value::Int(256)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x80\x02",
            b"\x80\x02X\xff\xff\xff\xff",                    // string longer than the input
            b"\x80\x02\x8d\x00\x00\x00\x00\x00\x00\x00\x10", // 2^60-byte string
            b"\x80\x02t.",                                   // TUPLE without MARK
            b"\x80\x02h\x05.",                               // GET of an unknown memo key
            b"\x80\x02K\x01K\x02s.",                         // SETITEM on an int
            b"\x80\x02(\x85.",                               // TUPLE1 across a MARK
            b"\xff",
            b"\x80\x02N(Q.", // persistent id from nothing
            b"\x80\x02NQ.",  // persistent id that is not a tuple
        ];
        for c in cases {
            assert!(load(c).is_err(), "{c:?}");
        }
        // Deep nesting is refused instead of overflowing the stack on drop.
        let mut deep = b"\x80\x02N".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 100_000));
        deep.push(b'.');
        assert!(load(&deep).unwrap_err().contains("nested"));
        // Doubling through the memo shares values instead of copying them
        // (2^150 leaves would not fit in memory) and stops at the depth limit.
        let mut fan = b"\x80\x02]q\x00".to_vec();
        for _ in 0..150 {
            fan.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        fan.push(b'.');
        assert!(matches!(load(&fan).unwrap(), Value::Tuple(_)));
        fan.truncate(fan.len() - 1);
        for _ in 0..100 {
            fan.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        fan.push(b'.');
        assert!(load(&fan).unwrap_err().contains("nested"));
    }
}
