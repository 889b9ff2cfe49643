//! safetensors weights read by mmap, with every header validated before use.
//!
//! A [`Weights`] set covers one model component (possibly sharded over several files).
//! Model constructors ask for tensors by their diffusers key through a [`VarPath`], stating
//! the shape the config implies; what the model never asked for is reported by
//! [`Weights::check_all_used`], so a file that belongs to another architecture is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};

mod low_rank;

pub use low_rank::{LOW_RANK_DOWN, LOW_RANK_UP};

/// How a stored tensor becomes the tensor a model asks for (single-file checkpoints
/// store some weights in another layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// As stored.
    Identity,
    /// A matrix transposed (OpenCLIP's text_projection).
    Transpose,
    /// Part `index` of `count` equal parts along dimension 0 (a fused q/k/v projection).
    Chunk {
        /// Which part.
        index: i64,
        /// How many parts.
        count: i64,
    },
    /// Trailing size-1 dimensions dropped (1x1 convolutions stored for linear layers).
    DropUnitDims,
}

impl Transform {
    fn shape(self, raw: &[i64]) -> Vec<i64> {
        match self {
            Transform::Identity => raw.to_vec(),
            Transform::Transpose if raw.len() == 2 => vec![raw[1], raw[0]],
            Transform::Transpose => raw.to_vec(),
            Transform::Chunk { count, .. } => {
                let mut shape = raw.to_vec();
                if let Some(first) = shape.first_mut() {
                    *first /= count.max(1);
                }
                shape
            }
            Transform::DropUnitDims => {
                let mut shape = raw.to_vec();
                while shape.len() > 2 && shape.last() == Some(&1) {
                    shape.pop();
                }
                shape
            }
        }
    }

    fn apply(self, tensor: Tensor) -> Tensor {
        match self {
            Transform::Identity | Transform::DropUnitDims => tensor,
            Transform::Transpose => tensor.transpose(0, 1).contiguous(),
            Transform::Chunk { index, count } => {
                let part = tensor.size()[0] / count.max(1);
                tensor.narrow(0, index * part, part).contiguous()
            }
        }
    }
}

/// One tensor's place in a mapped file.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    /// The shape the model sees (after the transform).
    shape: Vec<i64>,
    /// The shape stored in the file.
    stored_shape: Vec<i64>,
    /// How the stored tensor becomes the model's.
    transform: Transform,
    /// The name in the file.
    stored_name: String,
    /// Byte range inside the mapped file (header included in the offset).
    start: usize,
    end: usize,
}

/// One mapped safetensors file.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

/// How a model's layers lay out their weights once loaded: choices for speed on a device,
/// each computing what the plain layout computes (up to rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WeightLayout {
    /// Convolution weights in channels-last order (NHWC in memory), so that convolutions
    /// take and give channels-last activations (the order tensor cores work in).
    pub channels_last: bool,
    /// Attention projections fused at load: self-attention's q, k and v as one linear
    /// layer, cross-attention's k and v as one (fewer, larger matrix products).
    pub fused_projections: bool,
}

/// The weights of one model component, mapped from one or more safetensors files, or
/// drawn at random (for the built-in demo model) and recorded for saving.
pub struct Weights {
    files: Vec<MappedFile>,
    entries: HashMap<String, TensorEntry>,
    used: Mutex<HashSet<String>>,
    device: Device,
    kind: Kind,
    layout: WeightLayout,
    /// Seed of the random mode, with what it drew.
    random: Option<(u64, Mutex<BTreeMap<String, Tensor>>)>,
}

/// Maps a safetensors file and parses its header: the mapping, the header's length and
/// the header.
fn mapped_header(path: &Path) -> Result<(Mmap, usize, safetensors::tensor::Metadata)> {
    let file = crate::engine::files::open_model_file(path)?;
    // SAFETY: read-only mapping of a model file that is not modified while served.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| EngineError::WeightFile {
            path: path.to_path_buf(),
            message: format!("not a valid safetensors file ({e})"),
        })?;
    Ok((mmap, header_len, metadata))
}

/// The tensor names and the `__metadata__` strings of a safetensors file (header only).
pub fn read_header(path: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    let (shapes, metadata) = read_shapes(path)?;
    Ok((shapes.into_iter().map(|(name, _)| name).collect(), metadata))
}

