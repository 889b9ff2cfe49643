//! A ControlNet unit's `pixel_perfect` (A1111's "Pixel Perfect"): each image with a
//! preprocessor is detected at sd-webui-controlnet's pixel-perfect resolution for the
//! output size and resize mode, so the image equals the one made with that resolution
//! sent as `detect_resolution`; the PNG records it and replays; a resolution set beside
//! it, or computed out of range or beyond what detection may take, is refused by name.

use crate::common;

use common::png_parameters;
use common::server::TestServer;
use sdxld::proto::v1 as pb;

/// The pixels of an encoded image (its metadata aside).
fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png)
        .expect("an image")
        .to_rgb8()
        .into_raw()
}

/// A `width`×`height` drawing of sharp-edged elliptic rings, whose edges move with the
/// resolution it is detected at, as PNG bytes.
fn photo(width: u32, height: u32) -> Vec<u8> {
    let drawing = image::RgbImage::from_fn(width, height, |x, y| {
        let (x, y) = (u64::from(x), u64::from(y));
        let ring = (x * x + 3 * y * y + 5 * x * y / 2) / 97;
        let level = if ring % 2 == 0 { 230 } else { 20 };
        image::Rgb([level, (level + (x % 7) as u8 * 3), 255 - level])
    });
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(drawing)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    png
}

fn canny(detect_resolution: u32) -> Option<pb::PreprocessorParams> {
    Some(pb::PreprocessorParams {
        low_threshold: Some(60),
        high_threshold: Some(140),
        detect_resolution,
        ..Default::default()
    })
}

