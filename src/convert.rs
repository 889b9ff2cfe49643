//! `sdxld convert`: pickle-based PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`, the
//! zip format torch.save writes) to safetensors, offline. This is the only code that reads
//! pickle, and it executes nothing: a small pickle machine builds plain values, knows
//! the few constructors torch.save uses for tensors (`_rebuild_tensor_v2`,
//! `_rebuild_parameter`, `OrderedDict`) and keeps every other object opaque.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};

/// A pickled value.
#[derive(Debug, Clone)]
enum Value {
    None,
    /// A scalar or byte string this reader has no use for (booleans, floats, bytes).
    Scalar,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A class or function named by a GLOBAL (never called).
    Global(String),
    /// A storage of the archive: its element kind and its record name.
    Storage(Kind, String),
    /// A tensor view of a storage.
    Tensor(TensorRef),
    /// An object this reader does not interpret.
    Opaque,
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    storage: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn bad(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::WeightFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name.rsplit('.').next()? {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn ints(value: &Value) -> Option<Vec<i64>> {
    match value {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Applies a callable to its arguments, for the constructors torch.save uses.
fn reduce(callable: Value, args: Value) -> Value {
    let Value::Global(name) = &callable else {
        return Value::Opaque;
    };
    let args = match args {
        Value::Tuple(args) => args,
        other => vec![other],
    };
    match name.as_str() {
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            match (
                args.first(),
                args.get(1),
                args.get(2).and_then(ints),
                args.get(3).and_then(ints),
            ) {
                (
                    Some(Value::Storage(kind, key)),
                    Some(Value::Int(offset)),
                    Some(size),
                    Some(stride),
                ) => Value::Tensor(TensorRef {
                    kind: *kind,
                    storage: key.clone(),
                    offset: *offset,
                    size,
                    stride,
                }),
                _ => Value::Opaque,
            }
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            args.into_iter().next().unwrap_or(Value::None)
        }
        "collections.OrderedDict" => Value::Dict(Vec::new()),
        _ => Value::Opaque,
    }
}

/// Runs the pickle program `data`; returns the value STOP leaves.
fn unpickle(data: &[u8], path: &Path) -> Result<Value> {
    Machine {
        data,
        path,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

/// The pickle machine: a stack, a memo and the program.
struct Machine<'a> {
    data: &'a [u8],
    path: &'a Path,
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn truncated(&self) -> EngineError {
        bad(self.path, "the pickle is truncated")
    }

    /// The next `n` bytes of the program.
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data = self.data;
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= data.len())
            .ok_or_else(|| self.truncated())?;
        let bytes = &data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn take_u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn take_u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| bad(self.path, "pickle stack underflow"))
    }

    /// The items above the topmost MARK, which goes too.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| bad(self.path, "pickle MARK missing"))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.take_u8()?;
            if op == b'.' {
                return self.pop();
            }
            let known =
                self.literal(op)? || self.collection(op)? || self.object(op)? || self.memo(op)?;
            if !known {
                let at = self.pos - 1;
                return Err(bad(
                    self.path,
                    format!("unsupported pickle opcode 0x{op:02x} at byte {at}"),
                ));
            }
        }
    }

