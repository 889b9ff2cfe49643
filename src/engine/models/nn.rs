//! The small layers every model is built from, loaded from diffusers keys.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::loading::weights::VarPath;

/// `torch.nn.Linear`.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` [out, in] and, when `bias`, `bias` [out].
    pub fn load(vp: &VarPath, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(vp.get("bias", &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `torch.nn.Conv2d` with a square kernel and bias.
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// Loads a `kernel`×`kernel` convolution.
    pub fn load(
        vp: &VarPath,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[out_channels, in_channels, kernel, kernel])?,
            bias: vp.get("bias", &[out_channels])?,
            stride,
            padding,
        })
    }

    /// Applies the convolution to an NCHW tensor.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// `torch.nn.GroupNorm` with affine parameters.
#[derive(Debug)]
pub struct GroupNorm {
    groups: i64,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl GroupNorm {
    /// Loads a group norm over `channels` channels.
    pub fn load(vp: &VarPath, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        if groups <= 0 || channels % groups != 0 {
            return Err(crate::engine::error::EngineError::InvalidRequest(format!(
                "group norm: {channels} channels are not divisible into {groups} groups"
            )));
        }
        Ok(Self {
            groups,
            weight: vp.get("weight", &[channels])?,
            bias: vp.get("bias", &[channels])?,
            eps,
        })
    }

    /// Normalises an N, C, ... tensor.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    dim: i64,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads a layer norm over a last dimension of size `dim`.
    pub fn load(vp: &VarPath, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            dim,
            weight: vp.get("weight", &[dim])?,
            bias: vp.get("bias", &[dim])?,
            eps,
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.Embedding`.
#[derive(Debug)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Loads a [count, dim] table.
    pub fn load(vp: &VarPath, count: i64, dim: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[count, dim])?,
        })
    }

    /// Looks up `ids`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Multi-head scaled dot-product attention on [batch, tokens, heads * head_dim] inputs.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    causal: bool,
) -> Tensor {
    let size = q.size();
    let (batch, q_len, inner) = (size[0], size[1], size[2]);
    let head_dim = inner / heads;
    let split = |t: &Tensor| {
        let len = t.size()[1];
        t.view([batch, len, heads, head_dim]).transpose(1, 2)
    };
    let out = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        causal,
        None,
        false,
    );
    out.transpose(1, 2).reshape([batch, q_len, inner])
}
