//! Upscaler files spandrel cannot load or run, refused at load naming the tensor that
//! does not fit (the untouched fixture loading beside each): unknown layouts, layers of
//! shapes the reference cannot build or run, upsampler records it cannot take.

use std::path::{Path, PathBuf};

use sdxld::engine::upscale::Upscaler;
use tch::{Device, Kind, Tensor};

use crate::upscale::{cases, load};

#[test]
fn unknown_layouts_are_refused_naming_the_first_tensor_that_does_not_fit() {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tensors =
        Tensor::read_safetensors(root.join("models/rrdb_x4_old.safetensors")).expect("read");
    // ESRGAN+ adds 1x1 convolutions to the dense blocks: not served.
    tensors.push((
        "model.1.sub.0.RDB1.conv1x1.weight".into(),
        Tensor::zeros([32, 8, 1, 1], (Kind::Float, Device::Cpu)),
    ));
    let plus = dir.path().join("plus.safetensors");
    Tensor::write_safetensors(&tensors, &plus).expect("write");
    let error = Upscaler::load(&plus, Device::Cpu, Kind::Float)
        .err()
        .expect("refused");
    assert!(
        error
            .to_string()
            .contains("model.1.sub.0.RDB1.conv1x1.weight"),
        "{error}"
    );
    let other = dir.path().join("other.safetensors");
    let tensors = [(
        "encoder.weight",
        Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)),
    )];
    Tensor::write_safetensors(&tensors, &other).expect("write");
    let error = Upscaler::load(&other, Device::Cpu, Kind::Float)
        .err()
        .expect("refused");
    assert!(error.to_string().contains("encoder.weight"), "{error}");
    // SPAN with a stray tensor, SwinIR with a pixel-unshuffled input or an absolute
    // position embedding, HAT, DRCT and Swin2SR with one, Swin2SR with the
    // high-frequency branch (whose network returns three images).
    for (model, extra) in [
        ("span_x2_no_norm", "block_7.c1_r.sk.weight"),
        ("swinir_x3_direct", "conv_first.1.weight"),
        ("swinir_x2_pixelshuffle", "params_ema.absolute_pos_embed"),
        ("hat_x4_identity", "absolute_pos_embed"),
        ("drct_x4_identity", "absolute_pos_embed"),
        ("swin2sr_x2_aux", "absolute_pos_embed"),
        ("swin2sr_x4_nearest_3conv", "conv_after_body_hf.weight"),
    ] {
        let mut tensors =
            Tensor::read_safetensors(root.join(format!("models/{model}.safetensors")))
                .expect("read");
        tensors.push((
            extra.into(),
            Tensor::zeros([2, 8, 1, 1], (Kind::Float, Device::Cpu)),
        ));
        let path = dir.path().join(format!("{model}.safetensors"));
        Tensor::write_safetensors(&tensors, &path).expect("write");
        let error = Upscaler::load(&path, Device::Cpu, Kind::Float)
            .err()
            .expect("refused");
        assert!(error.to_string().contains(extra), "{model}: {error}");
    }
}

/// DAT's window is read from the first block's stored offsets: offsets that do not fit
/// its stored tables, or a window whose smaller side does not divide the larger (the
/// reference pads to the larger side, which the transposed windows must then fill), are
/// refused naming them.
#[test]
fn dat_windows_that_do_not_fit_are_refused_naming_the_offsets() {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    let source = root.join("models/dat_x4_direct_3conv.safetensors");
    let offsets = "layers.0.blocks.0.attn.attns.0.rpe_biases";
    let index = "layers.0.blocks.0.attn.attns.0.relative_position_index";
    let rewritten = |name: &str, replaced: Vec<(&str, Tensor)>| {
        rewrite(&source, &dir.path().join(name), replaced)
    };
    let stored = Tensor::read_safetensors(&source).expect("read");
    let original = &stored
        .iter()
        .find(|(n, _)| n == offsets)
        .expect("offsets")
        .1;
    // 4x4 windows whose last offset says 4x3.
    let wrong = original.copy();
    let _ = wrong.get(48).get(1).fill_(2.0);
    // 2x3 windows, tables and all.
    let grid: Vec<f32> = (-1..2)
        .flat_map(|dy| (-2..3).flat_map(move |dx| [dy as f32, dx as f32]))
        .collect();
    let two_by_three = Tensor::from_slice(&grid).view([15, 2]);
    let index_2x3 = Tensor::zeros([6, 6], (Kind::Int64, Device::Cpu));
    for path in [
        rewritten("mismatched.safetensors", vec![(offsets, wrong)]),
        rewritten(
            "indivisible.safetensors",
            vec![(offsets, two_by_three), (index, index_2x3)],
        ),
    ] {
        let error = Upscaler::load(&path, Device::Cpu, Kind::Float)
            .err()
            .expect("refused");
        assert!(error.to_string().contains(offsets), "{path:?}: {error}");
    }
    // The untouched file loads.
    load(&source);
}

