//! LoRA adapter files, read into one form whatever their layout:
//!
//! - kohya-ss: `lora_unet_<module>`, `lora_te1_<module>` (or `lora_te_`), `lora_te2_<module>`,
//!   each with `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`; module names
//!   are flattened (dots as underscores), SDXL UNet names in the sgm layout kohya trains on
//!   (`input_blocks_4_1_...`); 3x3 convolutions as LoCon pairs.
//! - diffusers/PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.…`,
//!   `text_encoder_2.…`; alphas from the `lora_adapter_metadata` diffusers writes, or from
//!   `.alpha` tensors, or none (scale 1).
//!
//! Which layer a module name means is decided against a model (see `engine::lora`); this
//! module reads names, shapes, scales and tensors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::weights::{read_all, read_shapes};

/// The layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya-ss (`lora_unet_*`, `lora_down` / `lora_up` / `alpha`).
    Kohya,
    /// diffusers/PEFT (`unet.*.lora_A` / `lora_B`).
    Peft,
}

/// The model component an adapter module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    /// The UNet.
    Unet,
    /// The first text encoder (CLIP ViT-L).
    TextEncoder,
    /// The second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
}

impl LoraTarget {
    /// How requests and listings name it.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How a file names the module an adapter pair applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModuleName {
    /// A module key, as PEFT writes it (`down_blocks.1.attentions.0.proj_in`).
    Key(String),
    /// kohya-ss's flattened name (`input_blocks_4_1_proj_in`, `down_blocks_1_attentions_0_proj_in`).
    Flat(String),
}

/// One adapted module as the file describes it.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The component.
    pub target: LoraTarget,
    /// The module, as named in the file.
    pub module: ModuleName,
    /// The name of its down (A) matrix in the file: how errors name it.
    pub down_key: String,
    up_key: String,
    alpha_key: Option<String>,
    /// Shape of the down matrix ([rank, in] or [rank, in, k, k]).
    pub down_shape: Vec<i64>,
    /// Shape of the up matrix ([out, rank] or [out, rank, 1, 1]).
    pub up_shape: Vec<i64>,
    /// alpha from the file's metadata (PEFT).
    metadata_alpha: Option<f64>,
    /// rsLoRA scaling (alpha / sqrt(rank)).
    rank_stabilized: bool,
}

impl LoraModule {
    /// The rank.
    pub fn rank(&self) -> i64 {
        self.down_shape.first().copied().unwrap_or(0)
    }
}

/// The modules of a LoRA file (read from its header only).
#[derive(Debug, Clone)]
pub struct LoraLayout {
    /// Its layout.
    pub format: LoraFormat,
    /// Its modules, in the order of their names.
    pub modules: Vec<LoraModule>,
    /// Its alias, where its metadata has one.
    pub alias: Option<String>,
}

/// The metadata key of a LoRA's alias (kohya-ss's output name, which A1111 prompts use).
const ALIAS_KEY: &str = "ss_output_name";

/// What identifies a version of a file: its size and modification time.
type Stamp = (u64, Option<std::time::SystemTime>);

/// Aliases by file, with the version each was read from.
type KnownAliases = HashMap<PathBuf, (Stamp, Option<String>)>;