/// Tensor names with their shapes.
pub type Shapes = Vec<(String, Vec<i64>)>;

/// How many numbered children `prefix` has among `names` (`prefix0.`, `prefix1.`, ...: the
/// largest index present, plus one).
pub fn numbered_children<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> i64 {
    names
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// The tensor names with their shapes, in name order, and the `__metadata__` strings of
/// a safetensors file (header only).
pub fn read_shapes(path: &Path) -> Result<(Shapes, HashMap<String, String>)> {
    let (_, _, metadata) = mapped_header(path)?;
    let mut shapes: Shapes = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.iter().map(|&d| d as i64).collect()))
        .collect();
    shapes.sort();
    Ok((shapes, metadata.metadata().clone().unwrap_or_default()))
}

/// Every tensor of a safetensors file, floating-point ones converted to `kind`, on
/// `device`.
pub fn read_all(path: &Path, device: Device, kind: Kind) -> Result<HashMap<String, Tensor>> {
    let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
    let mut names: Vec<(String, Vec<i64>)> = weights
        .entries
        .iter()
        .map(|(k, e)| (k.clone(), e.shape.clone()))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), weights.load(&name, &shape)?)))
        .collect()
}

/// The one tensor `name` of a safetensors file, as float32 on the CPU (only its bytes
/// are read).
pub fn read_tensor(path: &Path, name: &str, shape: &[i64]) -> Result<Tensor> {
    let weights = Weights::open(&[path.to_path_buf()], Device::Cpu, Kind::Float)?;
    weights.load(name, shape)
}

/// Bytes the tensors of a safetensors file (those under `prefix`, when given) take once
/// loaded with floating-point tensors converted to `kind` (header only).
pub fn loaded_bytes(path: &Path, prefix: Option<&str>, kind: Kind) -> Result<u64> {
    loaded_bytes_of(
        path,
        |name| prefix.is_none_or(|p| name.starts_with(p)),
        kind,
    )
}

/// Bytes the tensors of a safetensors file whose names `keep` accepts take once loaded
/// with floating-point tensors converted to `kind` (header only).
pub fn loaded_bytes_of(path: &Path, keep: impl Fn(&str) -> bool, kind: Kind) -> Result<u64> {
    let (_, _, metadata) = mapped_header(path)?;
    let mut total = 0u64;
    for (name, info) in metadata.tensors() {
        if !keep(&name) {
            continue;
        }
        let count: u64 = info.shape.iter().map(|&d| d as u64).product();
        let size = match kind_of(info.dtype) {
            Some(k) if k.is_floating_point() => kind.elt_size_in_bytes() as u64,
            _ => (info.dtype.bitsize() / 8) as u64,
        };
        total += count * size;
    }
    Ok(total)
}

thread_local! {
    /// Tensors loaded while [`recording`] runs on this thread.
    static RECORDED: std::cell::RefCell<Option<Vec<Tensor>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `load` and returns, with its result, handles to every tensor it read from weight
/// files: the parameters of the module it built (moving them with `set_data` moves the
/// module).
pub fn recording<T>(load: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Tensor>)> {
    let outer = RECORDED.with(|r| r.borrow_mut().replace(Vec::new()));
    let result = load();
    let recorded = RECORDED.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer));
    Ok((result?, recorded.unwrap_or_default()))
}

