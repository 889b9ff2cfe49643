//! `sdxld convert`: a Lightning-style `.ckpt` (torch.save's zip with a pickle, written by
//! the fixture script from the single-file checkpoint plus a non-contiguous and a half
//! tensor) becomes a safetensors file with exactly the same tensors and dtypes. Files that
//! are not such archives are refused.

use crate::common;

use common::{fixtures, read_tensors};
use sdxld::engine::pipeline::{Placement, SdxlPipeline};
use tch::{Kind, Tensor};

#[test]
fn a_pickle_checkpoint_converts_to_the_same_tensors() {
    let dir = fixtures().join("tiny2");
    let out = tempfile::tempdir().expect("tempdir");
    let converted = out.path().join("converted.safetensors");
    common::cli::sdxld("convert")
        .arg(dir.join("tiny2-pickle.ckpt"))
        .arg(&converted)
        .succeeds();
    let original = read_tensors(&dir.join("single_file/tiny2-single.safetensors"));
    let got = read_tensors(&converted);
    assert_eq!(got.len(), original.len() + 2);
    for (name, tensor) in &original {
        assert!(got[name].equal(tensor), "{name} differs");
        assert_eq!(got[name].kind(), tensor.kind(), "{name}");
    }
    let transposed = Tensor::arange(12, (Kind::Float, tch::Device::Cpu))
        .reshape([3, 4])
        .tr();
    assert!(got["extra.transposed"].equal(&transposed));
    assert_eq!(got["extra.half"].kind(), Kind::Half);

    // A .ckpt carries no configs: the converted file's are inferred from its shapes with
    // SDXL's conventions for the rest, which this tiny model (8 norm groups) breaks; the
    // loader says which component of which file, and which key.
    let err = SdxlPipeline::load(&converted, Placement::cpu())
        .err()
        .expect("not SDXL's conventions");
    let message = err.to_string();
    assert!(
        message.contains("converted.safetensors#vae") && message.contains("norm_num_groups"),
        "{message}"
    );
}

#[test]
fn files_that_are_not_torch_archives_are_refused() {
    let out = tempfile::tempdir().expect("tempdir");
    let not_zip = out.path().join("legacy.ckpt");
    std::fs::write(&not_zip, b"\x80\x02}q\x00.").expect("write");
    let err =
        sdxld::convert::convert(&not_zip, &out.path().join("x.safetensors")).expect_err("refused");
    assert!(err.to_string().contains("legacy.ckpt"), "{err}");
    // A safetensors file is not a pickle archive either.
    let err = sdxld::convert::convert(
        &fixtures().join("tiny2/single_file/tiny2-single.safetensors"),
        &out.path().join("y.safetensors"),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("zip"), "{err}");
    assert!(!out.path().join("x.safetensors").exists());
}
