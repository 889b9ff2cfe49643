//! Seed variations (A1111's "Variation seed", "Variation strength" and "Resize seed
//! from") over gRPC and the CLI: equal to diffusers' pipelines whose starting noise is
//! varied as A1111's `ImageRNG.first` varies it (`tests/fixtures/make_variation_fixtures.py`),
//! written into the PNG parameters as A1111 writes them, replayed, and checked before
//! admission naming their fields.

use crate::common;

use common::server::TestServer;
use common::{assert_images_match, fixtures, read_tensors, variation_fixtures, Case};
use sdxld::proto::v1 as pb;

fn cases(config: &str) -> Vec<Case> {
    common::cases_at(&variation_fixtures().join(config).join("cases.json"))
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn scheduler(name: &str) -> pb::Scheduler {
    match name {
        "euler" => pb::Scheduler::Euler,
        "euler_a" => pb::Scheduler::EulerAncestral,
        "dpm" => pb::Scheduler::DpmSolverMultistep,
        other => panic!("scheduler {other}"),
    }
}

/// The variation a case lists.
fn variation_of(case: &Case) -> pb::SeedVariation {
    let v = &case["variation"];
    let resize_from = v["resize_from"].as_array().map(|size| pb::Size {
        width: size[0].as_u64().expect("width") as u32,
        height: size[1].as_u64().expect("height") as u32,
    });
    pb::SeedVariation {
        seed: v["seed"].as_u64(),
        strength: v["strength"].as_f64().expect("strength") as f32,
        resize_from,
    }
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Case) -> pb::GenerationSpec {
    let dir = fixtures().join(config);
    let kind = case.text("kind");
    let strength = Some(case.float("strength") as f32);
    let init_image = matches!(kind, "img2img" | "inpaint").then(|| pb::InitImage {
        image: read(&dir.join("init.png")),
        mask: match kind {
            "inpaint" => read(&dir.join("mask.png")),
            _ => Vec::new(),
        },
        strength,
        ..Default::default()
    });
    let hires = (kind == "hires").then(|| pb::HiresPass {
        scale: Some(case.float("scale") as f32),
        latent_upscale: pb::LatentUpscale::Bilinear as i32,
        strength,
        ..Default::default()
    });
    let refiner = (kind == "refiner").then(|| pb::RefinerStage {
        model: format!("{config}/refiner"),
        mode: pb::RefinerMode::Img2img as i32,
        strength,
        scheduler: pb::Scheduler::Euler as i32,
        ..Default::default()
    });
    let size = |key: &str| match kind {
        "img2img" => 0,
        _ => case.int(key) as u32,
    };
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: case.text("prompt").into(),
        seed: Some(case.int("seed")),
        steps: case.int("steps") as u32,
        num_images: case.int("n") as u32,
        width: size("width"),
        height: size("height"),
        guidance_scale: Some(5.0),
        scheduler: scheduler(case.text("scheduler")) as i32,
        init_image,
        hires,
        refiner,
        variation: Some(variation_of(case)),
        ..Default::default()
    }
}

/// Every recorded case over gRPC: text to image (two images; an ancestral scheduler
/// with a larger resized seed; DPM++ with only a resized seed, an odd difference),
/// image to image (two images, ancestral), inpainting, a hires pass (both passes
/// varied, the seed resized to the first pass's size), an img2img-mode refiner (its
/// noise varied too, two images) on tiny2 (VAE factor 8), and on
/// tiny3 (factor 4) a resized variation on two images and full strength under DPM++
/// image to image: latents within 1e-3, images within two levels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_variations_match_a1111_on_diffusers() {
    let server = TestServer::with_pipelines(&[]).await;
    server.assert_feature("variation").await;
    let mut checked = 0;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&variation_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let name = format!("{config} {} {}", case.name(), case.text("kind"));
            let spec = spec_of(config, &case);
            server
                .assert_matches_case(&name, spec, &reference, case.name())
                .await;
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

/// Case 0 of tiny2 (Euler, two images, strength 0.3).
fn first_case() -> pb::GenerationSpec {
    spec_of("tiny2", &cases("tiny2")[0])
}