/// `source`'s tensors written to `target` with each of `changes` replacing the tensor of
/// its name, or added where there is none.
pub(crate) fn rewrite(source: &Path, target: &Path, changes: Vec<(&str, Tensor)>) -> PathBuf {
    let mut tensors = Tensor::read_safetensors(source).expect("read");
    for (key, tensor) in changes {
        match tensors.iter_mut().find(|(n, _)| n == key) {
            Some(slot) => slot.1 = tensor,
            None => tensors.push((key.to_string(), tensor)),
        }
    }
    Tensor::write_safetensors(&tensors, target).expect("write");
    target.to_path_buf()
}

/// Layers spandrel cannot run are refused at load naming their tensor: PLKSR's large
/// kernels of even side (their output is a pixel larger than the channels they rewrite)
/// or over more channels than the block has,
/// a rectangular layer whose short side is even, a channel mixer of no known type, a
/// sparse layer with a fifth convolution (`use_max_kernel`, which spandrel cannot tell
/// from the file); MoSR's depthwise kernel of even side and one over more channels than
/// the hidden width has; DySample ending at other channels than the image's, or with
/// initial positions of another scale; Swin2SR's patches of more than a pixel and heads
/// that do not divide the width; DRCT's blocks with other heads than its
/// constructor gives them or heads that do not divide their width, and windows that do
/// not divide the 16-pixel padding; a fast Real-CUGAN flagged "pro"; RCAN's unshuffle
/// other than 2 or 4, upsampling rounds other than its constructor's and a channel
/// attention width its reduction does not give; OmniSR's width that is not whole quarters
/// and a position-bias table of no window's size; RGT's odd width, a window spandrel
/// finds no size for, heads that do not divide their half or the recursive attention's
/// narrow width, an upsampler other than 64 wide.
#[test]
fn layers_the_reference_cannot_run_are_refused_naming_their_tensor() {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let cases = [
        (
            "plksr_original_x2",
            "params_ema.feats.1.lk.conv.weight",
            zeros(&[4, 4, 8, 8]),
        ),
        ("plksr_x2", "feats.1.lk.conv.weight", zeros(&[4, 4, 6, 6])),
        // A large kernel over 20 channels of a 16-wide block.
        (
            "plksr_original_x2",
            "params_ema.feats.1.lk.conv.weight",
            zeros(&[20, 20, 9, 9]),
        ),
        (
            "plksr_original_x4_rectangular",
            "params.feats.1.lk.mn_conv.weight",
            zeros(&[3, 3, 7, 2]),
        ),
        (
            "plksr_original_x2",
            "params_ema.feats.1.channe_mixer.2.weight",
            zeros(&[16, 32, 5, 5]),
        ),
        (
            "plksr_original_x3_sparse",
            "feats.1.lk.convs.4.weight",
            zeros(&[6, 6, 5, 5]),
        ),
        (
            "mosr_x2",
            "params_ema.gblocks.1.conv.weight",
            zeros(&[16, 1, 6, 6]),
        ),
        (
            "mosr_x4_gps",
            "gblocks.1.conv.weight",
            zeros(&[30, 1, 5, 5]),
        ),
        // DySample ending at four channels; initial positions for another scale.
        (
            "mosr_x2_dysample",
            "params.upsampler.end_conv.weight",
            zeros(&[4, 16, 1, 1]),
        ),
        (
            "plksr_x4_dysample",
            "params_ema.to_img.init_pos",
            zeros(&[1, 8, 1, 1]),
        ),
        // A DRCT block of two heads where the constructor gives it one (its 20 channels
        // modulo 3 heads taken from 3); a 12-pixel window, which the padding to
        // multiples of 16 does not fit.
        (
            "drct_x4_identity",
            "layers.0.swin3.attn.relative_position_bias_table",
            zeros(&[225, 2]),
        ),
        (
            "drct_x1",
            "layers.0.swin1.attn.relative_position_bias_table",
            zeros(&[529, 2]),
        ),
        // Swin2SR with 2-pixel patches (its tokens would not fill the image) and with 5
        // heads over 12 channels.
        (
            "swin2sr_x2_aux",
            "patch_embed.proj.weight",
            zeros(&[12, 12, 2, 2]),
        ),
        (
            "swin2sr_x2",
            "params_ema.layers.1.residual_group.blocks.0.attn.logit_scale",
            zeros(&[5, 1, 1]),
        ),
        // A fast Real-CUGAN flagged "pro" (its constructor has no such buffer).
        ("realcugan_x2_fast", "pro", zeros(&[1])),
        // RCAN: a head over an image unshuffled by 3 (the constructor unshuffles by 2 or
        // 4), a single x4 round (it builds two x2 rounds), a channel attention of 3
        // over 8 channels (reduction 2 gives 4 back).
        ("rcan_x2_unshuffle", "head.1.weight", zeros(&[12, 27, 5, 5])),
        (
            "rcan_x4",
            "params_ema.tail.0.0.weight",
            zeros(&[256, 16, 3, 3]),
        ),
        (
            "rcan_x3",
            "params.body.0.body.0.body.3.conv_du.0.weight",
            zeros(&[3, 8, 1, 1]),
        ),
        // OmniSR 10 wide (its four channel-attention heads cannot split it) and with a
        // position-bias table of no window's size.
        ("omnisr_x2_profiled", "input.weight", zeros(&[10, 3, 3, 3])),
        (
            "omnisr_x4",
            "params_ema.residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight",
            zeros(&[50, 4]),
        ),
        // RGT 63 wide (the window pair halves the width), with offsets of no window
        // spandrel finds, 3 window heads over a 32-channel half, a recursive attention
        // 31 wide under 2 heads, a 32-wide upsampler (the constructor's is 64).
        ("rgt_x4_3conv", "conv_first.weight", zeros(&[63, 3, 3, 3])),
        (
            "rgt_x2",
            "params_ema.layers.0.blocks.0.attn.attns.0.rpe_biases",
            zeros(&[55, 2]),
        ),
        (
            "rgt_x3",
            "params.layers.1.blocks.0.attn.attns.0.pos.pos3.2.weight",
            zeros(&[3, 2]),
        ),
        (
            "rgt_x2",
            "params_ema.layers.0.blocks.1.attn.conv.weight",
            zeros(&[31, 64, 1, 1]),
        ),
        (
            "rgt_x4_3conv",
            "conv_before_upsample.0.weight",
            zeros(&[32, 64, 3, 3]),
        ),
        // A first block whose 3 heads do not divide its 16 channels.
        (
            "drct_x2",
            "params_ema.layers.1.swin1.attn.relative_position_bias_table",
            zeros(&[49, 3]),
        ),
    ];
    for (i, (model, key, tensor)) in cases.into_iter().enumerate() {
        let error = load_rewritten(dir.path(), i, model, key, tensor)
            .err()
            .expect("refused");
        let unwrapped = key
            .trim_start_matches("params_ema.")
            .trim_start_matches("params.");
        // Named as stored or unwrapped, whole (in backticks).
        let named = |name: &str| error.to_string().contains(&format!("`{name}`"));
        assert!(named(key) || named(unwrapped), "{model} {key}: {error}");
        // The untouched file loads.
        load(&root.join(format!("models/{model}.safetensors")));
    }
}

