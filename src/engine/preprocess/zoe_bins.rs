//! ZoeDepth's metric bins, as transformers' ZoeDepth metric heads compute them: bin
//! centres regressed from the bottleneck, moved by attractors at each fused level
//! (normed centres bounded to the bin configuration's depths, or unbounded softplus
//! ones), and per pixel a log-binomial distribution over the bins at a learned
//! temperature; the depth is the expectation of the centres. A model with several bin
//! configurations (Intel/zoedepth-nyu-kitti) picks one per batch by its patch
//! transformer's domain vote.

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::{multi_head_attention, Conv2d, LayerNorm, Linear};
use crate::engine::preprocess::efficientnet::{shape_of, ShapeMap};
use crate::engine::weights::VarPath;

/// One of `bin_configurations`.
#[derive(Debug, Clone, Deserialize)]
pub struct BinConfiguration {
    #[serde(default)]
    name: Option<String>,
    n_bins: i64,
    min_depth: f64,
    max_depth: f64,
}

/// The ZoeDepthConfig values the metric head reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BinsConfig {
    bin_centers_type: String,
    attractor_kind: String,
    min_temp: f64,
    max_temp: f64,
    bin_configurations: Vec<BinConfiguration>,
    patch_transformer_num_attention_heads: Option<i64>,
}

impl Default for BinsConfig {
    fn default() -> Self {
        Self {
            bin_centers_type: "softplus".into(),
            attractor_kind: "mean".into(),
            min_temp: 0.0212,
            max_temp: 50.0,
            bin_configurations: vec![BinConfiguration {
                name: None,
                n_bins: 64,
                min_depth: 0.001,
                max_depth: 10.0,
            }],
            patch_transformer_num_attention_heads: None,
        }
    }
}

impl BinsConfig {
    /// Why sdxld cannot run these bins, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        if !["normed", "softplus"].contains(&self.bin_centers_type.as_str()) {
            return Some(format!("bin_centers_type `{}`", self.bin_centers_type));
        }
        if !["mean", "sum"].contains(&self.attractor_kind.as_str()) {
            return Some(format!("attractor_kind `{}`", self.attractor_kind));
        }
        let several = self.bin_configurations.len() > 1;
        let bad = |b: &BinConfiguration| {
            b.n_bins < 1 || (several && b.name.is_none()) || b.max_depth <= b.min_depth
        };
        if self.bin_configurations.is_empty() || self.bin_configurations.iter().any(bad) {
            return Some("bin_configurations without bins, names or a depth range".into());
        }
        if several && self.patch_transformer_num_attention_heads.unwrap_or(0) < 1 {
            return Some("several bin configurations and no patch transformer heads".into());
        }
        None
    }
}

/// A 1×1 convolution taking the `input` channels its input has, giving `output` or, if
/// `None`, as many as the file stores: a file of other widths is refused at load, naming
/// the tensor, instead of failing in a forward pass.
fn pointwise(vp: &VarPath, shapes: &ShapeMap, input: i64, output: Option<i64>) -> Result<Conv2d> {
    let shape = shape_of(vp, shapes, "weight")?;
    match shape[..] {
        [stored, _, 1, 1] => Conv2d::load(vp, input, output.unwrap_or(stored), 1, 1, 0),
        _ => Err(EngineError::InvalidRequest(format!(
            "`{}.weight` is {shape:?}, not a 1×1 convolution",
            vp.prefix()
        ))),
    }
}

/// The channels a convolution gives.
fn outputs(conv: &Conv2d) -> i64 {
    conv.weight().size()[0]
}

/// Two 1×1 convolutions with a ReLU between (projectors, regressors, attractor MLPs).
struct Mlp {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl Mlp {
    /// From `input` channels to `output` (`None`: as stored).
    fn load(vp: &VarPath, shapes: &ShapeMap, input: i64, output: Option<i64>) -> Result<Self> {
        let conv1 = pointwise(&vp.pp("conv1"), shapes, input, None)?;
        let conv2 = pointwise(&vp.pp("conv2"), shapes, outputs(&conv1), output)?;
        Ok(Self { conv1, conv2 })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.conv2.forward(&self.conv1.forward(x).relu())
    }

