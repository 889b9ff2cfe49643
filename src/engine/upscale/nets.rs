//! The super-resolution networks, as spandrel runs them: RRDBNet (ESRGAN and
//! Real-ESRGAN, `ESRGAN/__arch/RRDB.py`) and SRVGGNetCompact (`Compact/__arch/SRVGG.py`)
//! here, SPAN in `span.rs`, PLKSR and RealPLKSR in `plksr.rs`, SAFMN in `safmn.rs`, MoSR in `mosr.rs`, SwinIR in `swinir.rs`, Swin2SR in `swin2sr.rs`, HAT in
//! `hat.rs`, ATD in `atd.rs`, DCTLSA in `dctlsa.rs`, CRAFT in `craft.rs`, MMRealSR in `mmrealsr.rs`, DAT in `dat.rs`, DRCT in `drct.rs`, SCUNet in `scunet.rs`, Real-CUGAN in `realcugan.rs`, RCAN in `rcan.rs`, OmniSR in `omnisr.rs`, RGT in `rgt.rs`, FDAT in `fdat.rs`, DITN in `ditn.rs`, SAFMN-BCIE in `safmn_bcie.rs`, MoESR in `moesr.rs`, Swift-SRGAN in `swiftsrgan.rs`, SeemoRe in `seemore.rs`, DnCNN in `dncnn.rs`, DRUNet in `drunet.rs`, FBCNN in `fbcnn.rs`, NAFNet in `nafnet.rs`, on NCHW images in [0, 1].

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::atd::Atd;
use crate::engine::upscale::aura_sr::{AuraSr, Draw};
use crate::engine::upscale::craft::Craft;
use crate::engine::upscale::dat::Dat;
use crate::engine::upscale::dctlsa::Dctlsa;
use crate::engine::upscale::dense_block::{
    conv3, load_rrdb_block, rrdb_block, DenseBlock, Reconstruction,
};
use crate::engine::upscale::ditn::Ditn;
use crate::engine::upscale::dncnn::DnCnn;
use crate::engine::upscale::drct::Drct;
use crate::engine::upscale::drunet::DrUnet;
use crate::engine::upscale::fbcnn::Fbcnn;
use crate::engine::upscale::fdat::Fdat;
use crate::engine::upscale::hat::Hat;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::mmrealsr::MmRealSr;
use crate::engine::upscale::moesr::MoEsr;
use crate::engine::upscale::mosr::MoSr;
use crate::engine::upscale::nafnet::NafNet;
use crate::engine::upscale::omnisr::OmniSr;
use crate::engine::upscale::plksr::Plksr;
use crate::engine::upscale::rcan::Rcan;
use crate::engine::upscale::realcugan::RealCugan;
use crate::engine::upscale::rgt::Rgt;
use crate::engine::upscale::safmn::Safmn;
use crate::engine::upscale::safmn_bcie::SafmnBcie;
use crate::engine::upscale::scunet::ScuNet;
use crate::engine::upscale::seemore::SeemoRe;
use crate::engine::upscale::span::Span;
use crate::engine::upscale::swiftsrgan::SwiftSrgan;
use crate::engine::upscale::swin2sr::Swin2Sr;
use crate::engine::upscale::swinir::SwinIr;
use crate::engine::weights::VarPath;

/// RRDBNet.
pub struct Rrdb {
    conv_first: Conv2d,
    body: Vec<[DenseBlock; 3]>,
    conv_body: Conv2d,
    reconstruction: Reconstruction,
    unshuffle: i64,
    upsamplings: i64,
}

impl Rrdb {
    fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Rrdb {
            channels,
            features,
            blocks,
            growth,
            upsamplings,
            unshuffle,
        } = architecture
        else {
            unreachable!("an RRDBNet architecture");
        };
        let input = channels * unshuffle * unshuffle;
        let body = (0..blocks)
            .map(|b| load_rrdb_block(&vp.pp("body").pp(b), features, growth))
            .collect::<Result<_>>()?;
        Ok(Self {
            conv_first: conv3(vp, "conv_first", input, features)?,
            body,
            conv_body: conv3(vp, "conv_body", features, features)?,
            reconstruction: Reconstruction::load(vp, features, channels, upsamplings)?,
            unshuffle,
            upsamplings,
        })
    }

    fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let (height, width) = (image.size()[2], image.size()[3]);
        let x = if self.unshuffle > 1 {
            let s = self.unshuffle;
            let pad = |n: i64| (s - n % s) % s;
            let (ph, pw) = (pad(height), pad(width));
            // Reflection needs more pixels than it pads; a one-pixel side is replicated.
            let padded = if ph == 0 && pw == 0 {
                image.shallow_clone()
            } else if height > ph && width > pw {
                image.reflection_pad2d([0, pw, 0, ph])
            } else {
                image.replication_pad2d([0, pw, 0, ph])
            };
            padded.pixel_unshuffle(s)
        } else {
            image.shallow_clone()
        };
        let features = self.conv_first.forward(&x);
        let trunk = in_turn(features.shallow_clone(), &self.body, between, rrdb_block)?;
        let y = self
            .reconstruction
            .forward(features + self.conv_body.forward(&trunk));
        let scale = (1 << self.upsamplings) / self.unshuffle;
        Ok(y.narrow(2, 0, height * scale).narrow(3, 0, width * scale))
    }
}