/// FDAT files spandrel cannot load are refused at load naming their tensor: an upsampler
/// record of no known upsampler, of a width other than the first convolution's (as
/// `pa_up` files at x2 and x4 write their inner width there), of a scale its upsampler
/// cannot take (nearest rounds at x5), or not in bytes; an unshuffle by 3; heads that do
/// not divide the width; an interaction width its reduction does not give back (6 of 16:
/// 16 // (16 // 6) is 8); DySample over a width its four groups do not divide.
#[test]
fn fdat_files_spandrel_cannot_load_are_refused_naming_their_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = |values: [u8; 7]| Tensor::from_slice(&values);
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    // The x4 file's record: version 3, transpose+conv (5), x4, 16 wide, RGB, 16 inside,
    // 4 groups.
    let meta = "params_ema.upsampler.MetaUpsample";
    let cases = [
        ("fdat_x4_transpose", meta, record([3, 8, 4, 16, 3, 16, 4])),
        ("fdat_x4_transpose", meta, record([3, 7, 4, 12, 3, 12, 4])),
        ("fdat_x4_transpose", meta, zeros(&[7])),
        (
            "fdat_x4_nearest",
            "params.upsampler.MetaUpsample",
            record([3, 3, 5, 8, 3, 8, 4]),
        ),
        (
            "fdat_x2_dysample",
            "upsampler.MetaUpsample",
            record([3, 4, 2, 16, 3, 6, 4]),
        ),
        (
            "fdat_x2_unshuffle_pixelshuffle",
            "conv_first.1.weight",
            zeros(&[12, 27, 3, 3]),
        ),
        (
            "fdat_x4_transpose",
            "params_ema.groups.0.blocks.0.attn.bias",
            zeros(&[3, 16, 16]),
        ),
        (
            "fdat_x4_transpose",
            "params_ema.groups.0.blocks.0.inter.cg.1.weight",
            zeros(&[6, 16, 1, 1]),
        ),
    ];
    // The file's own record, written again: it loads.
    let own = record([3, 5, 4, 16, 3, 16, 4]);
    let loaded = load_rewritten(dir.path(), 99, "fdat_x4_transpose", meta, own);
    assert!(loaded.is_ok(), "{:?}", loaded.err());
    assert_each_refused_naming_its_key(cases);
}

