#!/usr/bin/env python3
"""Preprocessor benchmark: controlnet_aux's networks with random weights (the line-art
generator of its sk_model.pth, the anime line-art U-Net of its netG.pth, the HED network
of its ControlNetHED.pth, the OpenPose body network of its body_pose_model.pth (alone, with
its face network of facenet.pth as openpose_face, its hand network of hand_pose_model.pth as
openpose_hand, both as openpose_full), the NormalBAE network of its
scannet.pt, the M-LSD network of its mlsd_large_512_fp32.pth, the PiDiNet of its table5_pidinet.pth, TEED's TED (alone and
under Anyline), at their published sizes), Depth Anything V2 Small's and
Intel/zoedepth-nyu's and upernet-convnext-small's shapes in transformers, LeReS's res101
(ResNeXt-101 32×8d) in controlnet_aux, one square image of
random pixels turned into the 8-bit map (and the preprocessors that run no network:
OpenCV's Canny, the standard line art, sd-webui-controlnet's filters and recolor maps) by the reference (controlnet_aux's detector;
transformers' Pillow processor, the model, post_process_depth_estimation and min-max;
for ZoeDepth the mirrored pass too and ZoeDetector's percentile map)
and by `sdxld bench-detector`, same weights, same threads, each in its own process.

Prints seconds per map for both, the ratio reference / sdxld (above 1 means sdxld is
faster) and each process's peak resident memory.
Usage: bench/preprocess.py --sdxld target/release/sdxld [--size 1024] [--threads 1] [--runs 2]
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))


def build(kind: str):
    if kind in ("teed", "anyline"):
        from controlnet_aux.teed.ted import TED

        return TED()
    if kind == "pidinet":
        from controlnet_aux.pidi.model import pidinet

        return pidinet()
    if kind == "leres":
        from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel

        return RelDepthModel(backbone="resnext101")
    if kind == "mlsd":
        from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

        return MobileV2_MLSD_Large()
    if kind == "normal":
        import types

        from controlnet_aux.normalbae.nets.NNET import NNET

        args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7)
        return NNET(args)
    if kind in POSE_KINDS:
        from controlnet_aux.open_pose.model import bodypose_model

        return bodypose_model()
    if kind == "hed":
        from controlnet_aux.hed import ControlNetHED_Apache2

        return ControlNetHED_Apache2()
    if kind == "lineart":
        from controlnet_aux.lineart import Generator

        return Generator(3, 1, 3)
    from controlnet_aux.lineart_anime import UnetGenerator

    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def write_depth(folder: Path):
    """Depth Anything V2 Small's configuration with random weights, as a model folder."""
    from make_detector_fixtures import randomise
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False, apply_layernorm=True)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=384,
                                 neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32)
    model = DepthAnythingForDepthEstimation(config).eval()
    randomise(model, 0, gain=0.5)
    model.save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(folder)