/// splitmix64: a tiny deterministic generator, independent of libtorch's global one.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `count` standard normal values from `seed` (Box-Muller).
fn normal_values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed;
    let mut out = Vec::with_capacity(count + 1);
    while out.len() < count {
        let u1 = ((splitmix64(&mut state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(count);
    out
}

/// A stable 64-bit hash of a key (FNV-1a), so random weights do not depend on load order.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

impl Weights {
    /// Maps `paths` and validates their headers. Floating-point tensors are converted to
    /// `kind` and placed on `device` when the model asks for them.
    pub fn open(paths: &[PathBuf], device: Device, kind: Kind) -> Result<Self> {
        Self::open_renamed(paths, device, kind, &|name| {
            vec![(name.to_string(), Transform::Identity)]
        })
    }

    /// Maps `paths` and exposes each stored tensor under the names (and transforms)
    /// `rename` gives it; tensors it gives no name are not part of this set.
    pub fn open_renamed(
        paths: &[PathBuf],
        device: Device,
        kind: Kind,
        rename: &dyn Fn(&str) -> Vec<(String, Transform)>,
    ) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let (mmap, header_len, metadata) = mapped_header(path)?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                if name == "__metadata__" {
                    continue;
                }
                let (start, end) = info.data_offsets;
                let stored_shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
                for (key, transform) in rename(&name) {
                    entries.insert(
                        key,
                        TensorEntry {
                            file: index,
                            dtype: info.dtype,
                            shape: transform.shape(&stored_shape),
                            stored_shape: stored_shape.clone(),
                            transform,
                            stored_name: name.clone(),
                            start: data_start + start,
                            end: data_start + end,
                        },
                    );
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
            });
        }
        Ok(Self {
            files,
            entries,
            used: Mutex::new(HashSet::new()),
            device,
            kind,
            layout: WeightLayout::default(),
            random: None,
        })
    }

    /// Random float32 CPU weights, deterministic for `seed`: matrices scaled by
    /// 1/sqrt(fan-in), norm scales near 1, small biases. Every tensor drawn is recorded.
    pub fn random(seed: u64) -> Self {
        Self {
            files: Vec::new(),
            entries: HashMap::new(),
            used: Mutex::new(HashSet::new()),
            device: Device::Cpu,
            kind: Kind::Float,
            layout: WeightLayout::default(),
            random: Some((seed, Mutex::new(BTreeMap::new()))),
        }
    }

    /// The same weights, loaded into layers laid out as `layout` says.
    pub fn with_layout(mut self, layout: WeightLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The tensors drawn in random mode, by key.
    pub fn recorded(&self) -> BTreeMap<String, Tensor> {
        match &self.random {
            Some((_, recorded)) => recorded
                .lock()
                .map(|r| {
                    r.iter()
                        .map(|(k, v)| (k.clone(), v.shallow_clone()))
                        .collect()
                })
                .unwrap_or_default(),
            None => BTreeMap::new(),
        }
    }

    fn draw(&self, seed: u64, key: &str, shape: &[i64]) -> Result<Tensor> {
        let count: i64 = shape.iter().product();
        let values = normal_values(seed ^ key_hash(key), count.max(0) as usize);
        let noise = Tensor::from_slice(&values).reshape(shape);
        let tensor = if shape.len() == 1 && key.ends_with("weight") {
            noise * 0.05 + 1.0
        } else if shape.len() == 1 {
            noise * 0.02
        } else {
            let fan_in: i64 = shape[1..].iter().product();
            noise / (fan_in.max(1) as f64).sqrt()
        };
        if let Some((_, recorded)) = &self.random {
            if let Ok(mut recorded) = recorded.lock() {
                recorded.insert(key.to_string(), tensor.shallow_clone());
            }
        }
        Ok(tensor)
    }

    /// Opens a diffusers component folder's weights: `<stem>.safetensors`, or the shards
    /// listed in `<stem>.safetensors.index.json`.
    pub fn open_component(dir: &Path, stem: &str, device: Device, kind: Kind) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        if single.exists() {
            return Self::open(&[single], device, kind);
        }
        let index_path = dir.join(format!("{stem}.safetensors.index.json"));
        if index_path.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let index: Index = crate::engine::files::read_json(&index_path)?;
            let mut shards: Vec<String> = index.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            let mut paths = Vec::new();
            for shard in shards {
                if shard.contains('/') || shard.contains("..") {
                    return Err(EngineError::WeightFile {
                        path: index_path,
                        message: format!("shard name `{shard}` leaves the folder"),
                    });
                }
                paths.push(dir.join(shard));
            }
            return Self::open(&paths, device, kind);
        }
        if dir.join(format!("{stem}.bin")).exists() {
            return Err(EngineError::WeightFile {
                path: dir.join(format!("{stem}.bin")),
                message: "pickle weights are not loaded; convert them to safetensors".into(),
            });
        }
        Err(EngineError::Io {
            path: single,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        })
    }

    /// The root of the key space.
    pub fn root(&self) -> VarPath<'_> {
        VarPath {
            weights: self,
            prefix: String::new(),
        }
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The floating-point kind tensors are converted to.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn first_path(&self) -> PathBuf {
        self.files
            .first()
            .map(|f| f.path.clone())
            .unwrap_or_default()
    }

    /// Whether a tensor with this full key exists.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Loads the tensor `key`, checking its shape; a low-rank difference laid over it
    /// (see [`Weights::overlay`]) is added in float32.
    fn load(&self, key: &str, shape: &[i64]) -> Result<Tensor> {
        if let Some((seed, _)) = &self.random {
            return self.draw(*seed, key, shape);
        }
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.first_path(),
                name: key.to_string(),
            })?;
        if entry.shape != shape {
            return Err(EngineError::ShapeMismatch {
                path: self.files[entry.file].path.clone(),
                name: entry.stored_name.clone(),
                expected: shape.to_vec(),
                actual: entry.shape.clone(),
            });
        }
        let tensor = self.read(key, entry)?;
        let stored = tensor.kind();
        let tensor = match self.low_rank_delta(key, shape)? {
            Some(delta) => tensor.f_to_kind(Kind::Float)?.f_add(&delta)?,
            None => tensor,
        };
        let target = if stored.is_floating_point() {
            self.kind
        } else {
            stored
        };
        let tensor = tensor.f_to_kind(target)?;
        RECORDED.with(|r| {
            if let Some(recorded) = r.borrow_mut().as_mut() {
                recorded.push(tensor.shallow_clone());
            }
        });
        Ok(tensor)
    }

    /// The stored tensor `key` (its entry `entry`) on the device, in its stored kind,
    /// marked as used.
    fn read(&self, key: &str, entry: &TensorEntry) -> Result<Tensor> {
        let path = &self.files[entry.file].path;
        let kind = kind_of(entry.dtype).ok_or_else(|| EngineError::WeightFile {
            path: path.clone(),
            message: format!("tensor `{key}` has unsupported dtype {:?}", entry.dtype),
        })?;
        let mapped = &self.files[entry.file].mmap;
        let tensor =
            Tensor::f_from_data_size(&mapped[entry.start..entry.end], &entry.stored_shape, kind)?;
        // The tensor owns a copy now: drop the mapped pages from this process (they stay in
        // the page cache), so that loading holds about one copy of the weights, not two.
        // SAFETY: the mapping is private and read-only; a dropped page is read again from
        // the file if it is touched later.
        let _ = unsafe {
            mapped.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                entry.start,
                entry.end - entry.start,
            )
        };
        let tensor = entry.transform.apply(tensor).f_reshape(&entry.shape)?;
        let tensor = tensor.f_to_device(self.device)?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(key.to_string());
        }
        Ok(tensor)
    }

    /// Fails on the first tensor (in name order) that no module asked for, ignoring
    /// keys accepted by `ignore`.
    pub fn check_all_used(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let mut unused: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !used.contains(*k) && !ignore(k))
            .collect();
        unused.sort();
        if let Some(name) = unused.first() {
            let entry = &self.entries[*name];
            return Err(EngineError::UnknownTensor {
                path: self.files[entry.file].path.clone(),
                name: entry.stored_name.clone(),
            });
        }
        Ok(())
    }
}

trait KindExt {
    fn is_floating_point(&self) -> bool;
}

impl KindExt for Kind {
    fn is_floating_point(&self) -> bool {
        matches!(
            self,
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        )
    }
}

/// A position in the weight key space, such as `down_blocks.1.attentions.0`.
#[derive(Clone)]
pub struct VarPath<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> VarPath<'a> {
    /// The child path `self.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> VarPath<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        VarPath {
            weights: self.weights,
            prefix,
        }
    }

    /// The key of this position (`down_blocks.1.attentions.0`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Loads `self.name` with the given shape.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.weights.load(&self.key(name), shape)
    }

    /// Whether `self.name` exists in the weights.
    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.key(name))
    }

    /// The shape `self.name` is loaded in, where the weights hold it.
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        let entry = self.weights.entries.get(&self.key(name))?;
        Some(entry.shape.clone())
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> Device {
        self.weights.device
    }

    /// The floating-point kind of the weights.
    pub fn kind(&self) -> Kind {
        self.weights.kind
    }

    /// How the layers lay out their weights.
    pub fn layout(&self) -> WeightLayout {
        self.weights.layout
    }
}