/// An FDAT group of an odd block count (spandrel builds whole pairs of a window and a
/// channel block) or of another count than the first group's (spandrel builds every
/// group as deep as the first) is refused naming the group's first block.
#[test]
fn fdat_groups_of_odd_or_unequal_depth_are_refused() {
    assert_refused_without(
        "fdat_x2_unshuffle_pixelshuffle",
        |name| name.starts_with("groups.0.blocks.3."),
        "groups.0.blocks.0.n1.weight",
    );
    assert_refused_without(
        "fdat_x4_transpose",
        |name| name.starts_with("params_ema.groups.1.blocks.1."),
        "groups.1.blocks.0.n1.weight",
    );
}

/// DITN files spandrel cannot load are refused at load naming their tensor: a
/// feed-forward projection of odd width (it is split in halves), an upsampler of no
/// square scale over three colours, a unit with other block counts than the first's.
#[test]
fn ditn_files_spandrel_cannot_load_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let cases = [
        (
            "ditn_x2",
            "UFONE.0.ITLs.0.ffn.project_in.weight",
            zeros(&[47, 12, 1, 1]),
        ),
        ("ditn_x3", "params.upsample.0.weight", zeros(&[24, 8, 3, 3])),
    ];
    assert_each_refused_naming_its_key(cases);
    assert_refused_without(
        "ditn_x4",
        |name| name.starts_with("params_ema.UFONE.1.SALs."),
        "UFONE.1.ITLs.0.attn.temperature",
    );
}

