//! `--controlnet FOLDER,IMAGE[,KEY=VALUE...]`: a ControlNet unit from the command line,
//! as the contract's `ControlNetUnit`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sdxld::proto::v1 as pb;

/// The keys a `--controlnet` value may carry after the folder and the image.
pub const KEYS: &str = "scale, start, end, mode (balanced|guess), resize (just|crop|fill), \
preprocessor (none|canny|depth|openpose|openpose_face|openpose_faceonly|openpose_hand|openpose_full|scribble|normal|segmentation|lineart|lineart_anime|softedge|mlsd|lineart_standard|anyline|tile_resample|blur|invert|recolor_luminance|recolor_intensity|scribble_xdog|sketch), detector (a preprocessor network's \
.safetensors file or model folder; the face and hand networks of the openpose_face, _faceonly, _hand and _full maps are `facenet.safetensors` and `hand_pose_model.safetensors` in the same folder), low, high (Canny), score, distance (M-LSD), safe (the steps soft edges are quantised in: 0 or 2), rate (tile_resample's down-sampling rate), sigma (blur), gamma (recolor_luminance and recolor_intensity), xdog (scribble_xdog's threshold), near, background (a LeReS depth detector's cuts, in %), resolution (detection), pixel_perfect (true|false: the detection resolution that fits the output), type (union models: openpose|depth|hed|canny|normal|segment|tile|repaint)";

/// A union model's control types by their CLI names (the contract's `ControlType`).
const CONTROL_TYPES: [(&str, i32); 8] = [
    ("openpose", 1),
    ("depth", 2),
    ("hed", 3),
    ("canny", 4),
    ("normal", 5),
    ("segment", 6),
    ("tile", 7),
    ("repaint", 8),
];

/// A parsed `--controlnet` value: the ControlNet folder and the unit.
pub struct ControlNetArg {
    /// The ControlNet folder (its parent becomes a ControlNet root).
    pub folder: PathBuf,
    /// The unit, naming the folder by its name.
    pub unit: pb::ControlNetUnit,
    /// The preprocessor network's file (its folder becomes a preprocessor root).
    pub detector: Option<PathBuf>,
}

/// Parses `FOLDER,IMAGE[,KEY=VALUE...]`, reading the image.
pub fn parse(arg: &str) -> anyhow::Result<ControlNetArg> {
    let mut parts = arg.split(',');
    let (Some(folder), Some(image)) = (parts.next(), parts.next()) else {
        bail!("--controlnet {arg:?}: expected FOLDER,IMAGE[,KEY=VALUE...] (keys: {KEYS})");
    };
    let folder = PathBuf::from(folder);
    let image_path = Path::new(image);
    let mut unit = pb::ControlNetUnit {
        model: folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("--controlnet {arg:?}: {folder:?} names no folder"))?,
        image: std::fs::read(image_path)
            .with_context(|| format!("reading {}", image_path.display()))?,
        ..Default::default()
    };
    let mut detector = None;
    for pair in parts {
        if let Some(file) = pair.strip_prefix("detector=") {
            let file = PathBuf::from(file);
            let name = file.file_stem().map(|n| n.to_string_lossy().into_owned());
            unit_params(&mut unit).model =
                name.with_context(|| format!("--controlnet {arg:?}: {file:?} names no file"))?;
            detector = Some(file);
            continue;
        }
        set(&mut unit, pair).with_context(|| format!("--controlnet {arg:?}"))?;
    }
    Ok(ControlNetArg {
        folder,
        unit,
        detector,
    })
}

/// Applies one `KEY=VALUE` to `unit`.
fn set(unit: &mut pb::ControlNetUnit, pair: &str) -> anyhow::Result<()> {
    let Some((key, value)) = pair.split_once('=') else {
        bail!("`{pair}` is not KEY=VALUE (keys: {KEYS})");
    };
    let number = || -> anyhow::Result<f32> {
        value
            .parse()
            .with_context(|| format!("{key}: `{value}` is not a number"))
    };
    let whole = || -> anyhow::Result<u32> {
        value
            .parse()
            .with_context(|| format!("{key}: `{value}` is not a whole number"))
    };
    match key {
        "scale" => unit.conditioning_scale = Some(number()?),
        "start" => unit.guidance_start = number()?,
        "end" => unit.guidance_end = Some(number()?),
        "mode" => unit.control_mode = named(key, value, &[("balanced", 1), ("guess", 2)])?,
        "resize" => unit.resize_mode = named(key, value, &[("just", 1), ("crop", 2), ("fill", 3)])?,
        "preprocessor" => {
            let names = [
                ("none", 1),
                ("canny", 2),
                ("depth", 3),
                ("openpose", 4),
                ("scribble", 5),
                ("normal", 6),
                ("segmentation", 7),
                ("lineart", 8),
                ("lineart_anime", 9),
                ("softedge", 10),
                ("mlsd", 11),
                ("lineart_standard", 12),
                ("anyline", 13),
                ("tile_resample", 14),
                ("blur", 15),
                ("invert", 16),
                ("openpose_face", 17),
                ("openpose_faceonly", 18),
                ("openpose_hand", 19),
                ("openpose_full", 20),
                ("recolor_luminance", 21),
                ("recolor_intensity", 22),
                ("scribble_xdog", 23),
                ("sketch", 24),
            ];
            unit.preprocessor = named(key, value, &names)?;
        }
        "type" => unit.control_type = named(key, value, &CONTROL_TYPES)?,
        "low" => unit_params(unit).low_threshold = Some(whole()?),
        "high" => unit_params(unit).high_threshold = Some(whole()?),
        "score" => unit_params(unit).mlsd_score_threshold = Some(number()?),
        "distance" => unit_params(unit).mlsd_distance_threshold = Some(number()?),
        "safe" => unit_params(unit).safe_steps = Some(whole()?),
        "rate" => unit_params(unit).down_sampling_rate = Some(number()?),
        "sigma" => unit_params(unit).blur_sigma = Some(number()?),
        "gamma" => unit_params(unit).gamma_correction = Some(number()?),
        "xdog" => unit_params(unit).xdog_threshold = Some(whole()?),
        "near" => unit_params(unit).remove_near = Some(number()?),
        "background" => unit_params(unit).remove_background = Some(number()?),
        "resolution" => unit_params(unit).detect_resolution = whole()?,
        "pixel_perfect" => {
            unit.pixel_perfect = named(key, value, &[("false", 0), ("true", 1)])? == 1;
        }
        other => bail!("unknown key `{other}` (keys: {KEYS})"),
    }
    Ok(())
}

fn unit_params(unit: &mut pb::ControlNetUnit) -> &mut pb::PreprocessorParams {
    unit.preprocessor_params
        .get_or_insert_with(Default::default)
}

/// The enum value `value` names among `names`.
fn named(key: &str, value: &str, names: &[(&str, i32)]) -> anyhow::Result<i32> {
    match names.iter().find(|(name, _)| *name == value) {
        Some((_, number)) => Ok(*number),
        None => {
            let known: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
            bail!("{key} must be one of {}, got `{value}`", known.join(", "))
        }
    }
}
