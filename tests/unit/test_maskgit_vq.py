"""`--tokenizer maskgit-vq`: MaskGIT's VQGAN written here, loading the published PyTorch state dict.

The real-size network is held to the published key layout (written out below from the description, not from
the class); each of the original's quirks is checked on a small case computed by hand; tiny random models go
through the same class, saved and loaded like the published file. Agreement with Google's own Flax network is
tests/unit/test_maskgit_flax.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep import tokenize
from elt_scale.tokenizers import build_tokenizer, tokenizer_from_manifest
from elt_scale.tokenizers import maskgit_vq
from elt_scale.tokenizers.maskgit_vq import (HUB_FILE, HUB_REPO, Level, MaskGitVQGAN, Quantizer, ResBlock,
                                             VQGANConfig)
from tests.datasets import read_samples
from tests.tiny_tokenizers import make_imagenet_tree, write_maskgit_vq


def published_layout() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of maskgit-vqgan-imagenet-f16-256.bin as the published description gives them:
    128 channels x [1, 1, 2, 2, 4], two residual blocks per level and in each middle, no attention, bias-free
    residual convs with a 1x1 shortcut where the width changes, 1024 codes of 256."""
    layout = {}

    def conv(name, cin, cout, k, bias):
        layout[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            layout[f"{name}.bias"] = (cout,)

    def gn(name, c):
        layout[f"{name}.weight"] = layout[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        gn(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3, False)
        gn(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3, False)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cout, 1, False)

    widths = [128, 128, 256, 256, 512]
    conv("encoder.conv_in", 3, 128, 3, False)
    cin = 128
    for i, w in enumerate(widths):
        for j in range(2):
            res(f"encoder.down.{i}.block.{j}", cin, w)
            cin = w
    for j in range(2):
        res(f"encoder.mid.{j}", 512, 512)
    gn("encoder.norm_out", 512), conv("encoder.conv_out", 512, 256, 1, True)
    conv("decoder.conv_in", 256, 512, 3, True)
    for j in range(2):
        res(f"decoder.mid.{j}", 512, 512)
    for i in reversed(range(5)):
        for j in range(2):
            res(f"decoder.up.{i}.block.{j}", cin, widths[i])
            cin = widths[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample_conv", widths[i], widths[i], 3, True)
    gn("decoder.norm_out", 128), conv("decoder.conv_out", 128, 3, 3, True)
    layout["quantize.embedding.weight"] = (1024, 256)
    return layout


# Google's Flax network at the real config (google-research/maskgit nets/vqgan_tokenizer.py, run through
# flax 0.12.8 / jax 0.10.2 on 2026-12-07) has this many parameters; no published figure was found.
FLAX_PARAMS = 54_515_587


def test_real_size_network_has_the_published_layout():
    model = MaskGitVQGAN()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = published_layout()
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    assert got == want
    assert got["quantize.embedding.weight"] == (1024, 256) and len(got) == 168
    assert sum(p.numel() for p in model.parameters()) == FLAX_PARAMS
    assert model.config == VQGANConfig() and model.config.downsample == 16
    assert not any("attn" in k or "quant_conv" in k for k in got)


# ---------------------------------------------------------------------------------------------
# the quirks, each on a case computed by hand

def test_downsampling_is_2x2_average_pooling_without_weights():
    level = Level(1, 1, VQGANConfig(num_res_blocks=0, groups=1), "down")
    assert not list(level.parameters())                    # a strided conv would have some
    x = torch.tensor([[1., 2., 3., 4.], [5., 6., 7., 8.]]).view(1, 1, 2, 4)
    assert torch.equal(level(x), torch.tensor([[3.5, 5.5]]).view(1, 1, 1, 2))


def test_upsampling_is_nearest_then_a_same_padded_3x3_conv():
    level = Level(1, 1, VQGANConfig(num_res_blocks=0, groups=1), "up")
    with torch.no_grad():
        level.upsample_conv.weight.fill_(1.0)
        level.upsample_conv.bias.zero_()
    out = level(torch.tensor([[1., 2.]]).view(1, 1, 1, 2))
    # nearest x2: [[1,1,2,2],[1,1,2,2]]; an all-ones 3x3 over it with one zero row/column of padding each side
    assert torch.equal(out, torch.tensor([[4., 8., 10., 8.], [4., 8., 10., 8.]]).view(1, 1, 2, 4))


def test_width_changing_block_adds_its_shortcut_of_its_output():
    block = ResBlock(1, 2, groups=1)
    assert block.conv1.bias is None and block.conv2.bias is None and block.nin_shortcut.bias is None
    assert tuple(block.nin_shortcut.weight.shape) == (2, 2, 1, 1)      # fed the output's 2 channels, not the input's 1
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.norm1.weight.fill_(1), block.norm2.weight.fill_(1)
        block.conv1.weight[:, 0, 1, 1] = 1.0                           # centre taps: 1 -> 2 copies
        block.conv2.weight[0, 0, 1, 1] = block.conv2.weight[1, 1, 1, 1] = 1.0
        block.nin_shortcut.weight[0, 0] = 2.0
        block.nin_shortcut.weight[1, 1] = 3.0
    # x = [-1, 1] normalises to [-1, 1]; so does each channel of conv1's output; h = silu([-1, 1]) per channel
    h = torch.tensor([-1 / (1 + np.e), 1 / (1 + np.exp(-1))], dtype=torch.float32)
    out = block(torch.tensor([[-1., 1.]]).view(1, 1, 1, 2))
    torch.testing.assert_close(out.view(2, 2), torch.stack([3 * h, 4 * h]), atol=1e-5, rtol=0)  # h + [2h, 3h]


def test_encoder_ends_in_a_1x1_conv_into_code_space():
    cfg = VQGANConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, code_dim=8)
    conv_out = MaskGitVQGAN(cfg).encoder.conv_out
    assert conv_out.kernel_size == (1, 1) and conv_out.padding == (0, 0) and conv_out.out_channels == 8
    x = torch.zeros(1, 64, 3, 3)
    x[0, :, 1, 2] = 1.0
    moved = (conv_out(x) - conv_out.bias.view(1, -1, 1, 1)).abs().sum(1)[0]
    assert moved[1, 2] > 0 and moved.sum() == moved[1, 2]             # a position sees only itself


def test_nearest_code_is_plain_l2_in_fp32():
    q = Quantizer(VQGANConfig(codebook_size=3, code_dim=2))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0., 0.], [3., 0.], [0., 10.]]))
    z = torch.tensor([[1., 0.], [2., 0.], [0., 6.], [0., 4.]]).t().reshape(1, 2, 2, 2)
    # (1, 0) is nearer (0, 0) than (3, 0): a normalised (cosine) search would pick (3, 0)
    assert q.nearest(z).tolist() == [[[0, 1], [2, 0]]]
    assert q.nearest(z.to(torch.bfloat16)).dtype == torch.int64