/// The aliases read, by file, with the version of the file each was read from: a tag
/// naming a LoRA by its alias looks through every LoRA under the roots, and reads each
/// header once per version of its file rather than once per request.
fn known_aliases() -> MutexGuard<'static, KnownAliases> {
    static KNOWN: OnceLock<Mutex<KnownAliases>> = OnceLock::new();
    let known = KNOWN.get_or_init(Mutex::default);
    // A panic while the map was held leaves it whole (each entry is one insert).
    known.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The alias of the LoRA file at `path`, where its metadata has one (its header read
/// once per version of the file).
pub fn alias_of(path: &Path) -> Option<String> {
    let file = std::fs::metadata(path).ok()?;
    let stamp = (file.len(), file.modified().ok());
    if let Some((known, alias)) = known_aliases().get(path) {
        if *known == stamp {
            return alias.clone();
        }
    }
    let alias = crate::engine::weights::read_header(path)
        .ok()
        .and_then(|(_, metadata)| metadata.get(ALIAS_KEY).cloned());
    known_aliases().insert(path.to_path_buf(), (stamp, alias.clone()));
    alias
}

fn lora_error(lora: &str, key: &str, message: impl Into<String>) -> EngineError {
    EngineError::Lora {
        lora: lora.to_string(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// What a tensor of a LoRA pair is.
enum Part {
    Down,
    Up,
    Alpha,
}

/// Pairs under construction, by (target, module).
#[derive(Default)]
struct Pairs {
    modules: BTreeMap<(LoraTarget, String), PairBuilder>,
}

#[derive(Default)]
struct PairBuilder {
    down: Option<(String, Vec<i64>)>,
    up: Option<(String, Vec<i64>)>,
    alpha: Option<String>,
}

impl Pairs {
    fn add(&mut self, target: LoraTarget, module: &str, part: Part, key: &str, shape: &[i64]) {
        let pair = self
            .modules
            .entry((target, module.to_string()))
            .or_default();
        let entry = Some((key.to_string(), shape.to_vec()));
        match part {
            Part::Down => pair.down = entry,
            Part::Up => pair.up = entry,
            Part::Alpha => pair.alpha = Some(key.to_string()),
        }
    }
}

/// What the diffusers metadata says about one component's alphas.
#[derive(Debug, Default)]
struct AlphaConfig {
    alpha: Option<f64>,
    patterns: Vec<(String, f64)>,
    rank_stabilized: bool,
    dora: bool,
}

impl AlphaConfig {
    /// PEFT's rule: an alpha_pattern key matches a module name that ends with it.
    fn alpha_for(&self, module: &str) -> Option<f64> {
        self.patterns
            .iter()
            .find(|(pattern, _)| module == pattern || module.ends_with(&format!(".{pattern}")))
            .map(|(_, a)| *a)
            .or(self.alpha)
    }
}

/// The per-component alpha settings in diffusers' `lora_adapter_metadata` (keys such as
/// `unet.lora_alpha`, `text_encoder.alpha_pattern`).
fn metadata_alphas(
    lora: &str,
    metadata: &HashMap<String, String>,
) -> Result<HashMap<LoraTarget, AlphaConfig>> {
    let mut out: HashMap<LoraTarget, AlphaConfig> = HashMap::new();
    let Some(raw) = metadata.get("lora_adapter_metadata") else {
        return Ok(out);
    };
    let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| {
        lora_error(
            lora,
            "__metadata__.lora_adapter_metadata",
            format!("is not JSON ({e})"),
        )
    })?;
    let Some(entries) = value.as_object() else {
        return Ok(out);
    };
    for (key, value) in entries {
        let Some((prefix, field)) = key.rsplit_once('.') else {
            continue;
        };
        let target = match prefix {
            "unet" => LoraTarget::Unet,
            "text_encoder" => LoraTarget::TextEncoder,
            "text_encoder_2" => LoraTarget::TextEncoder2,
            _ => continue,
        };
        let config = out.entry(target).or_default();
        match field {
            "lora_alpha" => config.alpha = value.as_f64(),
            "alpha_pattern" => {
                if let Some(patterns) = value.as_object() {
                    config.patterns = patterns
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                        .collect();
                }
            }
            "use_rslora" => config.rank_stabilized = value.as_bool().unwrap_or(false),
            "use_dora" => config.dora = value.as_bool().unwrap_or(false),
            _ => {}
        }
    }
    Ok(out)
}

/// Splits a kohya-ss tensor name into its target, flattened module name and part.
fn kohya_name(name: &str) -> Option<(LoraTarget, &str, Option<Part>)> {
    let (module, suffix) = name.split_once('.')?;
    let (target, rest) = [
        ("lora_unet_", LoraTarget::Unet),
        ("lora_te1_", LoraTarget::TextEncoder),
        ("lora_te2_", LoraTarget::TextEncoder2),
        ("lora_te_", LoraTarget::TextEncoder),
    ]
    .iter()
    .find_map(|(prefix, target)| module.strip_prefix(prefix).map(|rest| (*target, rest)))?;
    let part = match suffix {
        "lora_down.weight" => Some(Part::Down),
        "lora_up.weight" => Some(Part::Up),
        "alpha" => Some(Part::Alpha),
        _ => None,
    };
    Some((target, rest, part))
}

/// Splits a PEFT tensor name into its target, module key and part.
fn peft_name(name: &str) -> Option<(LoraTarget, &str, Option<Part>)> {
    let (target, rest) = [
        ("unet.", LoraTarget::Unet),
        ("text_encoder_2.", LoraTarget::TextEncoder2),
        ("text_encoder.", LoraTarget::TextEncoder),
    ]
    .iter()
    .find_map(|(prefix, target)| name.strip_prefix(prefix).map(|rest| (*target, rest)))?;
    for (suffix, part) in [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".alpha", Part::Alpha),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((target, module, Some(part)));
        }
    }
    let module = rest.split(".lora_").next().unwrap_or(rest);
    Some((target, module, None))
}

impl LoraLayout {
    /// Reads the header of the LoRA file at `path` (named `lora` in errors).
    pub fn read(path: &Path, lora: &str) -> Result<Self> {
        let (shapes, metadata) = read_shapes(path)?;
        let Some((first, _)) = shapes.first() else {
            return Err(lora_error(lora, "", "holds no tensors"));
        };
        let format = if kohya_name(first).is_some() {
            LoraFormat::Kohya
        } else if peft_name(first).is_some() {
            LoraFormat::Peft
        } else {
            return Err(lora_error(
                lora,
                first,
                "is neither a kohya-ss (lora_unet_*, lora_te1_*, lora_te2_*) nor a diffusers/PEFT (unet.*, text_encoder.*, text_encoder_2.*) LoRA",
            ));
        };
        let alphas = metadata_alphas(lora, &metadata)?;
        let mut pairs = Pairs::default();
        for (name, shape) in &shapes {
            let parsed = match format {
                LoraFormat::Kohya => kohya_name(name),
                LoraFormat::Peft => peft_name(name),
            };
            let Some((target, module, part)) = parsed else {
                return Err(lora_error(
                    lora,
                    name,
                    format!(
                        "does not follow the {} layout of the file's other tensors",
                        format_name(format)
                    ),
                ));
            };
            let Some(part) = part else {
                return Err(lora_error(
                    lora,
                    name,
                    "is not a low-rank pair or an alpha (LyCORIS variants such as LoHa, LoKr, DoRA and Tucker mid layers are not supported)",
                ));
            };
            pairs.add(target, module, part, name, shape);
        }
        let mut modules = Vec::with_capacity(pairs.modules.len());
        for ((target, module), pair) in pairs.modules {
            let config = alphas.get(&target);
            if config.is_some_and(|c| c.dora) {
                return Err(lora_error(
                    lora,
                    "__metadata__.lora_adapter_metadata",
                    "is a DoRA adapter, which is not supported",
                ));
            }
            let (Some((down_key, down_shape)), Some((up_key, up_shape))) = (pair.down, pair.up)
            else {
                let key = pair.alpha.unwrap_or(module);
                return Err(lora_error(
                    lora,
                    &key,
                    "has no matching down/up (A/B) matrix",
                ));
            };
            let rank = down_shape.first().copied().unwrap_or(0);
            let pair_fits = rank > 0
                && matches!(down_shape.len(), 2 | 4)
                && up_shape.len() == down_shape.len()
                && up_shape[1] == rank
                && up_shape[2..].iter().all(|&d| d == 1);
            if !pair_fits {
                return Err(lora_error(
                    lora,
                    &down_key,
                    format!("down {down_shape:?} and up {up_shape:?} are not a low-rank pair"),
                ));
            }
            let name = match format {
                LoraFormat::Kohya => ModuleName::Flat(module.clone()),
                LoraFormat::Peft => ModuleName::Key(module.clone()),
            };
            modules.push(LoraModule {
                target,
                metadata_alpha: config.and_then(|c| c.alpha_for(&module)),
                rank_stabilized: config.is_some_and(|c| c.rank_stabilized),
                module: name,
                down_key,
                up_key,
                alpha_key: pair.alpha,
                down_shape,
                up_shape,
            });
        }
        Ok(Self {
            format,
            modules,
            alias: metadata.get(ALIAS_KEY).cloned(),
        })
    }

    /// The largest rank of its modules.
    pub fn rank(&self) -> i64 {
        self.modules.iter().map(LoraModule::rank).max().unwrap_or(0)
    }

    /// The components it adapts.
    pub fn targets(&self) -> BTreeSet<LoraTarget> {
        self.modules.iter().map(|m| m.target).collect()
    }
}

fn format_name(format: LoraFormat) -> &'static str {
    match format {
        LoraFormat::Kohya => "kohya-ss",
        LoraFormat::Peft => "diffusers/PEFT",
    }
}

