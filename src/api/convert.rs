//! Domain to wire: job events, stages, model kinds and schedulers as the contract names
//! them, and the resolved request as the JSON the PNG's `sdxld` chunk records.

use crate::engine::preprocess::pose_set::{PosePoint, PoseSet};
use crate::engine::registry::ModelKind;
use crate::engine::request::SeedVariation;
use crate::engine::schedulers::sigmas::SigmaSpacing;
use crate::engine::schedulers::SchedulerKind;
use crate::jobs::events::{
    ControlMapEvent, EncodedImage, ImageEvent, JobReport, ModelUsed, ProgressEvent, Stage,
};
use crate::proto::v1 as pb;

/// The contract's stage.
pub fn stage(stage: Stage) -> pb::Stage {
    match stage {
        Stage::Queued => pb::Stage::Queued,
        Stage::LoadingModels => pb::Stage::LoadingModels,
        Stage::EncodingPrompt => pb::Stage::EncodingPrompt,
        Stage::Denoising => pb::Stage::Denoising,
        Stage::Refining => pb::Stage::Refining,
        Stage::Preprocessing => pb::Stage::Preprocessing,
        Stage::Decoding => pb::Stage::Decoding,
        Stage::PostProcessing => pb::Stage::PostProcessing,
        Stage::HiresUpscaling => pb::Stage::HiresUpscaling,
        Stage::HiresDenoising => pb::Stage::HiresDenoising,
    }
}

/// The contract's model kind.
pub fn model_kind(kind: ModelKind) -> pb::ModelKind {
    match kind {
        ModelKind::Base => pb::ModelKind::Base,
        ModelKind::Refiner => pb::ModelKind::Refiner,
        ModelKind::Vae => pb::ModelKind::Vae,
        ModelKind::Lora => pb::ModelKind::Lora,
        ModelKind::ControlNet => pb::ModelKind::Controlnet,
        ModelKind::Upscaler => pb::ModelKind::Upscaler,
        ModelKind::Preprocessor => pb::ModelKind::Preprocessor,
        ModelKind::Embedding => pb::ModelKind::Embedding,
        ModelKind::IpAdapter => pb::ModelKind::IpAdapter,
        ModelKind::ImageEncoder => pb::ModelKind::ImageEncoder,
    }
}

/// The contract's scheduler.
pub fn scheduler(kind: SchedulerKind) -> pb::Scheduler {
    match kind {
        SchedulerKind::Euler => pb::Scheduler::Euler,
        SchedulerKind::EulerAncestral => pb::Scheduler::EulerAncestral,
        SchedulerKind::Heun => pb::Scheduler::Heun,
        SchedulerKind::Kdpm2 => pb::Scheduler::Kdpm2,
        SchedulerKind::Kdpm2Ancestral => pb::Scheduler::Kdpm2Ancestral,
        SchedulerKind::Lms => pb::Scheduler::Lms,
        SchedulerKind::Ddim => pb::Scheduler::Ddim,
        SchedulerKind::DpmSolverMultistep => pb::Scheduler::DpmSolverMultistep,
        SchedulerKind::UniPc => pb::Scheduler::Unipc,
        SchedulerKind::Lcm => pb::Scheduler::Lcm,
        SchedulerKind::Tcd => pb::Scheduler::Tcd,
        SchedulerKind::DpmSolverSinglestep => pb::Scheduler::DpmSolverSinglestep,
    }
}

/// The contract's sigma schedule.
pub fn sigma_schedule(spacing: SigmaSpacing) -> pb::SigmaSchedule {
    match spacing {
        SigmaSpacing::Default => pb::SigmaSchedule::Default,
        SigmaSpacing::Karras => pb::SigmaSchedule::Karras,
        SigmaSpacing::Exponential => pb::SigmaSchedule::Exponential,
        SigmaSpacing::Beta => pb::SigmaSchedule::Beta,
    }
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn preview(image: EncodedImage) -> pb::Preview {
    pb::Preview {
        data: image.data,
        mime_type: image.mime_type.to_string(),
        width: image.width,
        height: image.height,
    }
}

/// A progress event.
pub fn progress(p: ProgressEvent) -> pb::JobProgress {
    pb::JobProgress {
        stage: stage(p.stage) as i32,
        step: p.step,
        total_steps: p.total,
        image_index: p.image_index,
        preview: p.preview.map(preview),
    }
}

/// A control map event.
pub fn control_map(c: ControlMapEvent) -> pb::ControlMapImage {
    pb::ControlMapImage {
        unit_index: c.unit_index,
        condition_index: c.condition_index,
        data: c.image.data,
        mime_type: c.image.mime_type.to_string(),
        width: c.image.width,
        height: c.image.height,
    }
}

/// An image event.
pub fn image(i: ImageEvent) -> pb::GeneratedImage {
    pb::GeneratedImage {
        index: i.index,
        seed: i.seed,
        variation_seed: i.variation_seed,
        data: i.image.data,
        mime_type: i.image.mime_type.to_string(),
        width: i.image.width,
        height: i.image.height,
        ready_after_ms: millis(i.ready_after),
    }
}

fn model_usage(m: ModelUsed) -> pb::ModelUsage {
    pb::ModelUsage {
        name: m.name,
        kind: model_kind(m.kind) as i32,
        sha256: m.sha256,
        weight: m.weight,
    }
}

/// The completed event of job `job_id`.
pub fn completed(job_id: &str, report: JobReport) -> pb::JobCompleted {
    pb::JobCompleted {
        job_id: job_id.to_string(),
        stage_timings: report
            .stage_timings
            .into_iter()
            .map(|(s, d)| pb::StageTiming {
                stage: stage(s) as i32,
                duration_ms: millis(d),
            })
            .collect(),
        total_ms: millis(report.total),
        peak_device_memory_bytes: report.peak_device_memory_bytes,
        models: report.models.into_iter().map(model_usage).collect(),
        warnings: report.warnings,
    }
}

/// For each of `count` images from `seed` on, the request that replays it: `resolved`
/// with that image's seed (and variation seed), one image, no client job id, as proto3
/// JSON.
pub fn replay_specs(
    resolved: &pb::GenerationSpec,
    (seed, variation): (u64, Option<SeedVariation>),
    count: u32,
) -> Vec<String> {
    let mut one = resolved.clone();
    one.num_images = 1;
    one.client_job_id.clear();
    (0..u64::from(count))
        .map(|i| {
            one.seed = Some(seed + i);
            if let (Some(asked), Some(resolved)) = (one.variation.as_mut(), variation) {
                asked.seed = Some(resolved.nth(i).seed);
            }
            crate::proto::spec_to_json(&one)
        })
        .collect()
}

/// Poses on the wire, keypoints as fractions of the canvas.
pub fn poses(set: &PoseSet) -> pb::Poses {
    let part = |points: &[PosePoint]| -> Vec<pb::PoseKeypoint> {
        points
            .iter()
            .map(|point| match point {
                Some((x, y)) => pb::PoseKeypoint {
                    x: *x,
                    y: *y,
                    missing: false,
                },
                None => pb::PoseKeypoint {
                    missing: true,
                    ..Default::default()
                },
            })
            .collect()
    };
    pb::Poses {
        canvas_width: set.width,
        canvas_height: set.height,
        people: set
            .people
            .iter()
            .map(|person| pb::PersonPose {
                body: part(&person.body),
                left_hand: part(&person.left_hand),
                right_hand: part(&person.right_hand),
                face: part(&person.face),
            })
            .collect(),
    }
}
