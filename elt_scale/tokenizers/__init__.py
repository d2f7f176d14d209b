"""Tokenizer registry: raw pixels in [0, 1] (B, C, [T,] H, W) <-> what the shards store.

    pixels     no weights (tests and the demo): quantized grey levels (codes) or [-1, 1] (latents)
    sd-vae     diffusers AutoencoderKL: latents x scaling_factor, fp16
    vq         diffusers VQModel: int16 code grids
    maskgit-vq MaskGIT's VQGAN (written here; the published PyTorch state dict): 16x16 grids of 1024 codes
    video-vae  a diffusers 3D KL autoencoder (AutoencoderKLWan by default)
    jit        a TorchScript discrete video tokenizer (encoder.jit/decoder.jit, e.g. Cosmos DV4x8x8):
               int code grids with a compressed time axis
Image tokenizers run per frame on video (`per_frame=True`). The diffusers ones load through diffusers'
`from_pretrained` (local dir or hub id), maskgit-vq a state dict (file, dir or hub id, through
huggingface_hub), jit through torch.jit.load (local dir); all are imported only when asked for."""
from __future__ import annotations

from .pixels import PixelTokenizer


def _sd_vae(**kw):
    from .sd_vae import SDVAETokenizer
    return SDVAETokenizer(**kw)


def _vq(**kw):
    from .vq import VQTokenizer
    return VQTokenizer(**kw)


def _maskgit_vq(**kw):
    from .maskgit_vq import MaskGitVQTokenizer
    return MaskGitVQTokenizer(**kw)


def _video_vae(**kw):
    from .video import VideoVAETokenizer
    return VideoVAETokenizer(**kw)


def _jit(**kw):
    from .jit_video import JitVideoTokenizer
    return JitVideoTokenizer(**kw)


REGISTRY = {"pixels": PixelTokenizer, "sd-vae": _sd_vae, "vq": _vq, "maskgit-vq": _maskgit_vq,
            "video-vae": _video_vae, "jit": _jit}


def build_tokenizer(name: str, per_frame: bool = False, **kwargs):
    if name not in REGISTRY:
        raise ValueError(f"unknown tokenizer {name!r}; available: {', '.join(sorted(REGISTRY))}")
    tok = REGISTRY[name](**kwargs)
    if per_frame:
        from .video import PerFrame
        tok = PerFrame(tok)
    return tok


def tokenizer_from_manifest(manifest: dict, **overrides):
    """The tokenizer that wrote these shards (e.g. `device="cuda"` as an override), for decoding."""
    info = dict(manifest["tokenizer"])
    name = info.pop("name")
    return build_tokenizer(name, **{**info, **overrides})