/// Each case's fixture `model` with its tensor `key` replaced by the case's tensor,
/// refused at load naming `key` (unwrapped of `params_ema.` or `params.`, whole, in
/// backticks).
fn assert_each_refused_naming_its_key<K: AsRef<str>>(
    cases: impl IntoIterator<Item = (&'static str, K, Tensor)>,
) {
    assert_each_refused_naming(cases.into_iter().map(|(model, key, tensor)| {
        let unwrapped = key
            .as_ref()
            .trim_start_matches("params_ema.")
            .trim_start_matches("params.")
            .to_string();
        (model, key, tensor, unwrapped)
    }));
}

/// Each case's fixture `model` with its tensor `key` replaced by the case's tensor,
/// refused at load naming the case's last tensor name (whole, in backticks).
fn assert_each_refused_naming<K: AsRef<str>, N: AsRef<str>>(
    cases: impl IntoIterator<Item = (&'static str, K, Tensor, N)>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (model, key, tensor, named)) in cases.into_iter().enumerate() {
        let key = key.as_ref();
        let error = load_rewritten(dir.path(), i, model, key, tensor)
            .err()
            .expect("refused")
            .to_string();
        let named = named.as_ref();
        assert!(
            error.contains(&format!("`{named}`")),
            "{model} {key}: {error}"
        );
    }
}

/// The fixture `model` with its tensor `key` replaced by `tensor` (or given it), written
/// as file `i` in `dir`, loaded.
fn load_rewritten(
    dir: &Path,
    i: usize,
    model: &str,
    key: &str,
    tensor: Tensor,
) -> sdxld::engine::error::Result<Upscaler> {
    let (root, _) = cases();
    let source = root.join(format!("models/{model}.safetensors"));
    let path = rewrite(
        &source,
        &dir.join(format!("{i}.safetensors")),
        vec![(key, tensor)],
    );
    Upscaler::load(&path, Device::Cpu, Kind::Float)
}

/// The fixture `model` without the tensors `dropped` picks, refused at load naming
/// `named` (in backticks); the untouched file loads.
fn assert_refused_without(model: &str, dropped: impl Fn(&str) -> bool, named: &str) {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    let source = root.join(format!("models/{model}.safetensors"));
    let kept: Vec<(String, Tensor)> = Tensor::read_safetensors(&source)
        .expect("read")
        .into_iter()
        .filter(|(name, _)| !dropped(name))
        .collect();
    let path = dir.path().join("reduced.safetensors");
    Tensor::write_safetensors(&kept, &path).expect("write");
    let error = Upscaler::load(&path, Device::Cpu, Kind::Float)
        .err()
        .expect("refused");
    assert!(error.to_string().contains(&format!("`{named}`")), "{error}");
    load(&source);
}

/// A DRCT without the convolutions after its body: spandrel builds it and returns the
/// input unchanged; refused at load naming the missing reconstruction.
#[test]
fn a_drct_without_reconstruction_layers_is_refused() {
    let dropped =
        |name: &str| name.starts_with("conv_before_upsample") || name.starts_with("conv_last");
    assert_refused_without("drct_x1", dropped, "conv_last");
}

/// An RCAN without upsampling convolutions: spandrel reads its width from them, takes 64
/// where there are none and cannot load a 16-wide network; refused at load naming the
/// head's convolution.
#[test]
fn a_narrow_rcan_without_upsampling_is_refused() {
    let dropped = |name: &str| name.starts_with("params_ema.tail.0.");
    assert_refused_without("rcan_x4", dropped, "head.0.weight");
}

/// SAFMN splits its width into four modulation levels: a width of 10 (each level's
/// convolution two channels wide, as the reference builds it) cannot be split so, and is
/// refused at load naming the first level's convolution.
#[test]
fn safmn_widths_its_four_levels_do_not_divide_are_refused() {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    // safmn_x1 is 8 wide: every dimension of 8 becomes 10.
    let source = root.join("models/safmn_x1.safetensors");
    let widened: Vec<(String, Tensor)> = Tensor::read_safetensors(&source)
        .expect("read")
        .into_iter()
        .map(|(name, tensor)| {
            let shape: Vec<i64> = tensor
                .size()
                .iter()
                .map(|&d| if d == 8 { 10 } else { d })
                .collect();
            (
                name,
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu)),
            )
        })
        .collect();
    let path = dir.path().join("ten.safetensors");
    Tensor::write_safetensors(&widened, &path).expect("write");
    let error = Upscaler::load(&path, Device::Cpu, Kind::Float)
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("feats.0.safm.mfr.0.weight"),
        "{error}"
    );
    load(&source);
}

