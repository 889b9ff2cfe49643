//! FreeU (Si et al., 2023) as diffusers applies it (`UNet2DConditionModel.enable_freeu`,
//! `utils/torch_utils.py`'s `apply_freeu` and `fourier_filter`): in the first two up
//! blocks, before each resnet, half of the backbone's channels are scaled up and the skip
//! features' lowest frequencies scaled down.

use tch::{Kind, Tensor};

/// FreeU's four factors (the published SDXL values are b1 1.3, b2 1.4, s1 0.9, s2 0.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreeU {
    /// Backbone factor of the first up block.
    pub b1: f64,
    /// Backbone factor of the second up block.
    pub b2: f64,
    /// Skip factor of the first up block.
    pub s1: f64,
    /// Skip factor of the second up block.
    pub s2: f64,
}

/// FreeU's factors for one up block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreeUStage {
    /// The backbone's first half of channels is multiplied by it.
    pub backbone: f64,
    /// The skip features' four lowest frequencies are multiplied by it.
    pub skip: f64,
}

impl FreeU {
    /// The factors of up block `index` (diffusers' `resolution_idx`): the first two only.
    pub fn stage(&self, index: usize) -> Option<FreeUStage> {
        match index {
            0 => Some(FreeUStage {
                backbone: self.b1,
                skip: self.s1,
            }),
            1 => Some(FreeUStage {
                backbone: self.b2,
                skip: self.s2,
            }),
            _ => None,
        }
    }
}

impl FreeUStage {
    /// The backbone `hidden` and the `skip` features an up block's resnet is about to
    /// concatenate, as `apply_freeu` leaves them.
    pub fn apply(&self, hidden: &Tensor, skip: &Tensor) -> (Tensor, Tensor) {
        let half = hidden.size()[1] / 2;
        let scaled = hidden.narrow(1, 0, half) * self.backbone;
        let rest = hidden.narrow(1, half, hidden.size()[1] - half);
        let hidden = Tensor::cat(&[scaled, rest], 1);
        (hidden, fourier_filter(skip, 1, self.skip))
    }
}

/// diffusers' `fourier_filter`: the centred 2·threshold square of the spectrum (in
/// float32) multiplied by `scale`.
fn fourier_filter(x: &Tensor, threshold: i64, scale: f64) -> Tensor {
    let kind = x.kind();
    let spectrum = x
        .to_kind(Kind::Float)
        .fft_fftn(None::<&[i64]>, [-2i64, -1].as_slice(), "backward")
        .fft_fftshift([-2i64, -1].as_slice());
    let size = spectrum.size();
    let (h, w) = (size[2], size[3]);
    let (row, col) = (h / 2, w / 2);
    let mask = Tensor::ones([h, w], (Kind::Float, x.device()));
    // Python's slice clamps: a start below 0 becomes 0.
    let (top, left) = ((row - threshold).max(0), (col - threshold).max(0));
    let (bottom, right) = ((row + threshold).min(h), (col + threshold).min(w));
    if bottom > top && right > left {
        let mut square = mask
            .narrow(0, top, bottom - top)
            .narrow(1, left, right - left);
        let _ = square.fill_(scale);
    }
    (spectrum * mask)
        .fft_ifftshift([-2i64, -1].as_slice())
        .fft_ifftn(None::<&[i64]>, [-2i64, -1].as_slice(), "backward")
        .real()
        .to_kind(kind)
}
