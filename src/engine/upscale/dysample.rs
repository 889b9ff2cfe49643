//! DySample, the learned upsampler of RealPLKSR's and MoSR's "dysample" files, as
//! spandrel runs it (`__arch_helpers/dysample.py`): each output pixel bilinearly samples
//! its group of input channels (border padding, corners not aligned) at its sub-pixel's
//! initial position plus an offset the features predict (a 1×1 convolution times the
//! sigmoid of another, halved); then an optional 1×1 convolution to the image.

use tch::{Kind, Tensor};

use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::weights::VarPath;

/// `grid_sampler`'s bilinear interpolation and border padding.
const BILINEAR: i64 = 0;
const BORDER: i64 = 1;

/// A loaded DySample.
pub struct DySample {
    offset: Conv2d,
    /// The scope's 1×1 convolution (no bias).
    scope: Tensor,
    /// Each sub-pixel's initial offsets, as the file stores them: [1, 2·groups·s², 1, 1].
    initial: Tensor,
    end: Option<Conv2d>,
    groups: i64,
    scale: i64,
}

impl DySample {
    /// DySample under `vp` from `input` channels in `groups` at `scale`, ending with a 1×1
    /// convolution to `output` channels where `end_convolution`.
    pub fn load(
        vp: &VarPath,
        [input, output]: [i64; 2],
        groups: i64,
        scale: i64,
        end_convolution: bool,
    ) -> Result<Self> {
        let offsets = 2 * groups * scale * scale;
        Ok(Self {
            offset: Conv2d::load(&vp.pp("offset"), input, offsets, 1, 1, 0)?,
            scope: vp.pp("scope").get("weight", &[offsets, input, 1, 1])?,
            initial: vp.get("init_pos", &[1, offsets, 1, 1])?,
            end: end_convolution
                .then(|| Conv2d::load(&vp.pp("end_conv"), input, output, 1, 1, 0))
                .transpose()?,
            groups,
            scale,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let scope = x.conv2d::<&Tensor>(&self.scope, None, [1, 1], [0, 0], [1, 1], 1);
        let offset = self.offset.forward(x) * scope.sigmoid() * 0.5 + &self.initial;
        let size = offset.size();
        let (batch, height, width) = (size[0], size[2], size[3]);
        let offset = offset.view([batch, 2, -1, height, width]);
        let options = (x.kind(), x.device());
        // Each pixel's centre: x (the column) first, then y.
        let centres = |count: i64| Tensor::arange(count, (Kind::Float, x.device())) + 0.5;
        let columns = centres(width)
            .view([1, 1, 1, 1, width])
            .expand([1, 1, 1, height, width], false);
        let rows = centres(height)
            .view([1, 1, 1, height, 1])
            .expand([1, 1, 1, height, width], false);
        let centre = Tensor::cat(&[columns, rows], 1).to_kind(options.0);
        let extent = Tensor::from_slice(&[width as f32, height as f32])
            .to_kind(options.0)
            .to_device(options.1)
            .view([1, 2, 1, 1, 1]);
        let coords = (centre + offset) * 2.0 / extent - 1.0;
        let (s, groups) = (self.scale, self.groups);
        let grid = coords
            .reshape([batch, -1, height, width])
            .pixel_shuffle(s)
            .view([batch, 2, -1, s * height, s * width])
            .permute([0, 2, 3, 4, 1])
            .contiguous()
            .flatten(0, 1);
        let sampled = x
            .reshape([batch * groups, -1, height, width])
            .grid_sampler(&grid, BILINEAR, BORDER, false)
            .view([batch, -1, s * height, s * width]);
        match &self.end {
            Some(end) => end.forward(&sampled),
            None => sampled,
        }
    }
}
