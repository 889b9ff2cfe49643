//! FBCNN, as spandrel runs it (`FBCNN/__arch/FBCNN.py`, the restored image of its pair):
//! the input replicated to multiples of 8; KAIR's U-Net with biases, whose lowest level
//! is an encoder's and a decoder's residual blocks; between them the quality-factor
//! predictor (its own blocks, a global average, three linear layers to a sigmoid), whose
//! value is embedded (three linear layers) into a scale (sigmoid) and a shift (tanh) per
//! channel for every block of each decoder level.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::Linear;
use crate::engine::upscale::kair::{blocks, through, ResBlock, Unet, UpLevels};
use crate::engine::upscale::layout::{Architecture, FBCNN_QF_WIDTH as QF};
use crate::engine::weights::VarPath;

/// The side FBCNN pads its input to a multiple of.
const MULTIPLE: i64 = 8;

/// A linear layer and the activation after it.
struct Dense(Linear, fn(&Tensor) -> Tensor);

impl Dense {
    fn load(
        vp: &VarPath,
        [input, output]: [i64; 2],
        activation: fn(&Tensor) -> Tensor,
    ) -> Result<Self> {
        Ok(Self(Linear::load(vp, input, output, true)?, activation))
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        (self.1)(&self.0.forward(x))
    }
}

/// A stack of dense layers applied in turn.
fn stack(layers: &[Dense], x: &Tensor) -> Tensor {
    layers
        .iter()
        .fold(x.shallow_clone(), |x, layer| layer.forward(&x))
}

/// FBCNN.
pub struct Fbcnn {
    unet: Unet,
    encoder: Vec<ResBlock>,
    decoder: Vec<ResBlock>,
    /// The predictor's blocks, and its layers after the global average.
    quality_blocks: Vec<ResBlock>,
    quality: [Dense; 3],
    embed: [Dense; 3],
    /// Each decoder level's scale and shift, lowest first.
    modulation: [[Dense; 2]; 3],
}

impl Fbcnn {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Fbcnn { channels, unet } = architecture else {
            unreachable!("an FBCNN architecture");
        };
        let (count, widths) = (unet.blocks, unet.widths);
        let lowest = widths[3];
        let relu: fn(&Tensor) -> Tensor = Tensor::relu;
        let predictor = vp.pp("qf_pred");
        // The predictor's sequence: the blocks, the pool and the flattening, then a
        // linear layer at every other entry.
        let linear =
            |i: i64, widths, activation| Dense::load(&predictor.pp(count + i), widths, activation);
        let embed = vp.pp("qf_embed");
        let level = |l: usize| -> Result<[Dense; 2]> {
            let width = widths[2 - l];
            let level = 3 - l;
            Ok([
                Dense::load(
                    &vp.pp(format!("to_gamma_{level}")).pp(0),
                    [QF, width],
                    Tensor::sigmoid,
                )?,
                Dense::load(
                    &vp.pp(format!("to_beta_{level}")).pp(0),
                    [QF, width],
                    Tensor::tanh,
                )?,
            ])
        };
        Ok(Self {
            unet: Unet::load(vp, [channels, channels], unet, true, UpLevels::Listed)?,
            encoder: blocks(&vp.pp("m_body_encoder"), 0, count, lowest, true)?,
            decoder: blocks(&vp.pp("m_body_decoder"), 0, count, lowest, true)?,
            quality_blocks: blocks(&predictor, 0, count, lowest, true)?,
            quality: [
                linear(2, [QF, QF], relu)?,
                linear(4, [QF, QF], relu)?,
                linear(6, [QF, 1], Tensor::sigmoid)?,
            ],
            embed: [
                Dense::load(&embed.pp(0), [1, QF], relu)?,
                Dense::load(&embed.pp(2), [QF, QF], relu)?,
                Dense::load(&embed.pp(4), [QF, QF], relu)?,
            ],
            modulation: [level(0)?, level(1)?, level(2)?],
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let pad = |side: i64| (MULTIPLE - side % MULTIPLE) % MULTIPLE;
        let padded = image.replication_pad2d([0, pad(width), 0, pad(height)]);
        let skips = self.unet.encode(&padded, between)?;
        let x = through(&self.encoder, skips[3].shallow_clone(), between)?;
        let pooled = through(&self.quality_blocks, x.shallow_clone(), between)?.mean_dim(
            [2, 3].as_slice(),
            false,
            None,
        );
        let quality = stack(&self.quality, &pooled);
        let x = through(&self.decoder, x, between)?;
        let embedding = stack(&self.embed, &quality);
        let modulation = self.modulation.each_ref().map(|pair| {
            pair.each_ref().map(|layer| {
                let y = layer.forward(&embedding);
                let channels = y.size()[1];
                y.view([-1, channels, 1, 1])
            })
        });
        let restored = self.unet.decode(x, &skips, Some(&modulation), between)?;
        Ok(restored.narrow(2, 0, height).narrow(3, 0, width))
    }
}
