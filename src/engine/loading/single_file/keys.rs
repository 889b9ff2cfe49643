//! The names single-file checkpoints store their tensors under, mapped to diffusers
//! keys (with the transform a few weights need), as diffusers'
//! `loaders/single_file_utils.py` converts them, and back (for LoRA files that name
//! modules in the sgm layout).

use crate::engine::weights::Transform;

/// The UNet's prefix.
pub const UNET: &str = "model.diffusion_model.";
/// The VAE's prefix.
pub const VAE: &str = "first_stage_model.";
/// The first text encoder's prefix (transformers CLIP layout).
pub const TEXT_ENCODER: &str = "conditioner.embedders.0.transformer.";
/// The second text encoder's prefix (OpenCLIP layout).
pub const TEXT_ENCODER_2: &str = "conditioner.embedders.1.model.";

fn one(key: String) -> Vec<(String, Transform)> {
    vec![(key, Transform::Identity)]
}

/// The diffusers key of a ResNet block's weight (`in_layers.0.weight` → `norm1.weight`).
fn unet_resnet(rest: &str) -> Option<String> {
    const NAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(old, new)| rest.strip_prefix(old).map(|p| format!("{new}{p}")))
}

/// The diffusers UNet key of a stored UNet name (prefix removed), as diffusers'
/// `convert_ldm_unet_checkpoint` maps it. Names it does not know keep their stored name,
/// so that the loader reports them as unknown.
pub fn unet_keys(name: &str, layers_per_block: usize) -> Vec<(String, Transform)> {
    one(unet_key(name, layers_per_block).unwrap_or_else(|| format!("{UNET}{name}")))
}