/// MoESR files spandrel cannot load, or whose scale it would report other than it
/// computes, are refused at load naming their tensor: an upsampler record of an index
/// past MoESR's five, the plain convolution at x4 (the constructor makes every
/// convolution upsampler x1), nearest rounds at x5, one output channel from three input
/// ones, a record not in bytes; a width of no multiple of 4 (the multi-scale gate's
/// quarter); a gated block's projection of odd width or narrower than twice the
/// features; the gate's block of odd width.
#[test]
fn moesr_files_spandrel_cannot_load_are_refused_naming_their_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = |values: [u8; 7]| Tensor::from_slice(&values);
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    // The x4 file's record: version 1, pixelshuffledirect (1), x4, 16 wide, RGB out, 16
    // inside, 4 groups.
    let meta = "params_ema.upscale.MetaUpsample";
    let cases = [
        ("moesr_x4_direct", meta, record([1, 5, 4, 16, 3, 16, 4])),
        ("moesr_x4_direct", meta, record([1, 0, 4, 16, 3, 16, 4])),
        ("moesr_x4_direct", meta, record([1, 1, 4, 16, 1, 16, 4])),
        ("moesr_x4_direct", meta, zeros(&[7])),
        (
            "moesr_x4_nearest",
            "upscale.MetaUpsample",
            record([1, 3, 5, 8, 3, 8, 4]),
        ),
        (
            "moesr_x2_dysample",
            "in_to_dim.weight",
            zeros(&[10, 3, 3, 3]),
        ),
        (
            "moesr_x2_dysample",
            "blocks.0.blocks.0.fc1.weight",
            zeros(&[33, 16, 3, 3]),
        ),
        (
            "moesr_x3_pixelshuffle",
            "params.blocks.0.blocks.0.fc1.weight",
            zeros(&[16, 12, 3, 3]),
        ),
        (
            "moesr_x3_pixelshuffle",
            "params.blocks.0.msg.gated.0.fc1.weight",
            zeros(&[37, 12, 3, 3]),
        ),
    ];
    // The file's own record, written again: it loads.
    let own = record([1, 1, 4, 16, 3, 16, 4]);
    let loaded = load_rewritten(dir.path(), 99, "moesr_x4_direct", meta, own);
    assert!(loaded.is_ok(), "{:?}", loaded.err());
    assert_each_refused_naming_its_key(cases);
}

/// SAFMN BCIE files spandrel cannot load are refused at load naming their tensor: a
/// first convolution over no square unshuffle of three colours (13 channels), a width
/// of 10 that the four modulation levels do not divide. A Swift-SRGAN without the batch
/// norms its residual blocks have is refused naming the first one missing.
#[test]
fn safmn_bcie_and_swift_srgan_files_spandrel_cannot_load_are_refused() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let cases = [
        (
            "safmnbcie_u2",
            "params_ema.to_feat.1.weight",
            zeros(&[16, 13, 3, 3]),
            "to_feat.1.weight",
        ),
        (
            "safmnbcie_u1",
            "to_feat.1.weight",
            zeros(&[10, 3, 3, 3]),
            "feats.0.layers.0.safm.mfr.0.weight",
        ),
    ];
    assert_each_refused_naming(cases);
    assert_refused_without(
        "swiftsrgan_x2",
        |name| name.contains(".block1.bn."),
        "residual.0.block1.bn.weight",
    );
}

/// SeemoRe files spandrel cannot load or run are refused at load naming their tensor: a
/// first convolution over four channels (the reference shifts three channel means), an
/// upsampler of no square scale, a third expert of a width no growth rule gives (5), a
/// second expert of one (5, with no third), a striped kernel of even side; an expert
/// narrower than its growth rule's is refused naming it.
#[test]
fn seemore_files_spandrel_cannot_load_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let experts = "body.0.local_block.block.moe_layer.experts";
    let cases = [
        (
            "seemore_x4",
            "params_ema.conv_1.weight".to_string(),
            zeros(&[16, 4, 3, 3]),
        ),
        (
            "seemore_x4",
            "params_ema.upsampler.0.weight".to_string(),
            zeros(&[45, 16, 3, 3]),
        ),
        (
            "seemore_x4",
            format!("params_ema.{experts}.2.conv_1.weight"),
            zeros(&[5, 16, 1, 1]),
        ),
        (
            "seemore_x3_large",
            format!("params.{experts}.1.conv_1.weight"),
            zeros(&[5, 48, 1, 1]),
        ),
        (
            "seemore_x1",
            "body.0.global_block.block.attn.conv.0.weight".to_string(),
            zeros(&[8, 1, 1, 4]),
        ),
        (
            "seemore_x2_tiny",
            format!("{experts}.1.conv_1.weight"),
            zeros(&[3, 36, 1, 1]),
        ),
    ];
    assert_each_refused_naming_its_key(cases);
}