    /// Framing, marks, constants, numbers and strings.
    fn literal(&mut self, op: u8) -> Result<bool> {
        let value = match op {
            0x80 => return self.take(1).map(|_| true),
            0x95 => return self.take(8).map(|_| true),
            b'(' => Value::Mark,
            b'N' => Value::None,
            0x88 | 0x89 => Value::Scalar,
            b'K' => Value::Int(i64::from(self.take_u8()?)),
            b'M' => {
                let b = self.take(2)?;
                Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]])))
            }
            b'J' => Value::Int(i64::from(self.take_u32()? as i32)),
            0x8a => {
                let n = usize::from(self.take_u8()?);
                let b = self.take(n)?;
                if n > 8 {
                    return Err(bad(self.path, "pickle integer wider than 64 bits"));
                }
                let sign = if b.last().is_some_and(|x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut bytes = [sign; 8];
                bytes[..n].copy_from_slice(b);
                Value::Int(i64::from_le_bytes(bytes))
            }
            b'G' => {
                self.take(8)?;
                Value::Scalar
            }
            b'X' | 0x8c | b'U' | b'T' | b'B' | b'C' => {
                let n = match op {
                    b'X' | b'T' | b'B' => self.take_u32()? as usize,
                    _ => usize::from(self.take_u8()?),
                };
                let bytes = self.take(n)?;
                match op {
                    b'B' | b'C' => Value::Scalar,
                    _ => Value::Str(String::from_utf8_lossy(bytes).into_owned()),
                }
            }
            _ => return Ok(false),
        };
        self.stack.push(value);
        Ok(true)
    }

    /// Tuples, lists and dicts.
    fn collection(&mut self, op: u8) -> Result<bool> {
        match op {
            b'}' => self.stack.push(Value::Dict(Vec::new())),
            b']' => self.stack.push(Value::List(Vec::new())),
            b')' => self.stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if self.stack.len() < n {
                    return Err(bad(self.path, "pickle stack underflow"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items));
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    vec![k, v]
                } else {
                    self.pop_mark()?
                };
                if let Some(Value::Dict(entries)) = self.stack.last_mut() {
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        entries.push((k, v));
                    }
                }
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![self.pop()?]
                } else {
                    self.pop_mark()?
                };
                if let Some(Value::List(list)) = self.stack.last_mut() {
                    list.extend(items);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Globals, calls of the few constructors torch.save uses, object state and
    /// persistent ids (storages).
    fn object(&mut self, op: u8) -> Result<bool> {
        match op {
            b'c' => {
                let rest = &self.data[self.pos..];
                let mut lines = rest.splitn(3, |b| *b == b'\n');
                let module = lines.next().ok_or_else(|| self.truncated())?;
                let name = lines.next().ok_or_else(|| self.truncated())?;
                self.pos += module.len() + name.len() + 2;
                self.stack.push(Value::Global(format!(
                    "{}.{}",
                    String::from_utf8_lossy(module),
                    String::from_utf8_lossy(name)
                )));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => {
                        self.stack.push(Value::Global(format!("{m}.{n}")))
                    }
                    _ => return Err(bad(self.path, "pickle STACK_GLOBAL without names")),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.stack.push(reduce(callable, args));
            }
            b'b' => {
                // BUILD sets an object's state: nothing of it is needed here.
                self.pop()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                self.stack.push(persistent(&pid));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The memo.
    fn memo(&mut self, op: u8) -> Result<bool> {
        let key = match op {
            b'q' | b'h' => u32::from(self.take_u8()?),
            b'r' | b'j' => self.take_u32()?,
            0x94 => self.memo.len() as u32,
            _ => return Ok(false),
        };
        if matches!(op, b'h' | b'j') {
            let value = self
                .memo
                .get(&key)
                .cloned()
                .ok_or_else(|| bad(self.path, "pickle memo key missing"))?;
            self.stack.push(value);
        } else {
            let top = self.stack.last().cloned().ok_or_else(|| self.truncated())?;
            self.memo.insert(key, top);
        }
        Ok(true)
    }
}

/// A persistent id: torch.save's `("storage", kind, key, ...)` tuples name storages.
fn persistent(pid: &Value) -> Value {
    let Value::Tuple(t) = pid else {
        return Value::Opaque;
    };
    match (t.first(), t.get(1), t.get(2)) {
        (Some(Value::Str(tag)), Some(Value::Global(kind)), Some(Value::Str(key)))
            if tag == "storage" =>
        {
            storage_kind(kind).map_or(Value::Opaque, |k| Value::Storage(k, key.clone()))
        }
        _ => Value::Opaque,
    }
}

/// The tensors of a checkpoint's state dict, by name: a top-level `state_dict` entry
/// when there is one (Lightning checkpoints), else every tensor under the top-level
/// dict, nested names joined with dots.
fn collect(value: &Value, prefix: &str, out: &mut BTreeMap<String, TensorRef>) {
    match value {
        Value::Tensor(t) => {
            out.insert(prefix.to_string(), t.clone());
        }
        Value::Dict(entries) => {
            for (k, v) in entries {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                collect(v, &name, out);
            }
        }
        _ => {}
    }
}

/// Converts the PyTorch checkpoint `input` to the safetensors file `output`; returns the
/// number of tensors written.
pub fn convert(input: &Path, output: &Path) -> Result<usize> {
    let file = crate::engine::files::open_model_file(input)?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        bad(
            input,
            format!("not a torch.save zip archive ({e}); re-save it with PyTorch 1.6 or newer"),
        )
    })?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let pickle_name = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
        .cloned()
        .ok_or_else(|| bad(input, "the archive has no data.pkl"))?;
    let base = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut read = |name: &str| -> Result<Vec<u8>> {
        let mut entry = archive
            .by_name(name)
            .map_err(|e| bad(input, format!("`{name}`: {e}")))?;
        // The declared size is the archive's word, not a promise: reserve at most 64 MiB.
        let mut bytes = Vec::with_capacity(entry.size().min(64 << 20) as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(input, format!("`{name}`: {e}")))?;
        Ok(bytes)
    };
    let root = unpickle(&read(&pickle_name)?, input)?;
    let state = match &root {
        Value::Dict(entries) => entries
            .iter()
            .find(|(k, v)| {
                matches!(k, Value::Str(s) if s == "state_dict") && matches!(v, Value::Dict(_))
            })
            .map(|(_, v)| v.clone())
            .unwrap_or(root.clone()),
        _ => root.clone(),
    };
    let mut refs = BTreeMap::new();
    collect(&state, "", &mut refs);
    if refs.is_empty() {
        return Err(bad(input, "the checkpoint holds no tensors"));
    }
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut tensors = BTreeMap::new();
    for (name, r) in refs {
        if !storages.contains_key(&r.storage) {
            let bytes = read(&format!("{base}data/{}", r.storage))?;
            let count = (bytes.len() / r.kind.elt_size_in_bytes()) as i64;
            let storage = Tensor::f_from_data_size(&bytes, &[count], r.kind)?;
            storages.insert(r.storage.clone(), storage);
        }
        let storage = &storages[&r.storage];
        let tensor = storage
            .f_as_strided(&r.size, &r.stride, Some(r.offset))
            .and_then(|t| t.f_contiguous())
            .map_err(|e| bad(input, format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, tensor);
    }
    let count = tensors.len();
    write_safetensors(output, &tensors)?;
    Ok(count)
}

fn dtype_of(kind: Kind) -> Option<safetensors::Dtype> {
    use safetensors::Dtype;
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Writes `tensors` (contiguous, on the CPU) keeping their dtypes.
fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let kind = tensor.kind();
        let dtype = dtype_of(kind).ok_or_else(|| {
            bad(
                path,
                format!("tensor `{name}` has unsupported kind {kind:?}"),
            )
        })?;
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(path, e.to_string()))?;
    safetensors::tensor::serialize_to_file(views, None, path).map_err(|e| bad(path, e.to_string()))
}