    fn outputs(&self) -> i64 {
        outputs(&self.conv2)
    }
}

/// Bilinear resize with the corners aligned, as the heads resize everything.
fn resized(x: &Tensor, like: &Tensor) -> Tensor {
    let t = like.size();
    x.upsample_bilinear2d([t[2], t[3]], true, None, None)
}

/// How bin centres are bounded.
#[derive(Clone, Copy)]
struct Range {
    normed: bool,
    sum: bool,
    min: f64,
    max: f64,
}

/// transformers' `inv_attractor` with its defaults (alpha 300, gamma 2).
fn inverse_attractor(dx: &Tensor) -> Tensor {
    dx / (dx.pow_tensor_scalar(2) * 300.0 + 1.0)
}

/// One attractor layer: attractor points from the level's bin embedding move the
/// previous level's centres.
struct Attractor {
    mlp: Mlp,
    range: Range,
}

impl Attractor {
    /// The new (normed: unscaled) centres and the centres in depth.
    fn forward(&self, x: &Tensor, previous: &Tensor, embedding: &Tensor) -> (Tensor, Tensor) {
        let x = x + resized(embedding, x);
        let out = self.mlp.forward(&x);
        let s = out.size();
        let attractors = if self.range.normed {
            let count = self.mlp.outputs() / 2;
            (out.relu() + 1e-3)
                .view([s[0], count, 2, s[2], s[3]])
                .select(2, 0)
        } else {
            out.softplus()
        };
        let centres = resized(previous, &attractors);
        let shifts = inverse_attractor(&(attractors.unsqueeze(2) - centres.unsqueeze(1)));
        let shift = if self.range.sum {
            shifts.sum_dim_intlist(1, false, None)
        } else {
            shifts.mean_dim(1, false, None)
        };
        let moved = centres + shift;
        if !self.range.normed {
            return (moved.shallow_clone(), moved);
        }
        let (min, max) = (self.range.min, self.range.max);
        let depths = (&moved * (max - min) + min)
            .sort(1, false)
            .0
            .clamp(min, max);
        (moved, depths)
    }
}

/// The per-pixel log-binomial distribution over the bins.
struct LogBinomial {
    conv1: Conv2d,
    conv2: Conv2d,
    bins: i64,
    temperatures: (f64, f64),
}

impl LogBinomial {
    /// Probabilities [N, bins, H, W] (float32) of the main features conditioned on the
    /// embedding.
    fn forward(&self, main: &Tensor, condition: &Tensor) -> Tensor {
        let h = self.conv1.forward(&Tensor::cat(&[main, condition], 1));
        let h = self.conv2.forward(&h.gelu("none")).softplus();
        let ratio = |a: i64| {
            let (x, y) = (h.select(1, a) + 1e-4, h.select(1, a + 1) + 1e-4);
            &x / (&x + y)
        };
        // The distribution in float32 whatever the weights' kind (a log-binomial of 64
        // classes loses its shape in half precision, which autocast also avoids).
        let p = ratio(0).unsqueeze(1).to_kind(Kind::Float);
        let (min_t, max_t) = self.temperatures;
        let t = ratio(2).unsqueeze(1).to_kind(Kind::Float) * (max_t - min_t) + min_t;
        let eps = 1e-4;
        let q = (-&p + 1.0).clamp(eps, 1.0);
        let p = p.clamp(eps, 1.0);
        let options = (p.kind(), p.device());
        let k = Tensor::arange(self.bins, options).view([1, -1, 1, 1]);
        let n = Tensor::full([1, 1, 1, 1], (self.bins - 1) as f64, options);
        let y = log_binomial(&n, &k) + &k * p.log() + (&n - &k) * q.log();
        (y / t).softmax(1, Kind::Float)
    }
}

/// log(n choose k) by Stirling's approximation, as transformers' `log_binom`.
fn log_binomial(n: &Tensor, k: &Tensor) -> Tensor {
    let eps = 1e-7;
    let (n, k) = (n + eps, k + eps);
    &n * n.log() - &k * k.log() - (&n - &k) * (&n - &k + eps).log()
}

/// One bin configuration's regressor, attractors and distribution.
struct Bins {
    seed: Mlp,
    attractors: Vec<Attractor>,
    distribution: LogBinomial,
    range: Range,
}

/// The channels the metric head's inputs have.
#[derive(Clone, Copy)]
pub struct HeadInputs {
    /// The fused levels'.
    pub fused: i64,
    /// The relative head's features'.
    pub relative: i64,
}

/// The channels inside the metric head a bin configuration's layers take.
#[derive(Clone, Copy)]
struct BinInputs {
    bottleneck: i64,
    embedding: i64,
    condition: i64,
}

impl Bins {
    fn load(
        seed: &VarPath,
        attractors: &VarPath,
        distribution: &VarPath,
        (config, bins): (&BinsConfig, &BinConfiguration),
        (shapes, inputs): (&ShapeMap, BinInputs),
    ) -> Result<Self> {
        let range = Range {
            normed: config.bin_centers_type == "normed",
            sum: config.attractor_kind == "sum",
            min: bins.min_depth,
            max: bins.max_depth,
        };
        let count = (0..)
            .take_while(|i| {
                shapes.contains_key(&format!("{}.{i}.conv1.weight", attractors.prefix()))
            })
            .count();
        let mlp = distribution.pp("mlp");
        let conv1 = pointwise(&mlp.pp("0"), shapes, inputs.condition, None)?;
        // The distribution's four outputs: p and t, each a ratio of two.
        let conv2 = pointwise(&mlp.pp("2"), shapes, outputs(&conv1), Some(4))?;
        Ok(Self {
            seed: Mlp::load(seed, shapes, inputs.bottleneck, Some(bins.n_bins))?,
            attractors: (0..count)
                .map(|i| {
                    let mlp = Mlp::load(&attractors.pp(i), shapes, inputs.embedding, None)?;
                    Ok(Attractor { mlp, range })
                })
                .collect::<Result<_>>()?,
            distribution: LogBinomial {
                conv1,
                conv2,
                bins: bins.n_bins,
                temperatures: (config.min_temp, config.max_temp),
            },
            range,
        })
    }