/// SRVGGNetCompact.
pub struct Compact {
    convs: Vec<Conv2d>,
    prelus: Vec<Tensor>,
    scale: i64,
}

impl Compact {
    fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Compact {
            channels,
            features,
            convs,
            scale,
        } = architecture
        else {
            unreachable!("a Compact architecture");
        };
        let body = vp.pp("body");
        let mut layers = vec![conv3(&body, "0", channels, features)?];
        let mut prelus = vec![body.pp(1).get("weight", &[features])?];
        for i in 0..convs {
            layers.push(conv3(&body, &(2 + 2 * i).to_string(), features, features)?);
            prelus.push(body.pp(3 + 2 * i).get("weight", &[features])?);
        }
        let last = (2 + 2 * convs).to_string();
        layers.push(conv3(&body, &last, features, channels * scale * scale)?);
        Ok(Self {
            convs: layers,
            prelus,
            scale,
        })
    }

    fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let mut y = image.shallow_clone();
        for (conv, prelu) in self.convs.iter().zip(&self.prelus) {
            between()?;
            y = conv.forward(&y).prelu(prelu);
        }
        let last = self.convs.last().map(|c| c.forward(&y)).unwrap_or(y);
        let size = image.size();
        let (h, w, s) = (size[2], size[3], self.scale);
        let base = image.upsample_nearest2d([h * s, w * s], s as f64, s as f64);
        Ok(last.pixel_shuffle(s) + base)
    }
}

/// A loaded super-resolution network.
pub enum Network {
    Rrdb(Rrdb),
    Compact(Compact),
    Span(Span),
    Plksr(Plksr),
    Safmn(Safmn),
    MoSr(Box<MoSr>),
    SwinIr(Box<SwinIr>),
    Swin2Sr(Box<Swin2Sr>),
    Hat(Box<Hat>),
    Atd(Box<Atd>),
    Dctlsa(Box<Dctlsa>),
    AuraSr(Box<AuraSr>),
    Craft(Box<Craft>),
    MmRealSr(Box<MmRealSr>),
    Dat(Box<Dat>),
    Drct(Box<Drct>),
    ScuNet(Box<ScuNet>),
    RealCugan(Box<RealCugan>),
    Rcan(Box<Rcan>),
    OmniSr(Box<OmniSr>),
    Rgt(Box<Rgt>),
    Fdat(Box<Fdat>),
    Ditn(Box<Ditn>),
    SafmnBcie(Box<SafmnBcie>),
    MoEsr(Box<MoEsr>),
    SwiftSrgan(Box<SwiftSrgan>),
    SeemoRe(Box<SeemoRe>),
    DnCnn(Box<DnCnn>),
    DrUnet(Box<DrUnet>),
    Fbcnn(Box<Fbcnn>),
    NafNet(Box<NafNet>),
}

