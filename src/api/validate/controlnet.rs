//! ControlNet units: model, images (a union unit's more conditions too), preprocessors,
//! scale, window, resize and control modes, and the control types a union model takes.

use std::sync::Arc;

use image::DynamicImage;

use crate::api::validate::detector::Detectors;
use crate::api::validate::fields::{
    enum_value, float, model_name, optional_float, Range, Violations,
};
use crate::api::validate::images::required_image;
use crate::api::validate::model::named;
use crate::api::validate::pixel_perfect::PixelPerfect;
use crate::api::validate::poses::{given_poses, PosedFields};
use crate::api::validate::preprocessor::{preprocessor, Subject};
use crate::api::validate::Deferred;
use crate::engine::control::{ControlCondition, ControlMode, ControlType, ControlUnit, ResizeMode};
use crate::engine::preprocess::{Preprocessing, Preprocessor};
use crate::engine::registry::{ModelEntry, ModelKind, Registry};
use crate::jobs::{ConditioningImage, ControlInput, ControlNetJob};
use crate::proto::v1 as pb;

/// Most ControlNet units in one request.
pub const MAX_CONTROLNETS: usize = 8;
/// Most conditions of a union unit besides its own image.
pub const MAX_MORE_CONDITIONS: usize = 7;

/// The fields of a unit or a union condition that make one control map.
struct MapFields<'a> {
    image: &'a [u8],
    poses: Option<&'a pb::Poses>,
    preprocessor: i32,
    params: Option<&'a pb::PreprocessorParams>,
}

/// What the checks of one unit share.
struct Check<'a> {
    /// The unit's field path, `spec.controlnets[i]`.
    p: String,
    registry: &'a Registry,
    detectors: Detectors<'a>,
    max_pixels: u64,
    /// The size the unit controls.
    output: (u32, u32),
}

