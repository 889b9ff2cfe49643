//! DPT's reassembly of a ViT layer's patch grid into one level of its feature pyramid,
//! shared by Depth Anything and DPT (transformers' `DPTReassembleLayer` and the neck's
//! 3×3 convolution after it): a 1×1 projection, then a transposed convolution to
//! enlarge, nothing, or a strided 3×3 convolution to shrink, then the neck convolution to
//! the fusion width; and how the fusion brings a level to the fused map's size.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::weights::VarPath;

/// How a level reaches its resolution.
enum Resize {
    Up(Tensor, Tensor, i64),
    Same,
    Down(Conv2d),
}

/// One level: `neck.reassemble_stage.layers.{i}` and `neck.convs.{i}`.
pub struct ReassembleLevel {
    /// `None` where the level is a backbone's feature map taken as it is (DPT-Hybrid's
    /// first two levels).
    projection: Option<Conv2d>,
    resize: Resize,
    neck_conv: Tensor,
}

impl ReassembleLevel {
    /// Loads level `index` under `neck` from `hidden` channels to `width`, resized by
    /// `factor`, and its convolution to `fused` channels.
    pub fn load(
        neck: &VarPath,
        index: usize,
        (hidden, width, fused): (i64, i64, i64),
        factor: f64,
    ) -> Result<Self> {
        let layer = neck.pp(format!("reassemble_stage.layers.{index}"));
        let r = layer.pp("resize");
        let resize = if factor > 1.0 {
            let f = factor as i64;
            Resize::Up(
                r.get("weight", &[width, width, f, f])?,
                r.get("bias", &[width])?,
                f,
            )
        } else if factor == 1.0 {
            Resize::Same
        } else {
            Resize::Down(Conv2d::load(&r, width, width, 3, (1.0 / factor) as i64, 1)?)
        };
        Ok(Self {
            projection: Some(Conv2d::load(
                &layer.pp("projection"),
                hidden,
                width,
                1,
                1,
                0,
            )?),
            resize,
            neck_conv: neck.get(&format!("convs.{index}.weight"), &[fused, width, 3, 3])?,
        })
    }

    /// Level `index` as a feature map of `width` channels taken as it is, only its neck
    /// convolution to `fused` channels.
    pub fn direct(neck: &VarPath, index: usize, width: i64, fused: i64) -> Result<Self> {
        Ok(Self {
            projection: None,
            resize: Resize::Same,
            neck_conv: neck.get(&format!("convs.{index}.weight"), &[fused, width, 3, 3])?,
        })
    }

    /// The level of a [N, hidden, rows, columns] grid (of a [N, width, rows, columns]
    /// feature map for a direct level).
    pub fn forward(&self, grid: &Tensor) -> Tensor {
        let x = match &self.projection {
            Some(projection) => projection.forward(grid),
            None => grid.shallow_clone(),
        };
        let x = match &self.resize {
            Resize::Up(w, b, f) => {
                x.conv_transpose2d(w, Some(b), [*f, *f], [0, 0], [0, 0], 1, [1, 1])
            }
            Resize::Same => x,
            Resize::Down(conv) => conv.forward(&x),
        };
        x.conv2d::<&Tensor>(&self.neck_conv, None, [1, 1], [1, 1], [1, 1], 1)
    }
}

/// A finer level brought to the fused map's size where they differ (bilinear, corners
/// not aligned), as the fusion layers do before adding it.
pub fn resized_like(level: &Tensor, fused: &Tensor) -> Tensor {
    let s = fused.size();
    if level.size() == s {
        level.shallow_clone()
    } else {
        level.upsample_bilinear2d([s[2], s[3]], false, None, None)
    }
}
