//! An upscaler's architecture and hyperparameters as its layout tells them (what follows
//! from them, as spandrel's model descriptor tells it, is in `descriptor.rs`; the
//! activations a tile needs in `activations.rs`).

use super::{
    AuraShape, ChannelMixer, ExpertGrowth, KairUnet, LargeKernel, MoSrUpsampler, SwinUpsampler,
    UniUpsampler,
};

/// An upscaler's architecture and its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// RRDBNet: residual-in-residual dense blocks, nearest ×2 upsampling rounds.
    Rrdb {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`num_feat`).
        features: i64,
        /// RRDB blocks (`num_block`).
        blocks: i64,
        /// Dense-block growth (`num_grow_ch`).
        growth: i64,
        /// Nearest ×2 upsampling rounds.
        upsamplings: i64,
        /// Pixel-unshuffle factor of the input (Real-ESRGAN x2: 2), or 1.
        unshuffle: i64,
    },
    /// SRVGGNetCompact: PReLU convolutions, then a pixel shuffle plus the nearest-upsampled
    /// input.
    Compact {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`num_feat`).
        features: i64,
        /// Body convolutions after the first (`num_conv`).
        convs: i64,
        /// The pixel-shuffle factor.
        scale: i64,
    },
    /// SPAN: six parameter-free attention blocks of folded 3×3 convolutions, a pixel
    /// shuffle.
    Span {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`feature_channels`).
        features: i64,
        /// The pixel-shuffle factor.
        scale: i64,
        /// Whether the input is normalised (mean subtracted, times 255); a file with a
        /// `no_norm` tensor is not.
        normalised: bool,
    },
    /// PLKSR: partial large kernel blocks (a channel mixer, a large kernel over the first
    /// channels, element-wise attention, a refinement), a pixel shuffle plus the repeated
    /// input.
    Plksr {
        /// Image channels in and out (3).
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// PLK blocks (`n_blocks`).
        blocks: i64,
        /// The large kernel's side (spandrel's 17 for a sparse one, which the file does
        /// not tell).
        kernel: i64,
        /// The channels the large kernel convolves (`dim * split_ratio`).
        split: i64,
        /// The pixel-shuffle factor.
        scale: i64,
        /// Whether the blocks have element-wise attention (`use_ea`).
        attention: bool,
        /// The channel mixer's convolutions.
        mixer: ChannelMixer,
        /// The large-kernel layer's convolutions.
        large_kernel: LargeKernel,
    },
    /// RealPLKSR: partial large kernel blocks, a pixel shuffle plus the repeated input.
    RealPlksr {
        /// Image channels in and out (3).
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// PLK blocks (`n_blocks`).
        blocks: i64,
        /// The large kernel's side.
        kernel: i64,
        /// The channels the large kernel convolves (`dim * split_ratio`).
        split: i64,
        /// The pixel-shuffle factor.
        scale: i64,
        /// Whether the blocks have element-wise attention (`use_ea`).
        attention: bool,
        /// Whether the blocks start with a channel layer norm instead of ending with a
        /// group norm.
        layer_norm: bool,
        /// Whether DySample's learned upsampling takes the place of the pixel shuffle.
        dysample: bool,
    },
    /// SAFMN: blocks of spatially-adaptive feature modulation and a convolutional channel
    /// mixer, then a pixel shuffle.
    Safmn {
        /// Image channels in and out (3).
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// Blocks (`n_blocks`).
        blocks: i64,
        /// The channel mixer's width (`dim * ffn_scale`).
        ffn_hidden: i64,
        /// The pixel-shuffle factor.
        scale: i64,
    },
    /// SAFMN-BCIE: SAFMN's blocks in groups on the pixel-unshuffled image, shuffled back
    /// to the input's size (restoration).
    SafmnBcie {
        /// Image channels in and out (3).
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// Groups (`n_blocks`).
        groups: i64,
        /// Blocks per group (`num_layers`).
        blocks: i64,
        /// The channel mixer's width (`dim * ffn_scale`).
        ffn_hidden: i64,
        /// The pixel-unshuffle factor (`upscaling_factor`).
        unshuffle: i64,
    },
    /// MoSR: gated CNN blocks, a convolutional tail and shortcut, then a pixel shuffle.
    MoSr {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// Gated blocks (`n_block`).
        blocks: i64,
        /// The gated blocks' hidden width (`dim * expansion_ratio`).
        hidden: i64,
        /// The hidden channels the depthwise convolution takes (`dim * conv_ratio`).
        conv_channels: i64,
        /// The depthwise convolution's side.
        kernel: i64,
        /// The pixel-shuffle factor.
        scale: i64,
        /// How the features become the image.
        upsampler: MoSrUpsampler,
    },
    /// MoESR: groups of gated CNN blocks with inception depthwise convolutions, each
    /// closed by a multi-scale gate, then one of `UniUpsample`'s upsamplers.
    MoEsr {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// Groups (`n_blocks`).
        groups: i64,
        /// Gated blocks per group (`n_block`).
        blocks: i64,
        /// The gated blocks' hidden width (`dim * expansion_factor`).
        hidden: i64,
        /// The gate's gated blocks' hidden width (`dim * expansion_msg`).
        msg_hidden: i64,
        /// How the features become the image.
        upsampler: UniUpsampler,
        /// The upsampler's inner width (`upsample_dim`).
        upsample_features: i64,
        /// The factor the network enlarges by.
        scale: i64,
    },
    /// SwinIR: residual groups of shifted-window transformer blocks, then an upsampler.
    SwinIr {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual Swin transformer groups (`len(depths)`).
        groups: i64,
        /// The attention window's side.
        window: i64,
        /// The most heads of any group (for sizing tiles).
        heads: i64,
        /// The blocks' MLP width.
        mlp_hidden: i64,
        /// The training image side read from the stored masks (spandrel's tag; a side
        /// within one window trained without shifted windows).
        image_size: i64,
        /// How the features become the image.
        upsampler: SwinUpsampler,
        /// The upsampling convolutions' width (`num_feat`; 0 where there are none).
        upsample_features: i64,
        /// The factor the network enlarges by (1 for restoration).
        scale: i64,
        /// Whether each group (and the body) ends with three convolutions (`3conv`)
        /// rather than one.
        three_conv: bool,
    },
    /// Swin2SR: SwinIR with Swin V2 blocks (cosine attention with learned logit scales,
    /// a position bias drawn by an MLP, norms after the attention and the MLP).
    Swin2Sr {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual Swin transformer groups (`len(depths)`).
        groups: i64,
        /// The attention window's side.
        window: i64,
        /// The most heads of any group (for sizing tiles).
        heads: i64,
        /// The blocks' MLP width.
        mlp_hidden: i64,
        /// The training image side read from the stored masks (spandrel's tag; a side
        /// within one window trained without shifted windows).
        image_size: i64,
        /// How the features become the image.
        upsampler: SwinUpsampler,
        /// Whether a pixel-shuffle upsampler adds the bicubic branch of the
        /// compressed-input models (`pixelshuffle_aux`).
        auxiliary: bool,
        /// The upsampling convolutions' width (`num_feat`; 0 where there are none).
        upsample_features: i64,
        /// The factor the network enlarges by (1 for restoration).
        scale: i64,
        /// Whether each group (and the body) ends with three convolutions (`3conv`).
        three_conv: bool,
        /// Whether the embedded tokens are layer-normed (`patch_norm`).
        patch_norm: bool,
    },
    /// HAT: residual groups of Swin blocks with a channel-attention convolution branch
    /// and an overlapping cross-attention, then a pixel-shuffle upsampler.
    Hat {
        /// Image channels in and out (3).
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual hybrid attention groups (`len(depths)`).
        groups: i64,
        /// The attention window's side.
        window: i64,
        /// The overlapping attention's key window side.
        overlap_window: i64,
        /// The most heads of any group (for sizing tiles).
        heads: i64,
        /// The MLPs' width.
        mlp_hidden: i64,
        /// The convolution branch's inner width (`embed_dim / compress_ratio`).
        cab_width: i64,
        /// Its channel attention's squeezed width (`embed_dim / squeeze_factor`).
        squeeze_width: i64,
        /// The upsampling convolutions' width (`num_feat`).
        upsample_features: i64,
        /// The factor the network enlarges by.
        scale: i64,
        /// Whether the groups and the body end without a convolution (`identity`).
        identity_residual: bool,
    },
    /// ATD: residual groups of layers that add to a shifted-window attention one over a
    /// token dictionary (refined from layer to layer) and one within categories of
    /// pixels (grouped by their dictionary token), then an upsampler.
    Atd {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual groups (`len(depths)`).
        groups: i64,
        /// The window attention's side.
        window: i64,
        /// The most heads of any group (for sizing tiles).
        heads: i64,
        /// The convolutional feed-forward's width.
        mlp_hidden: i64,
        /// Tokens in each group's dictionary (`num_tokens`).
        tokens: i64,
        /// The dictionary attention's query and key width (`reducted_dim`).
        reduced: i64,
        /// The feed-forward's depthwise kernel side.
        kernel: i64,
        /// Pixels per category group (`category_size`).
        category: i64,
        /// How the features become the image.
        upsampler: SwinUpsampler,
        /// The factor the network enlarges by (1 for restoration).
        scale: i64,
        /// Whether each group (and the body) ends with three convolutions (`3conv`).
        three_conv: bool,
        /// Whether the embedded tokens are layer-normed (`patch_norm`).
        patch_norm: bool,
        /// Whether the image's mean is subtracted and added back (no `no_norm` flag).
        mean_shift: bool,
    },
    /// DCTLSA: six modules of two local self-attention blocks (a convolutional local
    /// module and linear attention within windows) densely joined by 1×1 convolutions,
    /// then a pixel shuffle.
    Dctlsa {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`nf`).
        features: i64,
        /// The factor the network enlarges by.
        scale: i64,
    },
    /// CRAFT: residual groups of cross-refinement blocks, each fusing (by attention
    /// across channels) two window blocks' output (attention within rectangle windows,
    /// half the channels in each orientation, beside a depthwise convolution) with a
    /// high-frequency enhancement block's, then a pixel shuffle.
    Craft {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual groups (`len(depths)`).
        groups: i64,
        /// The most heads of any group (for sizing tiles).
        heads: i64,
        /// The first orientation's window `[rows, columns]` (`split_size_0`,
        /// `split_size_1`); the second is its transpose.
        split: [i64; 2],
        /// The window blocks' MLP width.
        mlp_hidden: i64,
        /// Whether the window blocks' q/k/v projections have biases.
        qkv_bias: bool,
        /// The factor the network enlarges by (1 for restoration).
        scale: i64,
        /// Whether the body ends with a convolution (`1conv`) rather than the identity.
        body_conv: bool,
    },
    /// AuraSR (GigaGAN's upsampler): a U-Net of residual blocks of style-modulated
    /// convolutions (the style drawn from noise at every call), transformers on its
    /// coarse levels, more up levels than down ones.
    AuraSr(AuraShape),
    /// MMRealSR: RRDBNet whose blocks' outputs are modulated by an embedding of the
    /// degradation degrees an estimator predicts from the whole input.
    MmRealSr {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`num_feat`).
        features: i64,
        /// Residual-in-residual dense blocks.
        blocks: i64,
        /// Channels each dense layer adds (`num_grow_ch`).
        growth: i64,
        /// Degradations the estimator predicts a degree of (blur, noise).
        degradations: i64,
        /// The estimator's first stage's width (for sizing tiles).
        estimator_width: i64,
    },
    /// DAT: residual groups alternating spatial blocks (attention within rectangle
    /// windows, half the channels in each orientation) and channel blocks (attention
    /// across channels), each beside a depthwise convolution, then an upsampler.
    Dat {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual groups (`len(depth)`).
        groups: i64,
        /// The first orientation's window `[rows, columns]` (`split_size`); the second
        /// is its transpose.
        split: [i64; 2],
        /// The most heads of any group (for sizing tiles).
        heads: i64,
        /// The feed-forward networks' width.
        ffn_hidden: i64,
        /// The training image side read from the stored masks (spandrel's tag).
        image_size: i64,
        /// How the features become the image: a pixel shuffle or the direct one.
        upsampler: SwinUpsampler,
        /// The upsampling convolutions' width (`num_feat`; 0 for the direct upsampler).
        upsample_features: i64,
        /// The factor the network enlarges by (1 for restoration).
        scale: i64,
        /// Whether each group (and the body) ends with three convolutions (`3conv`).
        three_conv: bool,
    },
    /// RGT: DAT's frame around blocks alternating rectangle-window attention (beside a
    /// depthwise convolution of the values) and recursive-generalization attention (to
    /// the image reduced by 4 at least twice), then a pixel-shuffle upsampler.
    Rgt {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual groups (`len(depth)`).
        groups: i64,
        /// The first orientation's window `[rows, columns]` (`split_size`); the second
        /// is its transpose.
        split: [i64; 2],
        /// The most heads of any group (for sizing tiles).
        heads: i64,
        /// The feed-forward networks' width.
        mlp_hidden: i64,
        /// The recursive attentions' narrow width (`int(embed_dim * c_ratio)`).
        reduced: i64,
        /// The factor the network enlarges by (1 for restoration).
        scale: i64,
        /// Whether each group (and the body) ends with three convolutions (`3conv`).
        three_conv: bool,
    },
    /// DRCT: residual dense groups of five Swin transformer blocks, each taking the
    /// group's input and the growths of the blocks before it, then a pixel-shuffle
    /// upsampler.
    Drct {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual dense groups (`len(depths)`).
        groups: i64,
        /// The attention window's side.
        window: i64,
        /// The most heads of any group's first block (for sizing tiles).
        heads: i64,
        /// The channels each dense block adds (`gc`).
        growth: i64,
        /// The widest MLP (for sizing tiles).
        mlp_hidden: i64,
        /// The training image side read from the stored masks (spandrel's tag; a side
        /// within one window trained without shifted windows).
        image_size: i64,
        /// The upsampling convolutions' width (`num_feat`).
        upsample_features: i64,
        /// The factor the network enlarges by (1 for restoration).
        scale: i64,
        /// Whether the body ends without a convolution (`identity`).
        identity_residual: bool,
        /// Whether the embedded tokens are layer-normed (`patch_norm`).
        patch_norm: bool,
    },
    /// Real-CUGAN: two cascaded convolutional U-Nets with squeeze-and-excitation blocks
    /// on the reflection-padded image, the second refining the first's enlarged output.
    RealCugan {
        /// Image channels in and out.
        channels: i64,
        /// The factor the network enlarges by (2, 3 or 4).
        scale: i64,
        /// Whether it is the fast x2 network (on the pixel-unshuffled image).
        fast: bool,
        /// Whether it is a "pro" model (the image mapped to 0.15–0.85 and back).
        pro: bool,
    },
    /// RCAN: residual groups of residual blocks with channel attention, then pixel-shuffle
    /// rounds; optionally on the pixel-unshuffled image, around a mean shift.
    Rcan {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`n_feats`).
        features: i64,
        /// Residual groups (`n_resgroups`).
        groups: i64,
        /// Residual channel attention blocks per group (`n_resblocks`).
        blocks: i64,
        /// The convolutions' side (`kernel_size`; the upsampler's are 3×3).
        kernel: i64,
        /// The channel attention's squeezed width (`n_feats // reduction`).
        squeezed: i64,
        /// The factor the network enlarges by.
        scale: i64,
        /// The pixel-unshuffle factor of the input (2 or 4), or 1.
        unshuffle: i64,
        /// Whether the image is scaled to 0–255 and shifted by the stored mean
        /// (`sub_mean`/`add_mean`).
        mean_shift: bool,
    },
    /// OmniSR: groups of omni self-attention blocks (window, grid and channel
    /// attention, gated convolutions) with an enhanced spatial attention, then a pixel
    /// shuffle.
    OmniSr {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`num_feat`).
        features: i64,
        /// Omni self-attention groups (`res_num`).
        groups: i64,
        /// Blocks per group (`block_num`).
        blocks: i64,
        /// The attention window's side (`window_size`).
        window: i64,
        /// Whether the window attentions add a relative position bias (`pe`).
        position_bias: bool,
        /// Whether the convolutions the constructor's `bias` governs have biases.
        bias: bool,
        /// The pixel-shuffle factor.
        scale: i64,
    },
    /// FDAT: residual groups of simplified DAT blocks alternating window attention (with
    /// a learned bias) and channel attention, each beside a depthwise convolution mixed in
    /// by a simplified interaction module, then one of eight upsamplers.
    Fdat {
        /// Image channels in and out.
        channels: i64,
        /// Embedding width (`embed_dim`).
        features: i64,
        /// Residual groups (`num_groups`).
        groups: i64,
        /// Blocks per group (`depth_per_group` times the pattern's two).
        blocks: i64,
        /// Attention heads (`num_heads`).
        heads: i64,
        /// The window attention's side (`window_size`).
        window: i64,
        /// The feed-forward networks' width.
        ffn_hidden: i64,
        /// The interaction module's channel gate width (`embed_dim / aim_reduction_ratio`).
        aim_reduced: i64,
        /// How the features become the image.
        upsampler: UniUpsampler,
        /// The upsampler's inner width (`mid_dim`).
        upsample_features: i64,
        /// The factor the network enlarges by.
        scale: i64,
        /// The pixel-unshuffle factor of the input (2 or 4), or 1.
        unshuffle: i64,
    },
    /// DITN: units of local blocks (channel attention within 8-pixel patches) and global
    /// blocks (a spatially dilated depthwise modulation), each with a gated feed-forward
    /// network, then a pixel shuffle.
    Ditn {
        /// Image channels in (out: 3).
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// Units (`UFONE_blocks`).
        units: i64,
        /// Local blocks per unit (`ITL_blocks`).
        local_blocks: i64,
        /// Global blocks per unit (`SAL_blocks`).
        global_blocks: i64,
        /// The feed-forward networks' hidden width (`dim * ffn_expansion_factor`).
        ffn_hidden: i64,
        /// Whether the attention projections and feed-forward convolutions have biases.
        bias: bool,
        /// The pixel-shuffle factor.
        scale: i64,
    },
    /// Swift-SRGAN: depthwise-separable convolutions with batch norms and PReLU in
    /// residual blocks, ×2 pixel-shuffle rounds, tanh.
    SwiftSrgan {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`num_channels`).
        features: i64,
        /// Residual blocks (`num_blocks`).
        blocks: i64,
        /// ×2 pixel-shuffle rounds (`log2(upscale_factor)`).
        upsamplings: i64,
    },
    /// SeemoRe: groups of a mixture of low-rank experts (each image routed to its top
    /// expert) and a striped depthwise convolution block, then a pixel shuffle.
    SeemoRe {
        /// Image channels in and out (3).
        channels: i64,
        /// Feature width (`embedding_dim`).
        features: i64,
        /// Groups (`num_layers`).
        layers: i64,
        /// Experts per mixture (`num_experts`).
        experts: i64,
        /// How the experts' low-rank widths grow (`lr_space`).
        growth: ExpertGrowth,
        /// The global blocks' stripe length (`global_kernel_size`).
        kernel: i64,
        /// The pixel-shuffle factor.
        scale: i64,
        /// Whether the mixture's projection is channel-shuffled (`use_shuffle`).
        shuffle: bool,
        /// The key calibration's strided summaries (`recursive`).
        calibration_rounds: i64,
    },
    /// DnCNN: a stack of 3×3 convolutions (batch-normed or not) with ReLU predicting the
    /// noise, which is subtracted from the input; FDnCNN takes a noise-level map beside the
    /// image and predicts the image itself (restoration).
    DnCnn {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`nc`).
        features: i64,
        /// Convolutions, the first and last included (`nb`).
        layers: i64,
        /// Whether the body's layers are batch-normed (`act_mode` "BR").
        batch_norm: bool,
        /// Whether a noise-level map is the input's last channel (FDnCNN).
        noise_map: bool,
    },
    /// DRUNet: a four-level U-Net of residual blocks over the image and a noise-level map
    /// (restoration).
    DrUnet {
        /// Image channels in and out.
        channels: i64,
        /// The U-Net's widths, blocks and resampling.
        unet: KairUnet,
    },
    /// FBCNN: DRUNet's U-Net with biases, whose decoder blocks are scaled and shifted by an
    /// embedding of the JPEG quality factor it predicts from the lowest level
    /// (restoration).
    Fbcnn {
        /// Image channels in and out.
        channels: i64,
        /// The U-Net's widths, blocks and resampling.
        unet: KairUnet,
    },
    /// NAFNet: a U-Net of NAF blocks (channel layer norm, gated depthwise convolution and
    /// simplified channel attention, a gated feed-forward), restoring at the input's size.
    NafNet {
        /// Image channels in and out.
        channels: i64,
        /// The first level's width (`width`), doubled at each level down.
        features: i64,
        /// Encoder (and decoder) levels.
        levels: i64,
        /// Blocks per encoder level, top down (`enc_blk_nums`; the first `levels`).
        encoders: [i64; super::nafnet::MAX_LEVELS],
        /// Blocks per decoder level, bottom up (`dec_blk_nums`; the first `levels`).
        decoders: [i64; super::nafnet::MAX_LEVELS],
        /// Blocks at the lowest level (`middle_blk_num`).
        middle: i64,
    },
    /// SCUNet: a U-Net of Swin-Conv blocks (a residual convolution branch beside a Swin
    /// transformer branch), restoring at the input's size.
    ScuNet {
        /// Image channels in and out.
        channels: i64,
        /// The first stage's width (`dim`).
        features: i64,
        /// Blocks per stage (`config`): three down, the body, three up.
        blocks: [i64; 7],
    },
}