def test_decoded_images_are_clamped_to_0_1():
    model = MaskGitVQGAN(VQGANConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, codebook_size=4,
                                     code_dim=4))
    with torch.no_grad():
        model.decoder.conv_out.weight.zero_()
        model.decoder.conv_out.bias.copy_(torch.tensor([0.25, 2.0, -3.0]))
    img = model.decode(torch.tensor([[[0, 1], [2, 3]]]))
    assert img.shape == (1, 3, 4, 4)
    assert img[0, 0].eq(0.25).all() and img[0, 1].eq(1).all() and img[0, 2].eq(0).all()


# ---------------------------------------------------------------------------------------------
# the tokenizer

def two_level_autoencoder(path: Path) -> Path:
    """Weights set by hand so the network is an exact autoencoder of two-level block images (random weights
    are not an autoencoder): residual branches zero (blocks pass their input on), the red channel carried
    through average pooling / nearest upsampling, and GroupNorm + swish making each block's level
    silu(+-1)-like, which the two codes hold. Any transposition, lookup or dtype slip breaks the round trip."""
    model = MaskGitVQGAN(VQGANConfig(channels=32, channel_mult=(1, 1), num_res_blocks=1, codebook_size=2,
                                     code_dim=1))
    silu = F.silu(torch.tensor([-1.0, 1.0]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm1.weight") and not name.endswith("norm2.weight") and "norm_out" not in name:
                p.zero_()
        model.encoder.conv_in.weight[0, 0, 1, 1] = 1.0
        model.encoder.conv_out.weight[0, 0] = 1.0
        model.quantize.embedding.weight[:, 0] = silu
        model.decoder.conv_in.weight[0, 0, 1, 1] = 1.0
        model.decoder.up[1].upsample_conv.weight[0, 0, 1, 1] = 1.0
        model.decoder.conv_out.weight[:, 0, 1, 1] = 1.0
        model.decoder.conv_out.bias.fill_(-float(silu[0]))                # pixels 0 (low) and >= 1 (high)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_encode_decode_encode_gives_the_same_codes(tmp_path):
    tok = build_tokenizer("maskgit-vq", path=str(two_level_autoencoder(tmp_path / "ae.bin")), device="cpu")
    assert tok.output_shape(3, [4, 6]) == [2, 3] and tok.vocab_size == 2
    codes = torch.tensor([[[0, 1, 1], [0, 0, 1]], [[1, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 0, 1]]], dtype=torch.int16)
    images = tok.decode(codes)
    assert images.shape == (3, 3, 4, 6) and 0 <= images.min() and images.max() == 1
    again = tok.encode(images)
    assert again.dtype == torch.int16 and torch.equal(again, codes)
    assert torch.equal(tok.encode(tok.decode(again)), codes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_maskgit_vq(tmp_path_factory.mktemp("mgvq") / "tiny.bin", spatial=16, vocab=64)


def test_tokenizer_is_the_network_on_0_1_pixels_with_fp32_codes(tiny):
    tok = build_tokenizer("maskgit-vq", path=str(tiny), device="cpu")
    assert tok.manifest_entry() == {"name": "maskgit-vq", "path": str(tiny.resolve())}
    assert (tok.vocab_size, tok.dtype, tok.kind, tok.config.downsample) == (64, np.int16, "codes", 16)
    model = maskgit_vq.load_maskgit_vqgan(tiny)
    x = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    codes = tok.encode(x)
    assert codes.shape == (3, 2, 3) and torch.equal(codes.long(), model.encode(x))     # no [-1, 1] rescale
    assert len(codes.unique()) > 1
    torch.testing.assert_close(tok.decode(codes), model.decode(codes.long()))
    with pytest.raises(ValueError, match="sides divisible by 16"):
        tok.encode(torch.rand(1, 3, 40, 32))
    half = build_tokenizer("maskgit-vq", path=str(tiny), device="cpu", precision="bf16")
    assert half.model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert half.model.quantize.embedding.weight.dtype == torch.float32       # codebook and search stay fp32
    assert half.encode(x).shape == (3, 2, 3) and half.decode(codes).dtype == torch.float32


def test_safetensors_and_a_directory_holding_the_file(tmp_path, tiny):
    st = write_maskgit_vq(tmp_path / "w.safetensors", vocab=64)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(build_tokenizer("maskgit-vq", path=str(st), device="cpu").encode(x),
                       build_tokenizer("maskgit-vq", path=str(tiny), device="cpu").encode(x))  # same seed, same net
    folder = write_maskgit_vq(tmp_path / "folder", vocab=64).parent
    tok = build_tokenizer("maskgit-vq", path=str(folder), device="cpu")
    assert tok.path == str(folder / HUB_FILE)
    (folder / "other.safetensors").write_bytes(b"")
    (folder / HUB_FILE).rename(folder / "renamed.bin")
    with pytest.raises(FileNotFoundError, match="holds 2 weights files"):
        build_tokenizer("maskgit-vq", path=str(folder))


def test_a_hub_id_is_fetched_through_huggingface_hub(monkeypatch, tiny):
    import huggingface_hub
    asked = []

    def fake_download(repo_id, filename, **_):
        asked.append((repo_id, filename))
        if repo_id != HUB_REPO:
            raise OSError("404 Client Error.\nRepository Not Found")
        return str(tiny)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tok = build_tokenizer("maskgit-vq", path=HUB_REPO, device="cpu")
    assert asked == [(HUB_REPO, HUB_FILE)] and tok.manifest_entry()["path"] == HUB_REPO
    with pytest.raises(FileNotFoundError) as e:
        build_tokenizer("maskgit-vq", path="someone/else")
    assert "someone/else: not a local path" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        build_tokenizer("maskgit-vq", path="/models/missing.bin")


def test_a_renamed_key_is_one_line_naming_it(tmp_path, tiny):
    sd = torch.load(tiny, weights_only=True)
    sd["decoder.up.1.block.0.norm1.gamma"] = sd.pop("decoder.up.1.block.0.norm1.weight")
    torch.save(sd, tmp_path / "renamed.bin")
    with pytest.raises(ValueError) as e:
        build_tokenizer("maskgit-vq", path=str(tmp_path / "renamed.bin"))
    msg = str(e.value)
    assert "missing key 'decoder.up.1.block.0.norm1.weight'" in msg and "\n" not in msg
    assert "unexpected key 'decoder.up.1.block.0.norm1.gamma'" in msg and "renamed.bin" in msg
    sd = torch.load(tiny, weights_only=True)
    sd["encoder.mid.0.conv1.weight"] = sd["encoder.mid.0.conv1.weight"][:, :, :1]
    torch.save(sd, tmp_path / "shape.bin")
    with pytest.raises(ValueError, match=r"key 'encoder.mid.0.conv1.weight' has shape \[64, 64, 1, 3\]"):
        build_tokenizer("maskgit-vq", path=str(tmp_path / "shape.bin"))


class WritesAFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")          # unpickling this creates the file


def test_a_pickled_payload_is_refused_without_running_it(tmp_path, tiny):
    target = tmp_path / "pwned"
    bad = tmp_path / "payload.bin"
    sd = torch.load(tiny, weights_only=True)
    torch.save({**sd, "extra": WritesAFile(target)}, bad)
    with pytest.raises(ValueError, match=r"refused: it pickles (io|builtins)\.open, not only tensors"):
        build_tokenizer("maskgit-vq", path=str(bad))
    assert not target.exists()
    torch.load(bad, weights_only=False)                # the payload is live: a plain load runs it
    assert target.exists()


def test_tokenize_cli_writes_16x16_style_codes_and_decodes_them(tmp_path, tiny, capsys):
    tree = make_imagenet_tree(tmp_path / "imagenet", per_class=2)
    out = tmp_path / "shards"
    assert tokenize.main(["--source", "imagenet", "--input", str(tree), "--resolution", "32", "--tokenizer",
                          "maskgit-vq", "--tokenizer-path", str(tiny), "--out", str(out), "--workers", "0",
                          "--device", "cpu"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["sample"] == {"kind": "codes", "shape": [2, 2], "dtype": "int16", "vocab_size": 64,
                           "scaling_factor": 1.0}
    assert m["tokenizer"] == {"name": "maskgit-vq", "path": str(tiny.resolve())}
    samples = read_samples(out)
    codes = torch.from_numpy(np.stack([x for _, x, _ in samples.values()]))
    from data_prep.decode import ImageDecoder
    pixels = torch.stack([ImageDecoder(32)(str(tree / src)) for _, _, src in samples.values()])
    assert torch.equal(codes.long(), maskgit_vq.load_maskgit_vqgan(tiny).encode(pixels))
    assert tokenizer_from_manifest(m, device="cpu").decode(codes).shape == (4, 3, 32, 32)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert tokenize.main(["--source", "imagenet", "--input", str(tree), "--resolution", "32", "--tokenizer",
                          "maskgit-vq", "--tokenizer-path", str(bad), "--out", str(tmp_path / "o2"),
                          "--workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elt-tokenize: error: ") and err.count("\n") == 1, err
    assert "bad.bin: not a PyTorch weights file" in err


def test_masked_imagenet_recipe_trains_on_maskgit_codes_and_samples_images(tmp_path):
    """The paper's headline recipe (ELT-XL 7N×4L) fed end to end: an ImageNet-shaped tree through a tiny random
    maskgit-vq (16× down, 1024 codes, like the published one) at 32² pixels (2×2 codes instead of 16×16), a tiny
    trunk trained 2 steps, then elt-sample decoding through the tokenizer the manifest names."""
    import subprocess
    import sys

    from PIL import Image

    from elt_scale.config import load_recipe
    from elt_scale.data import check_manifest
    from tests.conftest import ROOT, read_metrics, run_train, shrunk_masked_overrides

    weights = write_maskgit_vq(tmp_path / "models" / "maskgit-vqgan-imagenet-f16-256.bin", spatial=16, vocab=1024)
    tree, shards = make_imagenet_tree(tmp_path / "imagenet", per_class=2), tmp_path / "in256-vq"
    assert tokenize.main(["--source", "imagenet", "--input", str(tree), "--resolution", "32", "--tokenizer",
                          "maskgit-vq", "--tokenizer-path", str(weights.parent), "--out", str(shards),
                          "--workers", "0", "--device", "cpu"]) == 0
    overrides = shrunk_masked_overrides(shards, tmp_path, "[2,2]", steps=2)
    recipe = load_recipe(ROOT / "recipes" / "imagenet256_masked_elt_xl_7x4.yaml", overrides)
    assert recipe.model.vocab_size == 1024
    check_manifest(json.loads((shards / "manifest.json").read_text()), recipe, str(shards))
    r = run_train("imagenet256_masked_elt_xl_7x4.yaml", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "imagenet256_masked_elt_xl_7x4"
    rows = [row for row in read_metrics(run) if "loss" in row]
    assert len(rows) == 2 and all(np.isfinite(row["loss"]) for row in rows)
    assert (run / "samples" / "step_0000002" / "grid_L2.png").exists()      # in-training grid, decoded

    out = tmp_path / "samples"
    r = subprocess.run([sys.executable, "-m", "elt_scale.sample", str(run), "--loops", "1,2", "-n", "4",
                        "--steps", "3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out / "samples_L2.npz") as f:
        imgs, labels = f["arr_0"], f["arr_1"]
    assert imgs.dtype == np.uint8 and imgs.shape == (4, 32, 32, 3) and len(labels) == 4
    with Image.open(out / "grid_L2.png") as grid:
        assert grid.size[0] >= 32