/// A 128×64 generation with one Canny unit of `model` on `image`.
fn spec(model: &str, image: Vec<u8>, resize: pb::ResizeMode) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a red apple on a table".into(),
        width: 128,
        height: 64,
        steps: 3,
        seed: Some(11),
        controlnets: vec![pb::ControlNetUnit {
            model: model.into(),
            image,
            preprocessor: pb::Preprocessor::Canny as i32,
            preprocessor_params: canny(0),
            resize_mode: resize as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn pixel_perfect(mut spec: pb::GenerationSpec) -> pb::GenerationSpec {
    spec.controlnets[0].pixel_perfect = true;
    spec
}

fn detected_at(mut spec: pb::GenerationSpec, resolution: u32) -> pb::GenerationSpec {
    spec.controlnets[0].preprocessor_params = canny(resolution);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixel_perfect_units_detect_at_sd_webui_controlnets_resolution() {
    let server = TestServer::with_pipelines_and_controlnets().await;
    let model = "tiny2/from_unet";
    // A 96×67 image on a 128×64 output: covered at 89 (64/67 against 128/96, the larger
    // times 67), fitted inside at 64 (the smaller).
    for (resize, resolution) in [
        (pb::ResizeMode::JustResize, 89),
        (pb::ResizeMode::CropAndResize, 89),
        (pb::ResizeMode::ResizeAndFill, 64),
    ] {
        let what = format!("{resize:?}");
        let base = spec(model, photo(96, 67), resize);
        let perfect = server
            .images(pixel_perfect(base.clone()))
            .await
            .expect(&what);
        let given = server
            .images(detected_at(base.clone(), resolution))
            .await
            .expect(&what);
        let image = pixels(&perfect.images[0].data);
        assert!(image == pixels(&given.images[0].data), "{what}");
        let plain = server.images(base.clone()).await.expect(&what);
        assert!(image != pixels(&plain.images[0].data), "{what}");
        let text = png_parameters(&perfect.images[0].data);
        let entry = format!("Processor Res: {resolution},");
        assert!(text.contains(&entry), "{what}: {text}");
        assert!(
            text.contains("Pixel Perfect: True, Control Mode: Balanced"),
            "{text}"
        );
        assert!(!png_parameters(&given.images[0].data).contains("Pixel Perfect"));
        let replayed = server.assert_replays(&what, pixel_perfect(base)).await;
        assert!(replayed.controlnets[0].pixel_perfect, "{what}");
    }
    // Without a preprocessor it changes nothing, nor with those A1111 gives no
    // resolution (tile resampling, invert, recolor); a blur takes one.
    let filters = [
        (pb::Preprocessor::None, true),
        (pb::Preprocessor::TileResample, true),
        (pb::Preprocessor::Invert, true),
        (pb::Preprocessor::RecolorLuminance, true),
        (pb::Preprocessor::RecolorIntensity, true),
        (pb::Preprocessor::Blur, false),
    ];
    for (preprocessor, unchanged) in filters {
        let mut unit = spec(model, photo(96, 67), pb::ResizeMode::JustResize);
        unit.controlnets[0].preprocessor = preprocessor as i32;
        unit.controlnets[0].preprocessor_params = Some(pb::PreprocessorParams {
            down_sampling_rate: (preprocessor == pb::Preprocessor::TileResample).then_some(2.0),
            blur_sigma: (preprocessor == pb::Preprocessor::Blur).then_some(1.5),
            ..Default::default()
        });
        let what = format!("{preprocessor:?}");
        let with = server
            .images(pixel_perfect(unit.clone()))
            .await
            .expect(&what);
        let without = server.images(unit).await.expect(&what);
        let same = pixels(&with.images[0].data) == pixels(&without.images[0].data);
        assert_eq!(same, unchanged, "{what}");
        let text = png_parameters(&with.images[0].data);
        assert_eq!(text.contains("Processor Res"), !unchanged, "{what}: {text}");
    }
}

/// A union unit's more conditions are fitted each by its own size: a 50×80 image
/// cropped onto 128×64 is covered at 128.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixel_perfect_fits_each_condition_of_a_union_unit() {
    let server = TestServer::with_pipelines_and_controlnets().await;
    let mut base = spec("tiny2/union", photo(96, 67), pb::ResizeMode::CropAndResize);
    base.controlnets[0].more_conditions = vec![pb::UnionCondition {
        image: photo(50, 80),
        control_type: pb::ControlType::Depth as i32,
        preprocessor: pb::Preprocessor::Canny as i32,
        preprocessor_params: canny(0),
        ..Default::default()
    }];
    let perfect = server
        .images(pixel_perfect(base.clone()))
        .await
        .expect("union");
    let mut given = detected_at(base, 89);
    given.controlnets[0].more_conditions[0].preprocessor_params = canny(128);
    let given = server.images(given).await.expect("union");
    assert!(pixels(&perfect.images[0].data) == pixels(&given.images[0].data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixel_perfect_refusals_name_the_field_at_fault() {
    let server = TestServer::with_pipelines_and_controlnets().await;
    let model = "tiny2/from_unet";
    let unit = "spec.controlnets[0]";
    // A resolution of the client's beside it.
    let both = detected_at(
        pixel_perfect(spec(model, photo(96, 67), pb::ResizeMode::JustResize)),
        128,
    );
    let detect = format!("{unit}.preprocessor_params.detect_resolution");
    server.assert_invalid("both", both, &[&detect]).await;
    let field = format!("{unit}.pixel_perfect");
    // A 1000×10 strip fitted inside 128×64 computes 1 (below 64).
    let strip = pixel_perfect(spec(model, photo(1000, 10), pb::ResizeMode::ResizeAndFill));
    server.assert_invalid("strip", strip, &[&field]).await;
    // A 2×4000 strip covering it computes 128, which would detect on 128×256000 pixels:
    // the preprocessor's own rule, told against pixel_perfect.
    let tall = pixel_perfect(spec(model, photo(2, 4000), pb::ResizeMode::JustResize));
    let status = server.images(tall).await.expect_err("tall");
    assert_eq!(
        common::server::violated_fields(&status),
        std::slice::from_ref(&field)
    );
    let told = format!("`{field}` (a detect resolution of 128) would resize the 2x4000 image");
    assert!(status.message().contains(&told), "{}", status.message());
    // Both at once: the strip's other bad field is still named.
    let mut strip = pixel_perfect(spec(model, photo(1000, 10), pb::ResizeMode::ResizeAndFill));
    strip.controlnets[0].preprocessor_params = Some(pb::PreprocessorParams {
        high_threshold: Some(300),
        ..Default::default()
    });
    let high = format!("{unit}.preprocessor_params.high_threshold");
    server
        .assert_invalid("strip", strip, &[&field, &high])
        .await;
}