/// `spec.controlnets`: every field of every unit checked, each image decoded.
pub fn controlnets(
    units: &[pb::ControlNetUnit],
    detectors: Detectors,
    (max_pixels, output): (u64, (u32, u32)),
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<ControlNetJob> {
    if units.len() > MAX_CONTROLNETS {
        v.add(
            "spec.controlnets",
            format!("has {} units; at most {MAX_CONTROLNETS}", units.len()),
        );
        return Vec::new();
    }
    units
        .iter()
        .enumerate()
        .filter_map(|(i, unit)| {
            let check = Check {
                p: format!("spec.controlnets[{i}]"),
                registry: detectors.registry,
                detectors,
                max_pixels,
                output,
            };
            check.unit(unit, v, deferred)
        })
        .collect()
}

/// The output size against each T2I-Adapter unit's downscale factor: its pixel unshuffle
/// takes only sides that are multiples of it.
pub fn adapter_sizes(units: &[ControlNetJob], (width, height): (u32, u32), v: &mut Violations) {
    for (i, unit) in units.iter().enumerate() {
        let Some(adapter) = unit.model.controlnet.as_ref().and_then(|f| f.adapter) else {
            continue;
        };
        let factor = adapter.downscale_factor.max(1) as u32;
        for (field, side) in [("spec.width", width), ("spec.height", height)] {
            if side % factor != 0 {
                v.add(
                    field,
                    format!(
                        "{side} is not a multiple of {factor}, the downscale factor of the T2I-Adapter `{}` (spec.controlnets[{i}].model)",
                        unit.model.name
                    ),
                );
            }
        }
    }
}

impl Check<'_> {
    /// One unit; the job's unit when every field is valid.
    fn unit(
        &self,
        unit: &pb::ControlNetUnit,
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Option<ControlNetJob> {
        let p = &self.p;
        if unit.more_conditions.len() > MAX_MORE_CONDITIONS {
            v.add(
                format!("{p}.more_conditions"),
                format!(
                    "has {} conditions; at most {MAX_MORE_CONDITIONS}",
                    unit.more_conditions.len()
                ),
            );
            return None;
        }
        let model = self.model(unit, v, deferred);
        let resize = enum_value::<pb::ResizeMode>(v, &format!("{p}.resize_mode"), unit.resize_mode)
            .map(|mode| match mode {
                pb::ResizeMode::Unspecified | pb::ResizeMode::JustResize => ResizeMode::JustResize,
                pb::ResizeMode::CropAndResize => ResizeMode::CropAndResize,
                pb::ResizeMode::ResizeAndFill => ResizeMode::ResizeAndFill,
            });
        let pixel_perfect = resize
            .filter(|_| unit.pixel_perfect)
            .map(|resize| PixelPerfect {
                field: format!("{p}.pixel_perfect"),
                output: self.output,
                resize,
            });
        let pixel_perfect = pixel_perfect.as_ref();
        let fields = MapFields {
            image: &unit.image,
            poses: unit.poses.as_ref(),
            preprocessor: unit.preprocessor,
            params: unit.preprocessor_params.as_ref(),
        };
        let first = self.input("", fields, pixel_perfect, v, deferred);
        let settings = unit_settings(p, unit, v);
        let mut inputs = vec![first];
        let mut conditions = Vec::new();
        let unit_scale = unit.conditioning_scale.map_or(1.0, f64::from);
        conditions.push(
            control_type(&format!("{p}.control_type"), unit.control_type, v).map(|t| {
                t.map(|control_type| ControlCondition {
                    control_type,
                    scale: unit_scale,
                })
            }),
        );
        for (j, more) in unit.more_conditions.iter().enumerate() {
            let (input, condition) = self.more(j, more, (unit_scale, pixel_perfect), v, deferred);
            inputs.push(input);
            conditions.push(condition);
        }
        let conditions = self.fit_model(model.as_ref(), unit, conditions, v);
        let adapter = model.as_ref().and_then(|m| m.controlnet.as_ref()?.adapter);
        if adapter.is_some() && unit.control_mode == pb::ControlMode::Guess as i32 {
            v.add(
                format!("{p}.control_mode"),
                format!("`{}` is a T2I-Adapter, which has no guess mode", unit.model),
            );
            return None;
        }
        let mut settings = settings?;
        settings.conditions = conditions?;
        Some(ControlNetJob {
            model: model?,
            inputs: inputs.into_iter().collect::<Option<_>>()?,
            resize: resize?,
            pixel_perfect: unit.pixel_perfect,
            unit: settings,
        })
    }

    /// The unit's ControlNet.
    fn model(
        &self,
        unit: &pb::ControlNetUnit,
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Option<ModelEntry> {
        let field = format!("{}.model", self.p);
        if unit.model.is_empty() {
            v.add(&field, "is required");
            return None;
        }
        if !model_name(v, &field, &unit.model) {
            return None;
        }
        named(
            self.registry,
            ModelKind::ControlNet,
            &unit.model,
            &field,
            v,
            deferred,
        )
    }

    /// An image and its preprocessor, under `{unit}{sub}.`, detected where the unit's
    /// `pixel_perfect` puts it; or poses drawn as the map.
    fn input(
        &self,
        sub: &str,
        fields: MapFields,
        pixel_perfect: Option<&PixelPerfect>,
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Option<ControlInput> {
        let prefix = format!("{}{sub}.", self.p);
        if let Some(poses) = fields.poses {
            return self.drawn_poses(&prefix, fields, poses, v);
        }
        let (kind, params) = (fields.preprocessor, fields.params);
        let field = format!("{prefix}image");
        let decoded = required_image(fields.image, &field, self.max_pixels, v);
        let fitted =
            pixel_perfect.and_then(|rule| rule.fit(&prefix, kind, params, decoded.as_ref(), v));
        let params = fitted.as_ref().map_or(params, |f| Some(&f.params));
        let subject = Subject {
            image: decoded.as_ref(),
            max_pixels: self.max_pixels,
            detectors: self.detectors,
        };
        let from = v.0.len();
        let checked = preprocessor(&prefix, kind, params, subject, v, deferred);
        if let (Some(rule), Some(fitted)) = (pixel_perfect, &fitted) {
            rule.blame(&prefix, fitted, from, v);
        }
        let checked = checked?;
        Some(ControlInput {
            image: ConditioningImage(Arc::new(decoded?)),
            preprocessing: checked.preprocessing,
            detector: checked.detector,
            face_detector: checked.face_detector,
            hand_detector: checked.hand_detector,
        })
    }

    /// Poses given under `prefix` instead of an image, drawn: the map as a given one
    /// (no preprocessor), as a pose editor hands its map to a unit.
    fn drawn_poses(
        &self,
        prefix: &str,
        fields: MapFields,
        poses: &pb::Poses,
        v: &mut Violations,
    ) -> Option<ControlInput> {
        let posed = PosedFields {
            image: fields.image,
            preprocessor: fields.preprocessor,
            params: fields.params,
            poses,
        };
        let (set, parts) = given_poses(prefix, posed, self.max_pixels, v)?;
        let map = DynamicImage::ImageRgb8(set.draw(parts));
        Some(ControlInput {
            image: ConditioningImage(Arc::new(map)),
            preprocessing: Preprocessing {
                preprocessor: Preprocessor::None,
                detect_resolution: None,
            },
            detector: None,
            face_detector: None,
            hand_detector: None,
        })
    }

    /// `more_conditions[j]`: its input and its condition (`None` where invalid).
    #[allow(clippy::type_complexity)]
    fn more(
        &self,
        j: usize,
        more: &pb::UnionCondition,
        (unit_scale, pixel_perfect): (f64, Option<&PixelPerfect>),
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> (Option<ControlInput>, Option<Option<ControlCondition>>) {
        let sub = format!(".more_conditions[{j}]");
        let fields = MapFields {
            image: &more.image,
            poses: more.poses.as_ref(),
            preprocessor: more.preprocessor,
            params: more.preprocessor_params.as_ref(),
        };
        let input = self.input(&sub, fields, pixel_perfect, v, deferred);
        let field = format!("{}{sub}", self.p);
        let scale = optional_float(
            v,
            &format!("{field}.conditioning_scale"),
            more.conditioning_scale,
            Range::closed(0.0, 2.0),
            unit_scale,
        );
        let given = control_type(&format!("{field}.control_type"), more.control_type, v);
        let condition = match given.map(|t| t.or_else(|| implied_type(more.preprocessor))) {
            Some(Some(control_type)) => Some(Some(ControlCondition {
                control_type,
                scale,
            })),
            Some(None) => {
                v.add(
                    format!("{field}.control_type"),
                    "is required (no preprocessor implies one)",
                );
                None
            }
            None => None,
        };
        (input, condition)
    }

    /// The conditions as the unit's model takes them: a union model's control types (each
    /// one it knows), none for another ControlNet. `conditions` holds the unit's own
    /// (`Some(None)`: unspecified) and then those of `more_conditions`.
    fn fit_model(
        &self,
        model: Option<&ModelEntry>,
        unit: &pb::ControlNetUnit,
        conditions: Vec<Option<Option<ControlCondition>>>,
        v: &mut Violations,
    ) -> Option<Vec<ControlCondition>> {
        let p = &self.p;
        let union_types = model
            .and_then(|m| m.controlnet.as_ref())
            .and_then(|f| f.union_types);
        let own_type = unit.control_type != 0;
        match union_types {
            None if model.is_some_and(|m| m.controlnet.is_some()) => {
                if own_type {
                    v.add(
                        format!("{p}.control_type"),
                        format!("applies to union models only; `{}` is not one", unit.model),
                    );
                }
                if !unit.more_conditions.is_empty() {
                    v.add(
                        format!("{p}.more_conditions"),
                        format!("apply to union models only; `{}` is not one", unit.model),
                    );
                }
                (!own_type && unit.more_conditions.is_empty()).then(Vec::new)
            }
            Some(known) => {
                let implied = implied_type(unit.preprocessor);
                if !own_type && implied.is_none() {
                    v.add(
                        format!("{p}.control_type"),
                        format!(
                            "is required: `{}` is a union model (and no preprocessor implies a type)",
                            unit.model
                        ),
                    );
                    return None;
                }
                let mut valid: Vec<Option<ControlCondition>> =
                    conditions.into_iter().collect::<Option<_>>()?;
                if let (Some(own @ None), Some(control_type)) = (valid.first_mut(), implied) {
                    *own = Some(ControlCondition {
                        control_type,
                        scale: unit.conditioning_scale.map_or(1.0, f64::from),
                    });
                }
                let conditions: Vec<ControlCondition> = valid.into_iter().collect::<Option<_>>()?;
                for (j, c) in conditions.iter().enumerate() {
                    if c.control_type.index() >= known {
                        let field = match j {
                            0 => format!("{p}.control_type"),
                            j => format!("{p}.more_conditions[{}].control_type", j - 1),
                        };
                        v.add(
                            field,
                            format!(
                                "{:?} is not one of the {known} types `{}` knows",
                                c.control_type, unit.model
                            ),
                        );
                    }
                }
                Some(conditions)
            }
            // Unknown or unreadable: the engine checks when it loads the model.
            None => {
                let valid: Vec<Option<ControlCondition>> =
                    conditions.into_iter().collect::<Option<_>>()?;
                Some(valid.into_iter().flatten().collect())
            }
        }
    }
}

/// A control type field: `Some(None)` unspecified, `None` invalid.
fn control_type(field: &str, value: i32, v: &mut Violations) -> Option<Option<ControlType>> {
    let kind = enum_value::<pb::ControlType>(v, field, value)?;
    Some(match kind {
        pb::ControlType::Unspecified => None,
        pb::ControlType::Openpose => Some(ControlType::OpenPose),
        pb::ControlType::Depth => Some(ControlType::Depth),
        pb::ControlType::HedScribble => Some(ControlType::HedScribble),
        pb::ControlType::CannyLineart => Some(ControlType::CannyLineart),
        pb::ControlType::Normal => Some(ControlType::Normal),
        pb::ControlType::Segment => Some(ControlType::Segment),
        pb::ControlType::Tile => Some(ControlType::Tile),
        pb::ControlType::Repaint => Some(ControlType::Repaint),
    })
}

/// The union control type a preprocessor's map shows (xinsir's grouping: Canny and
/// every line art, M-LSD's segments included, share one type; tile resampling and blur
/// make the tile condition), if it implies one. An inverted image could be any line
/// map.
fn implied_type(preprocessor: i32) -> Option<ControlType> {
    match pb::Preprocessor::try_from(preprocessor).ok()? {
        pb::Preprocessor::Canny
        | pb::Preprocessor::Lineart
        | pb::Preprocessor::LineartAnime
        | pb::Preprocessor::LineartStandard
        | pb::Preprocessor::Mlsd => Some(ControlType::CannyLineart),
        pb::Preprocessor::Depth => Some(ControlType::Depth),
        pb::Preprocessor::Openpose
        | pb::Preprocessor::OpenposeFace
        | pb::Preprocessor::OpenposeFaceonly
        | pb::Preprocessor::OpenposeHand
        | pb::Preprocessor::OpenposeFull => Some(ControlType::OpenPose),
        pb::Preprocessor::Scribble
        | pb::Preprocessor::ScribbleXdog
        | pb::Preprocessor::Sketch
        | pb::Preprocessor::Softedge
        | pb::Preprocessor::Anyline => Some(ControlType::HedScribble),
        pb::Preprocessor::Normal => Some(ControlType::Normal),
        pb::Preprocessor::Segmentation => Some(ControlType::Segment),
        pb::Preprocessor::TileResample | pb::Preprocessor::Blur => Some(ControlType::Tile),
        pb::Preprocessor::Unspecified
        | pb::Preprocessor::None
        | pb::Preprocessor::Invert
        | pb::Preprocessor::RecolorLuminance
        | pb::Preprocessor::RecolorIntensity => None,
    }
}

/// A unit's scale, window and mode.
fn unit_settings(p: &str, unit: &pb::ControlNetUnit, v: &mut Violations) -> Option<ControlUnit> {
    let scale = optional_float(
        v,
        &format!("{p}.conditioning_scale"),
        unit.conditioning_scale,
        Range::closed(0.0, 2.0),
        1.0,
    );
    let start = float(
        v,
        &format!("{p}.guidance_start"),
        unit.guidance_start,
        Range::closed_open(0.0, 1.0),
    );
    let end = optional_float(
        v,
        &format!("{p}.guidance_end"),
        unit.guidance_end,
        Range::open_closed(0.0, 1.0),
        1.0,
    );
    let window = match start {
        Some(start) if start >= end => {
            v.add(
                format!("{p}.guidance_end"),
                format!("must be greater than guidance_start ({start} >= {end})"),
            );
            None
        }
        other => other,
    };
    let mode = enum_value::<pb::ControlMode>(v, &format!("{p}.control_mode"), unit.control_mode)
        .map(|mode| match mode {
            pb::ControlMode::Unspecified | pb::ControlMode::Balanced => ControlMode::Balanced,
            pb::ControlMode::Guess => ControlMode::Guess,
        });
    Some(ControlUnit {
        scale,
        guidance_start: window?,
        guidance_end: end,
        mode: mode?,
        conditions: Vec::new(),
    })
}