/// One adapted module with its matrices.
#[derive(Debug)]
pub struct LoraPair {
    /// What the file says about it.
    pub module: LoraModule,
    /// The down (A) matrix.
    pub down: Tensor,
    /// The up (B) matrix.
    pub up: Tensor,
    /// The up matrix as a batch of one [1, out, rank] (a view).
    pub up_bmm: Tensor,
    /// The down matrix as a batch of one [1, rank, in·k·k] (a view).
    pub down_bmm: Tensor,
    /// Its scale at weight 1: alpha / rank (alpha / sqrt(rank) for rsLoRA), 1 without an
    /// alpha.
    pub scale: f64,
}

/// A LoRA file loaded at a placement.
#[derive(Debug)]
pub struct LoraWeights {
    /// Its layout.
    pub format: LoraFormat,
    /// Its modules.
    pub pairs: Vec<LoraPair>,
    /// Bytes its matrices take.
    pub bytes: u64,
}

impl LoraWeights {
    /// Loads the LoRA file at `path` (named `lora` in errors) with its matrices on
    /// `device` in `kind`.
    pub fn load(path: &Path, lora: &str, device: Device, kind: Kind) -> Result<Self> {
        let layout = LoraLayout::read(path, lora)?;
        // Alphas are read in float32 on the host, whatever the placement's precision.
        let mut tensors = read_all(path, Device::Cpu, Kind::Float)?;
        let mut take = |key: &str| {
            tensors
                .remove(key)
                .ok_or_else(|| lora_error(lora, key, "is listed but cannot be read"))
        };
        let mut pairs = Vec::with_capacity(layout.modules.len());
        let mut bytes = 0u64;
        for module in layout.modules {
            let down = take(&module.down_key)?
                .f_to_device(device)?
                .f_to_kind(kind)?;
            let up = take(&module.up_key)?.f_to_device(device)?.f_to_kind(kind)?;
            let file_alpha = match &module.alpha_key {
                Some(key) => Some(take(key)?.f_reshape([-1])?.f_double_value(&[0])?),
                None => None,
            };
            let rank = module.rank() as f64;
            let scale = match module.metadata_alpha.or(file_alpha) {
                Some(alpha) if module.rank_stabilized => alpha / rank.sqrt(),
                Some(alpha) => alpha / rank,
                None => 1.0,
            };
            if !scale.is_finite() {
                return Err(lora_error(lora, &module.down_key, "has a non-finite alpha"));
            }
            bytes += ((down.numel() + up.numel()) * kind.elt_size_in_bytes()) as u64;
            let rank = module.rank();
            pairs.push(LoraPair {
                up_bmm: up.f_reshape([1, module.up_shape[0], rank])?,
                down_bmm: down.f_reshape([1, rank, -1])?,
                module,
                down,
                up,
                scale,
            });
        }
        Ok(Self {
            format: layout.format,
            pairs,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_and_peft_names_split_into_target_module_and_part() {
        let (t, m, p) = kohya_name("lora_te2_encoder_layers_0_mlp_fc1.lora_up.weight").unwrap();
        assert_eq!(
            (t, m),
            (LoraTarget::TextEncoder2, "encoder_layers_0_mlp_fc1")
        );
        assert!(matches!(p, Some(Part::Up)));
        let (t, m, p) = kohya_name("lora_te_text_model_x.alpha").unwrap();
        assert_eq!((t, m), (LoraTarget::TextEncoder, "text_model_x"));
        assert!(matches!(p, Some(Part::Alpha)));
        assert!(matches!(
            kohya_name("lora_unet_a.dora_scale"),
            Some((_, _, None))
        ));
        let (t, m, p) =
            peft_name("text_encoder_2.encoder.layers.1.self_attn.q_proj.lora_A.weight").unwrap();
        assert_eq!(
            (t, m),
            (
                LoraTarget::TextEncoder2,
                "encoder.layers.1.self_attn.q_proj"
            )
        );
        assert!(matches!(p, Some(Part::Down)));
        assert!(peft_name("base_model.model.x.lora_A.weight").is_none());
    }

    /// A safetensors file of no tensors whose metadata names `alias`.
    fn write_aliased(path: &Path, alias: &str) {
        let header = format!(r#"{{"__metadata__":{{"{ALIAS_KEY}":"{alias}"}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn aliases_are_read_once_per_version_of_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("style.safetensors");
        write_aliased(&path, "first");
        assert_eq!(alias_of(&path).as_deref(), Some("first"));
        // The same size and modification time: the file is taken as unchanged.
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");
        write_aliased(&path, "other");
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_modified(modified).expect("set mtime");
        assert_eq!(alias_of(&path).as_deref(), Some("first"));
        // Another version is read again.
        write_aliased(&path, "renamed");
        assert_eq!(alias_of(&path).as_deref(), Some("renamed"));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(alias_of(&path), None);
    }

    #[test]
    fn alpha_patterns_match_whole_trailing_module_names() {
        let config = AlphaConfig {
            alpha: Some(8.0),
            patterns: vec![("attn1.to_q".into(), 2.0)],
            ..AlphaConfig::default()
        };
        assert_eq!(
            config.alpha_for("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            Some(2.0)
        );
        assert_eq!(config.alpha_for("x.xattn1.to_q"), Some(8.0));
    }
}