def write_dpt(folder: Path, hybrid: bool = False):
    """Intel/dpt-large's configuration (ViT-L/16 at 384², readout projected), or with
    `hybrid` Intel/dpt-hybrid-midas's (ViT-B/16 on a BiT-50 backbone at 384²), with
    random weights, as a model folder with its processor config."""
    from make_detector_fixtures import randomise
    from transformers import DPTConfig, DPTForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    if hybrid:
        config = DPTConfig(is_hybrid=True, image_size=384, backbone_out_indices=[2, 5, 8, 11], neck_hidden_sizes=[256, 512, 768, 768],
                           reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=256, backbone_featmap_shape=[1, 1024, 24, 24])
    else:
        config = DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=384,
                           backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256)
    model = DPTForDepthEstimation(config).eval()
    randomise(model, 0, gain=0.5)
    model.save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1,
                         image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def write_zoe(folder: Path):
    """Intel/zoedepth-nyu's configuration (BEiT-L/16 at 384, one metric head of 64
    softplus bins) with random weights, as a model folder with its published processor
    config."""
    from make_detector_fixtures import randomise
    from transformers import ZoeDepthConfig, ZoeDepthForDepthEstimation
    from transformers.models.zoedepth.image_processing_pil_zoedepth import ZoeDepthImageProcessorPil

    model = ZoeDepthForDepthEstimation(ZoeDepthConfig()).eval()
    randomise(model, 0, gain=0.5)
    model.save_pretrained(folder)
    ZoeDepthImageProcessorPil(size={"height": 384, "width": 512}, ensure_multiple_of=32, keep_aspect_ratio=True, do_pad=True,
                              resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def zoe_child(args, image):
    """transformers' ZoeDepth as the depth preprocessor runs it: the processor, the model
    on the image and its mirror, post_process_depth_estimation, ZoeDetector's map."""
    from make_zoe_fixtures import zoe_map
    from PIL import Image
    from transformers import ZoeDepthForDepthEstimation
    from transformers.models.zoedepth.image_processing_pil_zoedepth import ZoeDepthImageProcessorPil

    model = ZoeDepthForDepthEstimation.from_pretrained(args.model).eval()
    processor = ZoeDepthImageProcessorPil.from_pretrained(args.model)
    picture = Image.fromarray(image)

    def call():
        pixels = processor(images=picture, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            outputs = model(pixel_values=pixels)
            mirrored = model(pixel_values=torch.flip(pixels, dims=[3]))
        depth = processor.post_process_depth_estimation(outputs, source_sizes=[image.shape[:2]], outputs_flipped=mirrored)
        return zoe_map(depth[0]["predicted_depth"].numpy())

    return call


def write_segmentation(folder: Path):
    """openmmlab/upernet-convnext-small's configuration with random weights."""
    from make_detector_fixtures import randomise
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    backbone = ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 27, 3], out_features=["stage1", "stage2", "stage3", "stage4"])
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=512, num_labels=150)).eval()
    randomise(model, 0)
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 512, "width": 512}).save_pretrained(folder)


def segmentation_child(args, image):
    """transformers' semantic segmentation as the segmentation preprocessor runs it."""
    from controlnet_aux.util import ade_palette
    from transformers import UperNetForSemanticSegmentation
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    model = UperNetForSemanticSegmentation.from_pretrained(args.model).eval()
    processor = SegformerImageProcessorPil.from_pretrained(args.model)
    palette = np.array(ade_palette(), dtype=np.uint8)

    def call():
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        classes = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0].numpy()
        return palette[classes]

    return call


def depth_child(args, image):
    """transformers' depth estimation as the depth preprocessor runs it."""
    from transformers import AutoModelForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    model = AutoModelForDepthEstimation.from_pretrained(args.model).eval()
    processor = DPTImageProcessorPil.from_pretrained(args.model)

    def call():
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        depth = processor.post_process_depth_estimation(outputs, target_sizes=[image.shape[:2]])[0]["predicted_depth"].numpy()
        depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
        return depth.clip(0, 255).astype(np.uint8)

    return call


# Preprocessors without a network: no model to write, sdxld runs them by name.
NETWORKLESS = ("canny", "lineart_standard", "tile_resample", "tile_resample_fractional", "blur", "recolor_luminance", "recolor_intensity", "scribble_xdog")


def networkless_child(args, image):
    import cv2

    cv2.setNumThreads(args.threads)
    if args.kind == "canny":
        from controlnet_aux.canny import CannyDetector

        detector = CannyDetector()
        return lambda: detector(image, detect_resolution=args.size, image_resolution=args.size, output_type="np")
    if args.kind.startswith("tile_resample"):
        # sd-webui-controlnet's tile_resample at a rate of 2 or 2.5 (its HWC3 a no-op here).
        rate = 2.5 if args.kind.endswith("fractional") else 2.0
        height, width = image.shape[:2]
        return lambda: cv2.resize(image, (int(width / rate), int(height / rate)), interpolation=cv2.INTER_AREA)
    if args.kind == "blur":
        # sd-webui-controlnet's blur_gaussian at its default sigma of 9.
        return lambda: cv2.GaussianBlur(image, (0, 0), 9.0)
    if args.kind == "scribble_xdog":
        # sd-webui-controlnet's scribble_xdog at its default threshold of 32.
        def xdog():
            g1 = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.5)
            g2 = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 5.0)
            dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
            result = np.zeros_like(image, dtype=np.uint8)
            result[2 * (255 - dog) > 32] = 255
            return result

        return xdog
    if args.kind.startswith("recolor"):
        # sd-webui-controlnet's recolor_luminance / recolor_intensity at a gamma of 0.8.
        code, channel = (cv2.COLOR_BGR2LAB, 0) if args.kind.endswith("luminance") else (cv2.COLOR_BGR2HSV, 2)

        def recolor():
            result = cv2.cvtColor(image, code)[:, :, channel].astype(np.float32) / 255.0
            result = (result**0.8 * 255.0).clip(0, 255).astype(np.uint8)
            return cv2.cvtColor(result, cv2.COLOR_GRAY2RGB)

        return recolor
    from controlnet_aux.lineart_standard import LineartStandardDetector

    detector = LineartStandardDetector()
    return lambda: detector(image, detect_resolution=args.size, output_type="np")