/// KAIR's networks spandrel cannot load or run are refused at load naming their tensor: a
/// DnCNN over five channels (neither the image's three nor FDnCNN's four), a DRUNet whose
/// head takes no noise-level channel, an FBCNN whose lowest level is narrower than its
/// 512-wide quality-factor layers; a DnCNN without its last convolution (a sequence no
/// count of layers gives) and an FBCNN without its lowest upsampler.
#[test]
fn kair_files_spandrel_cannot_load_or_run_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let cases = [
        ("dncnn_normed", "model.0.weight", zeros(&[16, 5, 3, 3])),
        ("drunet_strided", "m_head.weight", zeros(&[8, 3, 3, 3])),
        (
            "fbcnn",
            "m_body_encoder.0.res.0.weight",
            zeros(&[256, 256, 3, 3]),
        ),
    ];
    assert_each_refused_naming_its_key(cases);
    assert_refused_without(
        "dncnn_normed",
        |name| name.starts_with("model.14."),
        "model.12.weight",
    );
    assert_refused_without(
        "fbcnn",
        |name| name.starts_with("m_up3.0."),
        "m_up3.0.weight",
    );
}

/// A NAFNet with fewer upsamplers than levels (spandrel builds one per decoder level and
/// cannot load the file) is refused naming the first upsampler.
#[test]
fn a_nafnet_with_fewer_upsamplers_than_levels_is_refused() {
    assert_refused_without(
        "nafnet",
        |name| name.starts_with("ups.1."),
        "ups.0.0.weight",
    );
}

/// ATD files spandrel cannot load: an absolute position embedding (only for images of
/// the training size), upsampling convolutions of another width than the constructor's
/// 64, pixel-shuffle rounds or a direct upsampler of no scale it builds, a window index
/// of no square window, heads that do not divide the width; each refused naming the
/// tensor.
#[test]
fn atd_files_spandrel_cannot_load_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let table = "params_ema.layers.1.residual_group.layers.0.attn_win.relative_position_bias_table";
    let cases = [
        ("atd_x2_light", "absolute_pos_embed", zeros(&[1, 4096, 48])),
        (
            "atd_x3",
            "params_ema.conv_before_upsample.0.weight",
            zeros(&[32, 16, 3, 3]),
        ),
        (
            "atd_x3",
            "params_ema.upsample.0.weight",
            zeros(&[320, 64, 3, 3]),
        ),
        ("atd_x2_light", "upsample.0.weight", zeros(&[15, 48, 3, 3])),
        (
            "atd_x1_no_norm",
            "relative_position_index_SA",
            zeros(&[15, 15]),
        ),
        ("atd_x3", table, zeros(&[49, 3])),
    ];
    assert_each_refused_naming_its_key(cases);
}

/// DCTLSA files spandrel cannot load or run: a width its five heads do not divide, a
/// closing join over other than six modules' outputs, an upsampler of no square scale;
/// each refused naming the tensor.
#[test]
fn dctlsa_files_spandrel_cannot_load_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let cases = [
        ("dctlsa_x2", "fea_conv.weight", zeros(&[12, 3, 3, 3])),
        ("dctlsa_x2", "c.0.weight", zeros(&[10, 50, 1, 1])),
        ("dctlsa_x2", "upsampler.0.weight", zeros(&[50, 10, 3, 3])),
    ];
    assert_each_refused_naming_its_key(cases);
}

