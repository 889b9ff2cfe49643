//! `F.normalize` over the last dimension, as the attention networks' cosine and channel
//! attentions take it (Swin2SR, DAT, OmniSR, FDAT, DITN).

use tch::Tensor;

/// `F.normalize`'s epsilon.
const EPS: f64 = 1e-12;

/// `t` divided by its L2 norm over the last dimension, at least `EPS`.
pub fn unit_norm(t: &Tensor) -> Tensor {
    let norm = t.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
    t / norm.clamp_min(EPS)
}