impl Network {
    /// Loads `architecture` from `vp` (canonical names).
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        Ok(match architecture {
            Architecture::Rrdb { .. } => Network::Rrdb(Rrdb::load(vp, architecture)?),
            Architecture::Compact { .. } => Network::Compact(Compact::load(vp, architecture)?),
            Architecture::Span { .. } => Network::Span(Span::load(vp, architecture)?),
            Architecture::Plksr { .. } | Architecture::RealPlksr { .. } => {
                Network::Plksr(Plksr::load(vp, architecture)?)
            }
            Architecture::Safmn { .. } => Network::Safmn(Safmn::load(vp, architecture)?),
            Architecture::MoSr { .. } => Network::MoSr(Box::new(MoSr::load(vp, architecture)?)),
            Architecture::SwinIr { .. } => {
                Network::SwinIr(Box::new(SwinIr::load(vp, architecture)?))
            }
            Architecture::Swin2Sr { .. } => {
                Network::Swin2Sr(Box::new(Swin2Sr::load(vp, architecture)?))
            }
            Architecture::Hat { .. } => Network::Hat(Box::new(Hat::load(vp, architecture)?)),
            Architecture::Atd { .. } => Network::Atd(Box::new(Atd::load(vp, architecture)?)),
            Architecture::Dctlsa { .. } => {
                Network::Dctlsa(Box::new(Dctlsa::load(vp, architecture)?))
            }
            Architecture::AuraSr(_) => Network::AuraSr(Box::new(AuraSr::load(vp, architecture)?)),
            Architecture::Craft { .. } => Network::Craft(Box::new(Craft::load(vp, architecture)?)),
            Architecture::MmRealSr { .. } => {
                Network::MmRealSr(Box::new(MmRealSr::load(vp, architecture)?))
            }
            Architecture::Dat { .. } => Network::Dat(Box::new(Dat::load(vp, architecture)?)),
            Architecture::Drct { .. } => Network::Drct(Box::new(Drct::load(vp, architecture)?)),
            Architecture::ScuNet { .. } => {
                Network::ScuNet(Box::new(ScuNet::load(vp, architecture)?))
            }
            Architecture::RealCugan { .. } => {
                Network::RealCugan(Box::new(RealCugan::load(vp, architecture)?))
            }
            Architecture::Rcan { .. } => Network::Rcan(Box::new(Rcan::load(vp, architecture)?)),
            Architecture::OmniSr { .. } => {
                Network::OmniSr(Box::new(OmniSr::load(vp, architecture)?))
            }
            Architecture::Rgt { .. } => Network::Rgt(Box::new(Rgt::load(vp, architecture)?)),
            Architecture::Fdat { .. } => Network::Fdat(Box::new(Fdat::load(vp, architecture)?)),
            Architecture::Ditn { .. } => Network::Ditn(Box::new(Ditn::load(vp, architecture)?)),
            Architecture::SafmnBcie { .. } => {
                Network::SafmnBcie(Box::new(SafmnBcie::load(vp, architecture)?))
            }
            Architecture::MoEsr { .. } => Network::MoEsr(Box::new(MoEsr::load(vp, architecture)?)),
            Architecture::SwiftSrgan { .. } => {
                Network::SwiftSrgan(Box::new(SwiftSrgan::load(vp, architecture)?))
            }
            Architecture::SeemoRe { .. } => {
                Network::SeemoRe(Box::new(SeemoRe::load(vp, architecture)?))
            }
            Architecture::DnCnn { .. } => Network::DnCnn(Box::new(DnCnn::load(vp, architecture)?)),
            Architecture::DrUnet { .. } => {
                Network::DrUnet(Box::new(DrUnet::load(vp, architecture)?))
            }
            Architecture::Fbcnn { .. } => Network::Fbcnn(Box::new(Fbcnn::load(vp, architecture)?)),
            Architecture::NafNet { .. } => {
                Network::NafNet(Box::new(NafNet::load(vp, architecture)?))
            }
        })
    }

    /// The network on an NCHW batch in [0, 1] (no clamping), drawing any noise it takes
    /// from `draw`; `between` is asked between its blocks, and its error ends the pass.
    pub fn forward(
        &self,
        image: &Tensor,
        draw: &mut Draw<'_>,
        between: &mut Between<'_>,
    ) -> Result<Tensor> {
        match self {
            Network::AuraSr(n) => n.forward(image, draw, between),
            Network::Rrdb(n) => n.forward(image, between),
            Network::Compact(n) => n.forward(image, between),
            Network::Span(n) => n.forward(image, between),
            Network::Plksr(n) => n.forward(image, between),
            Network::Safmn(n) => n.forward(image, between),
            Network::MoSr(n) => n.forward(image, between),
            Network::SwinIr(n) => n.forward(image, between),
            Network::Swin2Sr(n) => n.forward(image, between),
            Network::Hat(n) => n.forward(image, between),
            Network::Atd(n) => n.forward(image, between),
            Network::Dctlsa(n) => n.forward(image, between),
            Network::Craft(n) => n.forward(image, between),
            Network::MmRealSr(n) => n.forward(image, between),
            Network::Dat(n) => n.forward(image, between),
            Network::Drct(n) => n.forward(image, between),
            Network::ScuNet(n) => n.forward(image, between),
            Network::RealCugan(n) => n.forward(image, between),
            Network::Rcan(n) => n.forward(image, between),
            Network::OmniSr(n) => n.forward(image, between),
            Network::Rgt(n) => n.forward(image, between),
            Network::Fdat(n) => n.forward(image, between),
            Network::Ditn(n) => n.forward(image, between),
            Network::SafmnBcie(n) => n.forward(image, between),
            Network::MoEsr(n) => n.forward(image, between),
            Network::SwiftSrgan(n) => n.forward(image, between),
            Network::SeemoRe(n) => n.forward(image, between),
            Network::DnCnn(n) => n.forward(image, between),
            Network::DrUnet(n) => n.forward(image, between),
            Network::Fbcnn(n) => n.forward(image, between),
            Network::NafNet(n) => n.forward(image, between),
        }
    }
}