/// The diffusers UNet key of a stored UNet name (prefix removed), if it has one.
pub fn unet_key(name: &str, lpb: usize) -> Option<String> {
    const FIXED: [(&str, &str); 7] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(key) = FIXED
        .iter()
        .find_map(|(old, new)| name.strip_prefix(old).map(|p| format!("{new}{p}")))
    {
        return Some(key);
    }
    let parts: Vec<&str> = name.splitn(4, '.').collect();
    let [block, index, sub, rest] = parts.as_slice() else {
        return None;
    };
    let per_block = lpb + 1;
    match *block {
        "input_blocks" => {
            let i: usize = index.parse().ok().filter(|i| *i > 0)?;
            let (b, l) = ((i - 1) / per_block, (i - 1) % per_block);
            match (*sub, rest.strip_prefix("op.")) {
                ("0", Some(param)) => Some(format!("down_blocks.{b}.downsamplers.0.conv.{param}")),
                ("0", None) => Some(format!(
                    "down_blocks.{b}.resnets.{l}.{}",
                    unet_resnet(rest)?
                )),
                ("1", _) => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
                _ => None,
            }
        }
        "middle_block" => {
            let tail = format!("{sub}.{rest}");
            match *index {
                "0" => Some(format!("mid_block.resnets.0.{}", unet_resnet(&tail)?)),
                "1" => Some(format!("mid_block.attentions.0.{tail}")),
                "2" => Some(format!("mid_block.resnets.1.{}", unet_resnet(&tail)?)),
                _ => None,
            }
        }
        "output_blocks" => {
            let i: usize = index.parse().ok()?;
            let (b, l) = (i / per_block, i % per_block);
            match (*sub, rest.strip_prefix("conv.")) {
                ("0", _) => Some(format!("up_blocks.{b}.resnets.{l}.{}", unet_resnet(rest)?)),
                ("1" | "2", Some(param)) => {
                    Some(format!("up_blocks.{b}.upsamplers.0.conv.{param}"))
                }
                ("1", None) => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The names a diffusers UNet module (`down_blocks.1.attentions.0.proj_in`) has in the
/// sgm layout (`input_blocks.4.1.proj_in`): the inverse of [`unet_keys`] for modules. An
/// upsampler has two candidates (its index depends on whether its block has attentions).
pub fn unet_sgm_names(key: &str, layers_per_block: usize) -> Vec<String> {
    const FIXED: [(&str, &str); 6] = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_out", "out.2"),
    ];
    if let Some((_, sgm)) = FIXED.iter().find(|(k, _)| *k == key) {
        return vec![sgm.to_string()];
    }
    const RESNET: [(&str, &str); 4] = [
        ("conv1", "in_layers.2"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ];
    let resnet = |rest: &str| RESNET.iter().find(|(k, _)| *k == rest).map(|(_, v)| *v);
    let per_block = layers_per_block + 1;
    let parts: Vec<&str> = key.splitn(5, '.').collect();
    let index = |s: &str| s.parse::<usize>().ok();
    let names = match parts.as_slice() {
        ["down_blocks", b, "resnets", l, rest] => index(b)
            .zip(index(l))
            .zip(resnet(rest))
            .map(|((b, l), r)| vec![format!("input_blocks.{}.0.{r}", 1 + b * per_block + l)]),
        ["down_blocks", b, "attentions", l, rest] => index(b)
            .zip(index(l))
            .map(|(b, l)| vec![format!("input_blocks.{}.1.{rest}", 1 + b * per_block + l)]),
        ["down_blocks", b, "downsamplers", "0", "conv"] => index(b).map(|b| {
            vec![format!(
                "input_blocks.{}.0.op",
                1 + b * per_block + layers_per_block
            )]
        }),
        ["mid_block", "resnets", l, rest @ ..] => index(l)
            .zip(resnet(&rest.join(".")))
            .map(|(l, r)| vec![format!("middle_block.{}.{r}", 2 * l)]),
        ["mid_block", "attentions", "0", rest @ ..] => {
            Some(vec![format!("middle_block.1.{}", rest.join("."))])
        }
        ["up_blocks", b, "resnets", l, rest] => index(b)
            .zip(index(l))
            .zip(resnet(rest))
            .map(|((b, l), r)| vec![format!("output_blocks.{}.0.{r}", b * per_block + l)]),
        ["up_blocks", b, "attentions", l, rest] => index(b)
            .zip(index(l))
            .map(|(b, l)| vec![format!("output_blocks.{}.1.{rest}", b * per_block + l)]),
        ["up_blocks", b, "upsamplers", "0", "conv"] => index(b).map(|b| {
            let i = b * per_block + layers_per_block;
            vec![
                format!("output_blocks.{i}.1.conv"),
                format!("output_blocks.{i}.2.conv"),
            ]
        }),
        _ => None,
    };
    names.unwrap_or_default()
}

/// The diffusers AutoencoderKL key of a stored VAE name (prefix removed), as diffusers'
/// `convert_ldm_vae_checkpoint` maps it; decoder levels are stored in reverse order.
pub fn vae_keys(name: &str, levels: usize) -> Vec<(String, Transform)> {
    match vae_key(name, levels) {
        Some((key, transform)) => vec![(key, transform)],
        None => one(format!("{VAE}{name}")),
    }
}

fn vae_key(name: &str, levels: usize) -> Option<(String, Transform)> {
    let plain = |key: String| Some((key, Transform::Identity));
    let resnet = |rest: &str| rest.replacen("nin_shortcut.", "conv_shortcut.", 1);
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return plain(name.to_string());
    }
    let (coder, rest) = name.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    if let Some(p) = rest.strip_prefix("norm_out.") {
        return plain(format!("{coder}.conv_norm_out.{p}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return plain(name.to_string());
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        if let Some(attn) = mid.strip_prefix("attn_1.") {
            const NAMES: [(&str, &str); 5] = [
                ("norm.", "group_norm."),
                ("q.", "to_q."),
                ("k.", "to_k."),
                ("v.", "to_v."),
                ("proj_out.", "to_out.0."),
            ];
            let key = NAMES
                .iter()
                .find_map(|(old, new)| attn.strip_prefix(old).map(|p| format!("{new}{p}")))?;
            return Some((
                format!("{coder}.mid_block.attentions.0.{key}"),
                Transform::DropUnitDims,
            ));
        }
        let (block, tail) = mid.split_once('.')?;
        let index = match block {
            "block_1" => 0,
            "block_2" => 1,
            _ => return None,
        };
        return plain(format!(
            "{coder}.mid_block.resnets.{index}.{}",
            resnet(tail)
        ));
    }
    let parts: Vec<&str> = rest.splitn(4, '.').collect();
    let [level_kind, level, what, tail] = parts.as_slice() else {
        return None;
    };
    let level: usize = level.parse().ok()?;
    let (blocks, sampler, level) = match (coder, *level_kind) {
        ("encoder", "down") => ("down_blocks", "downsamplers", level),
        ("decoder", "up") => ("up_blocks", "upsamplers", levels.checked_sub(level + 1)?),
        _ => return None,
    };
    match *what {
        "block" => {
            let (j, p) = tail.split_once('.')?;
            plain(format!(
                "{coder}.{blocks}.{level}.resnets.{j}.{}",
                resnet(p)
            ))
        }
        "downsample" | "upsample" => plain(format!("{coder}.{blocks}.{level}.{sampler}.0.{tail}")),
        _ => None,
    }
}

/// The first text encoder's keys: transformers' own names (position ids dropped).
pub fn text_encoder_keys(name: &str) -> Vec<(String, Transform)> {
    if name.ends_with("position_ids") {
        return Vec::new();
    }
    one(name.to_string())
}

/// The second text encoder's keys from OpenCLIP names (prefix removed), as diffusers'
/// `convert_open_clip_checkpoint` maps them.
pub fn open_clip_keys(name: &str) -> Vec<(String, Transform)> {
    match name {
        "positional_embedding" => {
            return one("text_model.embeddings.position_embedding.weight".into())
        }
        "token_embedding.weight" => {
            return one("text_model.embeddings.token_embedding.weight".into())
        }
        "text_projection" => return vec![("text_projection.weight".into(), Transform::Transpose)],
        "logit_scale" => return Vec::new(),
        _ => {}
    }
    if let Some(p) = name.strip_prefix("ln_final.") {
        return one(format!("text_model.final_layer_norm.{p}"));
    }
    let Some(block) = name.strip_prefix("transformer.resblocks.") else {
        return one(format!("{TEXT_ENCODER_2}{name}"));
    };
    let Some((layer, rest)) = block.split_once('.') else {
        return one(format!("{TEXT_ENCODER_2}{name}"));
    };
    let layer_key = |module: &str| format!("text_model.encoder.layers.{layer}.{module}");
    for (param, fused) in [
        ("weight", "attn.in_proj_weight"),
        ("bias", "attn.in_proj_bias"),
    ] {
        if rest == fused {
            return ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(i, proj)| {
                    (
                        layer_key(&format!("self_attn.{proj}.{param}")),
                        Transform::Chunk {
                            index: i as i64,
                            count: 3,
                        },
                    )
                })
                .collect();
        }
    }
    const NAMES: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ];
    match NAMES
        .iter()
        .find_map(|(old, new)| rest.strip_prefix(old).map(|p| format!("{new}{p}")))
    {
        Some(module) => one(layer_key(&module)),
        None => one(format!("{TEXT_ENCODER_2}{name}")),
    }
}

/// A renaming for one component: names under `prefix` pass through `keys`; others are
/// not part of the component.
pub fn component<'a>(
    prefix: &'static str,
    keys: impl Fn(&str) -> Vec<(String, Transform)> + 'a,
) -> impl Fn(&str) -> Vec<(String, Transform)> + 'a {
    move |name: &str| match name.strip_prefix(prefix) {
        Some(rest) => keys(rest),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgm_module_names_map_back_to_their_diffusers_keys() {
        for key in [
            "conv_in",
            "time_embedding.linear_1",
            "add_embedding.linear_2",
            "down_blocks.0.resnets.0.conv1",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.1.downsamplers.0.conv",
            "down_blocks.2.resnets.0.conv_shortcut",
            "mid_block.resnets.1.time_emb_proj",
            "mid_block.attentions.0.proj_out",
            "up_blocks.0.resnets.1.conv2",
            "up_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj",
            "up_blocks.0.upsamplers.0.conv",
            "conv_out",
        ] {
            // Keys valid with one and with two layers per block.
            for lpb in [1, 2] {
                let names = unet_sgm_names(key, lpb);
                assert!(!names.is_empty(), "{key}");
                for name in names {
                    let back = unet_key(&format!("{name}.weight"), lpb);
                    assert_eq!(
                        back.as_deref(),
                        Some(format!("{key}.weight").as_str()),
                        "{name}"
                    );
                }
            }
        }
    }

    #[test]
    fn unet_names_follow_diffusers_conversion() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.1.proj_in.weight",
                "down_blocks.1.attentions.0.proj_in.weight",
            ),
            (
                "input_blocks.5.0.skip_connection.bias",
                "down_blocks.1.resnets.1.conv_shortcut.bias",
            ),
            (
                "middle_block.2.out_layers.3.weight",
                "mid_block.resnets.1.conv2.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.norm1.weight",
                "mid_block.attentions.0.transformer_blocks.0.norm1.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.2.2.conv.bias",
                "up_blocks.0.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.4.1.norm.weight",
                "up_blocks.1.attentions.1.norm.weight",
            ),
            ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (stored, expected) in cases {
            assert_eq!(unet_key(stored, 2).as_deref(), Some(expected), "{stored}");
        }
        assert_eq!(
            unet_keys("nonsense.weight", 2)[0].0,
            "model.diffusion_model.nonsense.weight"
        );
    }

    #[test]
    fn vae_and_open_clip_names_follow_diffusers_conversion() {
        assert_eq!(
            vae_key("decoder.up.0.block.1.nin_shortcut.weight", 4)
                .map(|k| k.0)
                .as_deref(),
            Some("decoder.up_blocks.3.resnets.1.conv_shortcut.weight")
        );
        assert_eq!(
            vae_key("encoder.mid.attn_1.q.weight", 4),
            Some((
                "encoder.mid_block.attentions.0.to_q.weight".into(),
                Transform::DropUnitDims
            ))
        );
        assert_eq!(
            vae_key("encoder.down.2.downsample.conv.bias", 4)
                .map(|k| k.0)
                .as_deref(),
            Some("encoder.down_blocks.2.downsamplers.0.conv.bias")
        );
        let qkv = open_clip_keys("transformer.resblocks.7.attn.in_proj_weight");
        assert_eq!(qkv.len(), 3);
        assert_eq!(
            qkv[2].0,
            "text_model.encoder.layers.7.self_attn.v_proj.weight"
        );
        assert_eq!(qkv[2].1, Transform::Chunk { index: 2, count: 3 });
        assert_eq!(
            open_clip_keys("text_projection"),
            vec![("text_projection.weight".to_string(), Transform::Transpose)]
        );
        assert!(open_clip_keys("logit_scale").is_empty());
    }
}