    /// The seed centres: normed ones from widths over the depth range, or softplus ones.
    fn seed_centres(&self, x: &Tensor) -> Tensor {
        let out = self.seed.forward(x);
        if !self.range.normed {
            return out.softplus();
        }
        let (min, max) = (self.range.min, self.range.max);
        let centres = out.relu() + 1e-3;
        let widths = &centres / centres.sum_dim_intlist(1, true, None) * (max - min);
        let s = widths.size();
        let first = Tensor::full([s[0], 1, s[2], s[3]], min, (widths.kind(), widths.device()));
        let edges = Tensor::cat(&[first, widths], 1).cumsum(1, None::<Kind>);
        let bins = s[1];
        (edges.narrow(1, 0, bins) + edges.narrow(1, 1, bins)) * 0.5
    }
}

/// The patch transformer and classifier that vote for a bin configuration.
struct Router {
    embedding: Conv2d,
    layers: Vec<EncoderLayer>,
    classifier: (Linear, Linear),
    heads: i64,
}

/// A post-norm transformer encoder layer with a ReLU MLP.
struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    norm1: LayerNorm,
    up: Linear,
    down: Linear,
    norm2: LayerNorm,
}

/// The patch transformer runs four layers, whatever its config says.
const ROUTER_LAYERS: i64 = 4;

impl Router {
    fn load(vp: &VarPath, shapes: &ShapeMap, heads: i64, bottleneck: i64) -> Result<Self> {
        let embedding_path = vp.pp("patch_transformer.embedding_convPxP");
        let embedding = pointwise(&embedding_path, shapes, bottleneck, None)?;
        let width = outputs(&embedding);
        if width % heads != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "`{}.weight` gives {width} channels, which {heads} attention heads do not divide",
                embedding_path.prefix()
            )));
        }
        let layer = |i: i64| -> Result<EncoderLayer> {
            let l = vp.pp(format!("patch_transformer.transformer_encoder.{i}"));
            let inner = shape_of(&l.pp("linear1"), shapes, "weight")?[0];
            let attention = l.pp("self_attn");
            let linear = |name: &str| Linear::load(&attention.pp(name), width, width, true);
            Ok(EncoderLayer {
                query: linear("query")?,
                key: linear("key")?,
                value: linear("value")?,
                out: linear("out_proj")?,
                norm1: LayerNorm::load(&l.pp("norm1"), width, 1e-5)?,
                up: Linear::load(&l.pp("linear1"), width, inner, true)?,
                down: Linear::load(&l.pp("linear2"), inner, width, true)?,
                norm2: LayerNorm::load(&l.pp("norm2"), width, 1e-5)?,
            })
        };
        let classifier = vp.pp("mlp_classifier");
        let domains = shape_of(&classifier.pp("linear2"), shapes, "weight")?[0];
        Ok(Self {
            embedding,
            layers: (0..ROUTER_LAYERS).map(layer).collect::<Result<_>>()?,
            classifier: (
                Linear::load(&classifier.pp("linear1"), width, width, true)?,
                Linear::load(&classifier.pp("linear2"), width, domains, true)?,
            ),
            heads,
        })
    }

    /// The index of the configuration the batch votes for.
    fn vote(&self, x: &Tensor) -> i64 {
        let tokens = self.embedding.forward(x).flatten(2, 3);
        let tokens = tokens.constant_pad_nd([1, 0]).permute([0, 2, 1]);
        let s = tokens.size();
        let mut x = &tokens + sinusoids(s[1], s[2], &tokens);
        for l in &self.layers {
            let (q, k, v) = (l.query.forward(&x), l.key.forward(&x), l.value.forward(&x));
            let attended = l
                .out
                .forward(&multi_head_attention(&q, &k, &v, self.heads, false));
            x = l.norm1.forward(&(attended + &x));
            let h = l.down.forward(&l.up.forward(&x).relu());
            x = l.norm2.forward(&(h + &x));
        }
        let class = x.select(1, 0);
        let logits = self
            .classifier
            .1
            .forward(&self.classifier.0.forward(&class).relu());
        let vote = logits
            .sum_dim_intlist(0, true, None)
            .softmax(-1, logits.kind());
        vote.argmax(-1, false).int64_value(&[0])
    }
}