/// AuraSR files spandrel cannot run or would mislabel: a style network whose ratio (the
/// scale spandrel reports) is not the enlargement of its levels, one kernel per
/// convolution, heads' widths its eight heads do not divide, a first up level of another
/// width than the closing block's, a level's width the base width does not divide, skips
/// of other widths than their up level, a down path ending wider than the middle; each
/// refused naming the tensor.
#[test]
fn aura_sr_files_spandrel_cannot_run_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let cases = [
        ("aura_sr_x4", "style_network.net.0.weight", zeros(&[16, 8])),
        (
            "aura_sr_x4",
            "mid_block1.block1.proj.weights",
            zeros(&[1, 32, 32, 3, 3]),
        ),
        (
            "aura_sr_x4",
            "mid_attn.layers.0.0.to_out.weight",
            zeros(&[32, 12, 1, 1]),
        ),
        ("aura_sr_x4", "ups.4.1.0.conv.bias", zeros(&[16])),
        ("aura_sr_x4", "downs.0.1.1.weight", zeros(&[12, 16, 3, 3])),
        ("aura_sr_x4", "downs.2.1.1.weight", zeros(&[64, 32, 3, 3])),
    ];
    assert_each_refused_naming_its_key(cases);
    // The second down level twice as wide: the first up level's skips are not.
    assert_each_refused_naming([(
        "aura_sr_x4",
        "downs.1.1.1.weight",
        zeros(&[64, 16, 3, 3]),
        "ups.0.0.0.block1.proj.weights",
    )]);
}

/// CRAFT files spandrel cannot load or run: an odd width (the window blocks split it in
/// halves), heads that do not divide it or leave the window branches none, an index
/// whose length gives no window by spandrel's formula, a window side that does not
/// divide the reference's 16-pixel mirrored padding, an upsampler of no square scale;
/// each refused naming the tensor.
#[test]
fn craft_files_spandrel_cannot_run_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let temperature = "layers.0.residual_group.hf_blocks.0.attn.temperature";
    let refused = [
        (
            "craft_x2_identity",
            "conv_first.weight",
            zeros(&[95, 3, 3, 3]),
        ),
        ("craft_x2_identity", temperature, zeros(&[5, 1, 1])),
        ("craft_x2_identity", temperature, zeros(&[1, 1, 1])),
        (
            "craft_x2_identity",
            "relative_position_index_h",
            zeros(&[5, 5]),
        ),
        ("craft_x2_identity", "upsample.0.bias", zeros(&[10])),
        (
            "craft_x4",
            "params_ema.layers.1.residual_group.hf_blocks.0.attn.temperature",
            zeros(&[7, 1, 1]),
        ),
    ];
    assert_each_refused_naming_its_key(refused);
    // A 4×32 window: spandrel's formula finds it, but its 32 columns do not tile the
    // image the reference mirrors to a multiple of 16 (48 pixels, say).
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, _) = cases();
    let path = rewrite(
        &root.join("models/craft_x2_identity.safetensors"),
        &dir.path().join("wide.safetensors"),
        vec![
            ("relative_position_index_h", zeros(&[128, 128])),
            ("biases_v", zeros(&[441, 2])),
        ],
    );
    let error = Upscaler::load(&path, Device::Cpu, Kind::Float)
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("`relative_position_index_h`"), "{error}");
}

/// MMRealSR files spandrel cannot load or run: an x2 network (its first convolution
/// over the unshuffled channels, which the reference's degradation estimator is built
/// for but not given), three degradations (its forward pass takes two), estimator
/// blocks of another width with no convolution between, a convolution into another
/// width than the blocks after it, a last convolution that changes the width, a first
/// convolution of another width than the first blocks; each refused naming the tensor.
#[test]
fn mmrealsr_files_spandrel_cannot_run_are_refused_naming_their_tensor() {
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let one = "mmrealsr_x4_one_degradation";
    let refused = [
        (
            one,
            "conv_first.weight",
            zeros(&[12, 12, 3, 3]),
            "de_net.conv_first.0.weight",
        ),
        (
            "mmrealsr_x4",
            "params_ema.dd_embed.0.weight",
            zeros(&[512, 3]),
            "dd_embed.0.weight",
        ),
        (
            one,
            "de_net.body.0.1.conv1.weight",
            zeros(&[10, 8, 3, 3]),
            "de_net.body.0.1.conv1.weight",
        ),
        (
            one,
            "de_net.body.0.2.weight",
            zeros(&[12, 8, 3, 3]),
            "de_net.body.0.3.conv1.weight",
        ),
        (
            one,
            "de_net.body.0.4.weight",
            zeros(&[24, 16, 3, 3]),
            "de_net.body.0.4.weight",
        ),
        (
            one,
            "de_net.conv_first.0.weight",
            zeros(&[10, 3, 3, 3]),
            "de_net.body.0.0.conv1.weight",
        ),
    ];
    assert_each_refused_naming(refused);
}