/// Each image reports its own variation seed, which its parameters carry as A1111 writes
/// it, and its PNG replays it byte for byte; variation seeds the server draws are
/// reported in the accepted event and by each image, and replay too; the variation
/// moves the image; strength 1 under Euler is the variation seed's own image and
/// strength 0 the seed's, which reports and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variation_is_written_replayed_and_reaches_its_ends() {
    let server = TestServer::with_pipelines(&[]).await;
    let spec = first_case();
    let done = server.images(spec.clone()).await.expect("varied");
    for (i, image) in done.images.iter().enumerate() {
        assert_eq!(image.variation_seed, Some(500 + i as u64));
        let parameters = common::png_parameters(&image.data);
        let entry = format!("Variation seed: {}, Variation seed strength: 0.3", 500 + i);
        assert!(parameters.contains(&entry), "image {i}: {parameters}");
        assert!(!parameters.contains("Seed resize from"), "{parameters}");
        let replay = server
            .images(common::png_spec(&image.data))
            .await
            .expect("replay");
        assert_eq!(replay.images[0].data, image.data, "image {i} replays");
    }
    let plain = pb::GenerationSpec {
        variation: None,
        ..spec.clone()
    };
    let plain_images = server.images(plain.clone()).await.expect("plain").images;
    let moved = common::image_difference(
        &common::decoded_image(&done.images[0].data),
        &common::decoded_image(&plain_images[0].data),
    );
    assert!(
        moved > 10,
        "a variation of 0.3 moves the image by {moved} levels only"
    );

    let with = |variation: pb::SeedVariation| pb::GenerationSpec {
        num_images: 1,
        variation: Some(variation),
        ..spec.clone()
    };
    let full = with(pb::SeedVariation {
        seed: Some(500),
        strength: 1.0,
        resize_from: None,
    });
    let full = server.images(full).await.expect("full strength").images;
    let of_500 = pb::GenerationSpec {
        seed: Some(500),
        num_images: 1,
        ..plain.clone()
    };
    let of_500 = server.images(of_500).await.expect("seed 500").images;
    assert_eq!(
        common::decoded_image(&full[0].data),
        common::decoded_image(&of_500[0].data),
        "strength 1 is the variation seed's image"
    );
    let none = with(pb::SeedVariation {
        seed: Some(500),
        strength: 0.0,
        resize_from: None,
    });
    let none = server.images(none).await.expect("strength 0").images;
    assert_eq!(
        common::decoded_image(&none[0].data),
        common::decoded_image(&plain_images[0].data)
    );
    assert!(!common::png_parameters(&none[0].data).contains("Variation"));
    assert_eq!(none[0].variation_seed, None);

    let drawn = pb::GenerationSpec {
        num_images: 2,
        ..with(pb::SeedVariation {
            seed: None,
            strength: 0.5,
            resize_from: Some(pb::Size {
                width: 80,
                height: 64,
            }),
        })
    };
    let request = tonic::Request::new(pb::GenerateRequest { spec: Some(drawn) });
    let (events, end) = server.stream(request).await;
    end.expect("drawn");
    let reported = events.iter().find_map(|e| match e {
        pb::generate_response::Event::Accepted(a) => Some(a.variation_seeds.clone()),
        _ => None,
    });
    let reported = reported.expect("an accepted event");
    assert_eq!(reported.len(), 2);
    assert_eq!(reported[1], reported[0] + 1);
    let drawn: Vec<pb::GeneratedImage> = events
        .into_iter()
        .filter_map(|e| match e {
            pb::generate_response::Event::Image(image) => Some(image),
            _ => None,
        })
        .collect();
    assert_eq!(drawn.len(), 2);
    for image in &drawn {
        let seed = reported[image.index as usize];
        assert_eq!(image.variation_seed, Some(seed));
        let parameters = common::png_parameters(&image.data);
        let entry = format!(
            "Variation seed: {seed}, Variation seed strength: 0.5, Seed resize from: 80x64"
        );
        assert!(parameters.contains(&entry), "{parameters}");
        let replayed = common::png_spec(&image.data);
        assert_eq!(replayed.variation.and_then(|v| v.seed), Some(seed));
        let again = server.images(replayed).await.expect("replay");
        assert_eq!(again.images[0].data, image.data);
    }
}

/// Bad variations are refused before admission naming each field, and the server
/// serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_variations_are_refused_naming_each_field() {
    let server = TestServer::with_pipelines(&[]).await;
    let spec = first_case();
    let with = |variation: pb::SeedVariation| pb::GenerationSpec {
        variation: Some(variation),
        ..spec.clone()
    };
    let strength = |strength: f32| pb::SeedVariation {
        seed: Some(1),
        strength,
        resize_from: None,
    };
    for bad in [f32::NAN, f32::INFINITY, -0.1, 1.01] {
        let what = format!("strength {bad}");
        server
            .assert_invalid(&what, with(strength(bad)), &["spec.variation.strength"])
            .await;
    }
    let resized = |width: u32, height: u32| pb::SeedVariation {
        resize_from: Some(pb::Size { width, height }),
        ..strength(0.5)
    };
    let cases = [
        (resized(60, 64), vec!["spec.variation.resize_from.width"]),
        (resized(64, 0), vec!["spec.variation.resize_from.height"]),
        (
            resized(100_000, 56),
            vec![
                "spec.variation.resize_from.width",
                "spec.variation.resize_from.height",
            ],
        ),
    ];
    for (variation, fields) in cases {
        let what = format!("{:?}", variation.resize_from);
        server.assert_invalid(&what, with(variation), &fields).await;
    }
    // Two images whose last variation seed would pass 2^53 - 1.
    let last = pb::SeedVariation {
        seed: Some((1 << 53) - 1),
        ..strength(0.5)
    };
    server
        .assert_invalid("seed", with(last), &["spec.variation.seed"])
        .await;
    server.images(spec).await.expect("the server serves on");
}

/// `sdxld generate --variation-seed/--variation-strength/--resize-seed-from` equals the
/// recorded case, and a variation seed alone is refused.
#[test]
fn variations_over_the_cli_equal_the_recipe() {
    use common::cli::sdxld;

    let case = &cases("tiny2")[1];
    let reference = read_tensors(&variation_fixtures().join("tiny2/cases.safetensors"));
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("varied.png");
    let generate = || {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny2/pipeline"))
            .args(["--prompt", case.text("prompt")])
            .args(["--width", "64", "--height", "64", "--guidance", "5"])
            .args(["--scheduler", "euler-ancestral"])
            .args(["--seed", &case.int("seed").to_string()])
            .args(["--steps", &case.int("steps").to_string()])
            .args(["--variation-seed", "77"])
    };
    generate()
        .args(["--variation-strength", "0.7", "--resize-seed-from", "96x80"])
        .flag("--output", &png)
        .succeeds();
    assert_images_match(
        "CLI variation",
        &common::image_file(&png),
        &reference[&format!("{}.images", case.name())].get(0),
    );
    let refused = generate().flag("--output", &png).fails();
    assert!(refused.contains("--variation-strength"), "{refused}");
}
