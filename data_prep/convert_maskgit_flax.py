"""Google's Flax checkpoint of MaskGIT's VQGAN -> the PyTorch state dict `--tokenizer maskgit-vq` loads.

    python data_prep/convert_maskgit_flax.py tokenizer_imagenet256_checkpoint --out maskgit-vqgan-imagenet-f16-256.safetensors

The checkpoint (google-research/maskgit: `tokenizer_imagenet256_checkpoint`, rFID 2.28) is a msgpack file written
by flax.serialization: params under encoder, decoder and quantizer.codebook, arrays as msgpack extension type 1
(shape, dtype name, raw bytes). It is read here with msgpack alone (no jax or flax), which decodes data and
never runs code. Flax names submodules in creation order (Conv_0, ResBlock_3, GroupNorm_1, ...); the
mapping below follows MaskGIT's `nets/vqgan_tokenizer.py`:

    encoder  Conv_0 conv_in, ResBlock_{level*B + j} down.level.block.j, then mid, GroupNorm_0 norm_out, Conv_1 conv_out
    decoder  Conv_0 conv_in, ResBlock_{0..B-1} mid, then levels from the coarsest, Conv_1.. upsample convs, last conv_out
    ResBlock GroupNorm_0 norm1, Conv_0 conv1, GroupNorm_1 norm2, Conv_1 conv2, Conv_2 nin_shortcut
    kernels (kh, kw, in, out) -> (out, in, kh, kw); GroupNorm scale -> weight

The result is loaded through the tokenizer's own strict check before it is written (.safetensors, or .bin
with torch.save)."""
from __future__ import annotations

import os
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(_ROOT, "data_prep")]

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from elt_scale.cli import ArgumentParser  # noqa: E402
from elt_scale.tokenizers.maskgit_vq import MaskGitVQGAN, check_layout, config_from_state  # noqa: E402


def _ext(code: int, data: bytes):
    import msgpack
    if code == 1:                                  # flax's ndarray: (shape, dtype name, C-order bytes)
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        if dtype == b"bfloat16":
            raise ValueError("bfloat16 arrays: convert the checkpoint to float32 first")
        return np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(shape)
    if code == 3:                                  # a numpy scalar: (dtype name, bytes)
        dtype, buffer = msgpack.unpackb(data, raw=True)
        return np.frombuffer(buffer, dtype=np.dtype(dtype.decode()))[0]
    return msgpack.ExtType(code, data)


def _unchunk(tree):
    """flax stores arrays over 1 GiB as {'__msgpack_chunked_array__', 'shape', 'chunks'}."""
    if not isinstance(tree, dict):
        return tree
    if "__msgpack_chunked_array__" in tree:
        shape = [tree["shape"][str(i)] for i in range(len(tree["shape"]))]
        return np.concatenate([tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def read_flax_msgpack(path: Path) -> dict:
    import msgpack
    try:
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=_ext, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"{path}: not a flax msgpack checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: holds a {type(tree).__name__}, expected flax's nested dict of params")
    tree = _unchunk(tree)
    params = tree.get("params", tree)
    if not isinstance(params, dict) or not {"encoder", "decoder", "quantizer"} <= set(params):
        found = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{path}: expected params encoder, decoder, quantizer (MaskGIT's VQVAE); found {found}")
    return params


def _numbered(tree: dict, kind: str) -> int:
    return sum(1 for k in tree if re.fullmatch(rf"{kind}_\d+", k))


def _leaf(module: dict, prefix: str, where: str) -> dict[str, np.ndarray]:
    """One flax Conv / GroupNorm -> torch names (kernel -> weight, transposed; scale -> weight)."""
    out = {}
    for name, value in module.items():
        value = np.asarray(value)
        if name == "kernel":
            out[f"{prefix}.weight"] = value.transpose(3, 2, 0, 1)
        elif name in ("scale", "bias"):
            out[f"{prefix}.{'weight' if name == 'scale' else 'bias'}"] = value
        else:
            raise ValueError(f"{where}: unexpected param {name!r} (MaskGIT's VQGAN has kernel, bias, scale)")
    return out


def _resblock(module: dict, prefix: str, where: str) -> dict[str, np.ndarray]:
    names = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "GroupNorm_1": "norm2", "Conv_1": "conv2",
             "Conv_2": "nin_shortcut"}
    out = {}
    for flax_name, sub in module.items():
        if flax_name not in names:
            raise ValueError(f"{where}: unexpected submodule {flax_name!r} in a ResBlock")
        out |= _leaf(sub, f"{prefix}.{names[flax_name]}", f"{where}/{flax_name}")
    return out


def _torch_name(side: str, flax_name: str, levels: int, blocks: int) -> str:
    """Where a flax submodule of the encoder or decoder lives in the torch network."""
    kind, n = flax_name.rsplit("_", 1)
    n = int(n)
    if kind == "GroupNorm" and n == 0:
        return f"{side}.norm_out"
    if side == "encoder" and kind == "Conv" and n < 2:
        return ("encoder.conv_in", "encoder.conv_out")[n]
    if side == "decoder" and kind == "Conv" and n <= levels:
        return "decoder.conv_in" if n == 0 else "decoder.conv_out" if n == levels else \
            f"decoder.up.{levels - n}.upsample_conv"
    if kind == "ResBlock" and side == "encoder":
        return f"encoder.down.{n // blocks}.block.{n % blocks}" if n < levels * blocks else \
            f"encoder.mid.{n - levels * blocks}"
    if kind == "ResBlock" and side == "decoder":
        m = n - blocks
        return f"decoder.mid.{n}" if m < 0 else f"decoder.up.{levels - 1 - m // blocks}.block.{m % blocks}"
    raise ValueError(f"params/{side}/{flax_name}: not a submodule of MaskGIT's VQGAN {side}")


def flax_to_state_dict(params: dict) -> dict[str, torch.Tensor]:
    levels = _numbered(params["decoder"], "Conv") - 1       # conv_in, one upsample conv per level but the finest, conv_out
    blocks = _numbered(params["encoder"], "ResBlock") // (levels + 1)   # per level, and as many in the middle
    if levels < 1 or blocks < 1:
        raise ValueError(f"params: {levels} levels of {blocks} blocks: not MaskGIT's VQGAN")
    out = {"quantize.embedding.weight": np.asarray(params["quantizer"]["codebook"])}
    for side in ("encoder", "decoder"):
        for flax_name, module in params[side].items():
            name, where = _torch_name(side, flax_name, levels, blocks), f"params/{side}/{flax_name}"
            out |= _resblock(module, name, where) if flax_name.startswith("ResBlock") else \
                _leaf(module, name, where)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in out.items()}


def convert(src: Path, out: Path) -> dict[str, torch.Tensor]:
    sd = flax_to_state_dict(read_flax_msgpack(src))
    check_layout(MaskGitVQGAN(config_from_state(sd, src)), sd, src)    # the loader's own strict check
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(tmp))
    else:
        torch.save(sd, tmp)
    tmp.replace(out)                               # never a half-written weights file under the real name
    return sd


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="the Flax msgpack file, e.g. tokenizer_imagenet256_checkpoint")
    p.add_argument("--out", required=True, help="the PyTorch state dict to write: .safetensors, or .bin (torch.save)")
    args = p.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    try:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file")
        sd = convert(src, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert_maskgit_flax: error: {e}", file=sys.stderr)
        return 2
    cfg = config_from_state(sd, out)
    print(f"{src} -> {out}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters, "
          f"{cfg.codebook_size} codes of {cfg.code_dim}, {cfg.downsample}x downsampling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