def write_model(kind: str, path: Path):
    from make_detector_fixtures import randomise
    from safetensors.torch import save_file

    if kind == "depth":
        return write_depth(path)
    if kind in ("dpt", "dpt_hybrid"):
        return write_dpt(path, hybrid=kind == "dpt_hybrid")
    if kind == "segmentation":
        return write_segmentation(path)
    if kind == "zoe":
        return write_zoe(path)

    if kind in ("openpose_face", "openpose_full"):
        from controlnet_aux.open_pose.face import FaceNet

        face = FaceNet()
        randomise(face, 0)
        save_file({k: v.contiguous() for k, v in face.state_dict().items()}, str(face_file(path)))
    if kind in ("openpose_hand", "openpose_full"):
        from controlnet_aux.open_pose.model import handpose_model

        hand = handpose_model()
        randomise(hand, 0)
        save_file({k: v.contiguous() for k, v in hand.state_dict().items()}, str(hand_file(path)))
    model = build(kind)
    randomise(model, 0, gain={"lineart_anime": 0.25, "teed": 0.5, "anyline": 0.5}.get(kind, 1.0))
    state = model.state_dict()
    if kind in POSE_KINDS:
        # The published file's flat names (`conv1_1.weight`).
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def noise(size: int) -> np.ndarray:
    """The square image of random pixels both sides detect in."""
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


POSE_KINDS = ("openpose", "openpose_face", "openpose_hand", "openpose_full")


def face_file(body: Path) -> Path:
    """Where openpose_face's face network is written beside its body network."""
    return body.with_name(f"{body.stem}_facenet.safetensors")


def hand_file(body: Path) -> Path:
    """Where openpose_hand's hand network is written beside its body network."""
    return body.with_name(f"{body.stem}_hand_pose_model.safetensors")


def reference_child(args):
    """Runs in its own process: times controlnet_aux's detector, prints JSON."""
    from controlnet_aux.lineart import LineartDetector
    from controlnet_aux.lineart_anime import LineartAnimeDetector
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    image = noise(args.size)
    if args.kind in NETWORKLESS:
        call = networkless_child(args, image)
    elif args.kind in ("depth", "dpt", "dpt_hybrid"):
        call = depth_child(args, image)
    elif args.kind == "segmentation":
        call = segmentation_child(args, image)
    elif args.kind == "zoe":
        call = zoe_child(args, image)
    else:
        model = build(args.kind)
        state = load_file(args.model)
        if args.kind in POSE_KINDS:
            from controlnet_aux.open_pose.util import transfer

            state = transfer(model, state)
        model.load_state_dict(state)
        model.eval()
        if args.kind == "teed":
            from controlnet_aux.teed import TEEDdetector

            teed = TEEDdetector(model)
            call = lambda: teed(image, detect_resolution=args.size, output_type="np")
        elif args.kind == "anyline":
            import warnings

            from controlnet_aux.anyline import AnylineDetector

            warnings.simplefilter("ignore", FutureWarning)
            anyline = AnylineDetector(model)
            call = lambda: anyline(image, detect_resolution=args.size, output_type="np")
        elif args.kind == "pidinet":
            from controlnet_aux.pidi import PidiNetDetector

            detector = PidiNetDetector(model)
        elif args.kind == "mlsd":
            from controlnet_aux.mlsd import MLSDdetector

            detector = MLSDdetector(model)
        elif args.kind == "normal":
            from controlnet_aux.normalbae import NormalBaeDetector

            detector = NormalBaeDetector(model)
        elif args.kind == "leres":
            from controlnet_aux.leres import LeresDetector

            detector = LeresDetector(model, None)
        elif args.kind in POSE_KINDS:
            call = pose_child(args, model, image)
        elif args.kind == "hed":
            from controlnet_aux.hed import HEDdetector

            detector = HEDdetector(model)
        elif args.kind == "lineart":
            detector = LineartDetector(model, model)
        else:
            detector = LineartAnimeDetector(model)
        if args.kind not in ("teed", "anyline") + POSE_KINDS:
            call = lambda: detector(image, detect_resolution=args.size, image_resolution=args.size, output_type="np")
    # Importing the fixture helpers (ZoeDetector's map) sets their thread count.
    torch.set_num_threads(args.threads)
    call()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": times}))