/// The patch transformer's 1-D sinusoidal positions [length, width]: sines of every
/// frequency, then cosines.
fn sinusoids(length: i64, width: i64, like: &Tensor) -> Tensor {
    let options = (like.kind(), like.device());
    let position = Tensor::arange(length, options).unsqueeze(1);
    let index = Tensor::arange_start_step(0, width, 2, options).unsqueeze(0);
    let scale = -Tensor::full([], 10000.0, options).log() / width as f64;
    let angles = position * (index * scale).exp();
    Tensor::cat(&[angles.sin(), angles.cos()], 1)
}

/// The metric head: one bin configuration, or several and the router.
pub struct MetricHead {
    bottleneck: Conv2d,
    seed_projector: Mlp,
    projectors: Vec<Mlp>,
    bins: Vec<Bins>,
    router: Option<Router>,
}

impl MetricHead {
    /// Loads `metric_head` under `vp`, its layers as wide as their `inputs` are.
    pub fn load(
        vp: &VarPath,
        config: &BinsConfig,
        shapes: &ShapeMap,
        inputs: HeadInputs,
    ) -> Result<Self> {
        let single = config.bin_configurations.len() == 1;
        let bottleneck = pointwise(&vp.pp("conv2"), shapes, inputs.fused, None)?;
        let widths = outputs(&bottleneck);
        let seed_projector = Mlp::load(&vp.pp("seed_projector"), shapes, widths, None)?;
        let embedding = seed_projector.outputs();
        // One configuration conditions on the relative depth too.
        let inside = BinInputs {
            bottleneck: widths,
            embedding,
            condition: inputs.relative + i64::from(single) + embedding,
        };
        let bins = config
            .bin_configurations
            .iter()
            .map(|b| match (single, &b.name) {
                (false, Some(name)) => Bins::load(
                    &vp.pp(format!("seed_bin_regressors.{name}")),
                    &vp.pp(format!("attractors.{name}")),
                    &vp.pp(format!("conditional_log_binomial.{name}")),
                    (config, b),
                    (shapes, inside),
                ),
                _ => Bins::load(
                    &vp.pp("seed_bin_regressor"),
                    &vp.pp("attractors"),
                    &vp.pp("conditional_log_binomial"),
                    (config, b),
                    (shapes, inside),
                ),
            })
            .collect::<Result<_>>()?;
        let heads = config.patch_transformer_num_attention_heads.unwrap_or(1);
        let projector = |i: usize| {
            let path = vp.pp(format!("projectors.{i}"));
            Mlp::load(&path, shapes, inputs.fused, Some(embedding))
        };
        Ok(Self {
            bottleneck,
            seed_projector,
            projectors: (0..4).map(projector).collect::<Result<_>>()?,
            bins,
            router: match single {
                true => None,
                false => Some(Router::load(vp, shapes, heads, widths)?),
            },
        })
    }

    /// The metric depth [N, 1, H, W] from the relative head's features and depth, the
    /// bottleneck and the fused levels (coarsest first).
    pub fn forward(
        &self,
        (features, relative): (&Tensor, &Tensor),
        bottleneck: &Tensor,
        levels: &[Tensor],
    ) -> Tensor {
        let x = self.bottleneck.forward(bottleneck);
        let chosen = match &self.router {
            Some(router) => router.vote(&x) as usize,
            None => 0,
        };
        let bins = &self.bins[chosen.min(self.bins.len() - 1)];
        let seed = bins.seed_centres(&x);
        let mut previous = match bins.range.normed {
            true => (seed - bins.range.min) / (bins.range.max - bins.range.min),
            false => seed,
        };
        let mut embedding = self.seed_projector.forward(&x);
        let mut centres = previous.shallow_clone();
        let steps = self.projectors.iter().zip(&bins.attractors).zip(levels);
        for ((projector, attractor), level) in steps {
            let level_embedding = projector.forward(level);
            (previous, centres) = attractor.forward(&level_embedding, &previous, &embedding);
            embedding = level_embedding;
        }
        // One configuration conditions on the relative depth too.
        let last = match self.router {
            None => Tensor::cat(&[features, &resized(&relative.unsqueeze(1), features)], 1),
            Some(_) => features.shallow_clone(),
        };
        let probabilities = bins
            .distribution
            .forward(&last, &resized(&embedding, &last));
        let centres = resized(&centres, &probabilities).to_kind(Kind::Float);
        (probabilities * centres).sum_dim_intlist(1, true, None)
    }
}
