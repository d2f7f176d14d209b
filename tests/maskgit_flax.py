"""Google's own MaskGIT VQGAN (the `maskgit` package on PyPI: google-research/maskgit's Flax code) as the
independent reference for `--tokenizer maskgit-vq` and data_prep/convert_maskgit_flax.py.

A tiny config of that network (same code, fewer channels and levels) gets seeded random params (every bias and
GroupNorm scale off its default, so a mis-mapped one shows); its codes and decoder output for seeded images
are stored in tests/data/maskgit_flax_tiny.npz with the param tree's names and shapes, so CI (without jax)
rebuilds the same params, writes them in flax's msgpack format, converts and compares. With jax, flax and
maskgit importable, `python -m tests.maskgit_flax` writes the file again and the live test reruns Flax."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "data" / "maskgit_flax_tiny.npz"
TINY = {"filters": 32, "channel_multipliers": [1, 1, 2], "num_res_blocks": 2, "codebook_size": 16,
        "embedding_dim": 4, "image_size": 16, "batch": 3}


def random_params(leaves: list[tuple[str, list[int]]], seed: int = 0) -> dict:
    """Nested params from ('encoder/ResBlock_0/Conv_0/kernel', shape) leaves, drawn in the listed order."""
    rng, tree = np.random.default_rng(seed), {}
    for path, shape in leaves:
        name, shape = path.rsplit("/", 1)[-1], tuple(shape)
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif name == "bias":
            value = 0.1 * rng.standard_normal(shape)
        else:                                          # the codebook
            value = rng.standard_normal(shape)
        node = tree
        for part in path.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[name] = value.astype(np.float32)
    return tree


def images(seed: int = 1) -> np.ndarray:
    """(B, H, W, 3) in [0, 1], NHWC as the Flax network takes them."""
    s = TINY["image_size"]
    return np.random.default_rng(seed).random((TINY["batch"], s, s, 3)).astype(np.float32)


def flax_msgpack(params: dict) -> bytes:
    """{'params': ...} in flax.serialization's format (ndarray = ext type 1 of (shape, dtype name, bytes))."""
    import msgpack

    def ext(obj):
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((list(obj.shape), obj.dtype.name, obj.tobytes())))
        raise TypeError(type(obj))
    return msgpack.packb({"params": params}, default=ext)


def flax_model():
    from maskgit.configs import vqgan_config
    from maskgit.nets import vqgan_tokenizer
    cfg = vqgan_config.get_config()
    for key in ("filters", "channel_multipliers", "num_res_blocks", "codebook_size", "embedding_dim"):
        cfg.vqvae[key] = TINY[key]
    return vqgan_tokenizer.VQVAE(config=cfg, train=False)


def flax_reference() -> dict:
    """Leaves, codes and decoder output (before the clamp) of Google's network on the seeded params/images."""
    import jax
    import jax.numpy as jnp
    model = flax_model()
    s = TINY["image_size"]
    shapes = model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)),
                        method=lambda m, x: m.decoder(m.encode({"image": x})[0]))["params"]
    leaves = [("/".join(k.key for k in path), list(np.shape(v)))
              for path, v in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    variables = {"params": random_params(leaves)}
    codes = np.asarray(model.apply(variables, images(), method=model.encode_to_indices))
    decoded = np.asarray(model.apply(variables, codes, method=model.decode_from_indices))
    return {"leaves": leaves, "codes": codes, "decoded": decoded, "variables": variables}


def write_fixture() -> None:
    ref = flax_reference()
    FIXTURE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURE, leaves=json.dumps(ref["leaves"]), config=json.dumps(TINY),
                        codes=ref["codes"].astype(np.int16), decoded=ref["decoded"].astype(np.float32))


def read_fixture() -> dict:
    with np.load(FIXTURE) as f:
        return {"leaves": json.loads(str(f["leaves"])), "config": json.loads(str(f["config"])),
                "codes": f["codes"], "decoded": f["decoded"]}


if __name__ == "__main__":
    write_fixture()
    print(f"wrote {FIXTURE}")