def pose_child(args, body_model, image):
    """controlnet_aux's OpenposeDetector with the parts args.kind draws."""
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face, FaceNet
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import handpose_model
    from safetensors.torch import load_file

    body = Body.__new__(Body)
    body.model = body_model
    face = hand = None
    include_face = args.kind in ("openpose_face", "openpose_full")
    include_hand = args.kind in ("openpose_hand", "openpose_full")
    if include_face:
        face = Face.__new__(Face)
        face.model = FaceNet()
        face.model.load_state_dict(load_file(str(face_file(Path(args.model)))))
        face.model.eval()
    if include_hand:
        hand = Hand.__new__(Hand)
        hand.model = handpose_model()
        hand.model.load_state_dict(load_file(str(hand_file(Path(args.model)))))
        hand.model.eval()
    pose = OpenposeDetector(body, hand, face)
    poses = pose.detect_poses(image, include_hand, include_face)
    hands = sum(1 for p in poses for h in (p.left_hand, p.right_hand) if h is not None)
    print(f"{args.kind}: {len(poses)} people, {sum(p.face is not None for p in poses)} faces, {hands} hands", file=sys.stderr)
    return lambda: pose(image, detect_resolution=args.size, image_resolution=args.size, include_hand=include_hand,
                        include_face=include_face, output_type="np")


def run(cmd):
    """A child's JSON (its last line) and its peak resident memory in MiB."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdxld", required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--kinds", default="lineart,lineart_anime,depth,dpt,dpt_hybrid,zoe,leres,hed,segmentation,openpose,openpose_face,openpose_hand,openpose_full,normal,mlsd,pidinet,teed,anyline,canny,lineart_standard,tile_resample,tile_resample_fractional,blur,recolor_luminance,recolor_intensity,scribble_xdog")
    parser.add_argument("--reference-child", action="store_true")
    parser.add_argument("--kind")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.reference_child:
        return reference_child(args)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            folder = kind in ("depth", "dpt", "dpt_hybrid", "zoe", "segmentation")
            model = Path(tmp) / (kind if folder else f"{kind}.safetensors")
            if kind in NETWORKLESS:
                what = ["--preprocessor", kind]
            else:
                write_model(kind, model)
                what = ["--model", str(model)] + (["--preprocessor", kind] if kind == "anyline" or kind in POSE_KINDS[1:] else [])
                if kind in ("openpose_face", "openpose_full"):
                    what += ["--face-model", str(face_file(model))]
                if kind in ("openpose_hand", "openpose_full"):
                    what += ["--hand-model", str(hand_file(model))]
            common = ["--size", str(args.size), "--threads", str(args.threads), "--runs", str(args.runs)]
            # Both sides detect in the same random image (a pose detector's work depends on
            # the people it finds).
            image = Path(tmp) / "image.png"
            if not image.exists():
                from PIL import Image

                Image.fromarray(noise(args.size)).save(image)
            reference, reference_peak = run([sys.executable, __file__, "--reference-child", "--kind", kind, "--model", str(model), "--sdxld", args.sdxld] + common)
            sdxld, sdxld_peak = run([args.sdxld, "bench-detector"] + what + common + ["--image", str(image)])
            r, d = statistics.median(reference["seconds"]), statistics.median(sdxld["seconds"])
            print(
                f"{kind} {args.size}², {args.threads} thread(s): reference {r:.4f} s (peak RSS {reference_peak:.0f} MiB), "
                f"sdxld {d:.4f} s (peak RSS {sdxld_peak:.0f} MiB), ratio {r / d:.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
