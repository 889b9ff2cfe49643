//! DRUNet, as spandrel runs it (`DRUNet/__arch/network_unet.py` and the descriptor's call):
//! KAIR's U-Net without biases over the image and spandrel's noise-level map (15/255),
//! its lowest level plain residual blocks.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::upscale::kair::{blocks, through, with_noise_map, ResBlock, Unet, UpLevels};
use crate::engine::upscale::layout::Architecture;
use crate::engine::weights::VarPath;

/// DRUNet.
pub struct DrUnet {
    unet: Unet,
    body: Vec<ResBlock>,
}

impl DrUnet {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::DrUnet { channels, unet } = architecture else {
            unreachable!("a DRUNet architecture");
        };
        let lowest = unet.widths[3];
        Ok(Self {
            unet: Unet::load(
                vp,
                [channels + 1, channels],
                unet,
                false,
                UpLevels::Flattened,
            )?,
            body: blocks(&vp.pp("m_body"), 0, unet.blocks, lowest, false)?,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let skips = self.unet.encode(&with_noise_map(image), between)?;
        let x = through(&self.body, skips[3].shallow_clone(), between)?;
        self.unet.decode(x, &skips, None, between)
    }
}
