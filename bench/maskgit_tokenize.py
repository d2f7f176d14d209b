"""Benchmark: MaskGIT's VQGAN tokenizer (`--tokenizer maskgit-vq`) throughput, images/s, and what it implies for
ImageNet-1k train (1,281,167 images).

Protocol
--------
The real-size network (128 channels x [1, 1, 2, 2, 4], 54.5M parameters) with random weights (the speed does not
depend on the values) goes through the tokenizer class the shards are written with (`MaskGitVQTokenizer`: the
encoder in --precision, the nearest-code search in fp32), on random 256² images. Encode (images -> codes, what
tokenize.py runs) and decode (codes -> images, what sampling runs): --warmup batches untimed, then --batches
batches of --batch images timed one by one; images/s = batch / median batch time. Decoding the images from JPEG
and writing shards are not included (bench/dataloader.py times tokenize.py end to end with the pixels tokenizer).

    python bench/maskgit_tokenize.py [--batch 8] [--batches 3] [--precision auto] [--out result.json]
    python bench/maskgit_tokenize.py --tiny            # smoke test: a tiny network at 64² (tests/unit/test_bench.py)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import device_facts, sync, write_json  # noqa: E402  (bench/common.py puts the root on sys.path)
from elt_scale.tokenizers.maskgit_vq import MaskGitVQGAN, VQGANConfig  # noqa: E402
from elt_scale.tokenizers.maskgit_vq import MaskGitVQTokenizer  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def timed(fn, batches: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(batches):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def conv_gflops(module: torch.nn.Module, x: torch.Tensor) -> float:
    """2 x multiply-adds of every convolution in one forward pass (norms, pooling and the code search left out)."""
    total = []

    def hook(conv, _, out):
        total.append(2 * out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return sum(total) / len(x) / 1e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=3, help="timed batches")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a tiny network at 64² (smoke test)")
    p.add_argument("--out", default=None, help="JSON result")
    args = p.parse_args(argv)
    cfg = VQGANConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, codebook_size=64, code_dim=8) \
        if args.tiny else VQGANConfig()
    side = 64 if args.tiny else 256
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:       # through the file, as tokenize.py loads it
        weights = Path(d) / "maskgit.bin"
        torch.save(MaskGitVQGAN(cfg).state_dict(), weights)
        tok = MaskGitVQTokenizer(str(weights), device=args.device, precision=args.precision)
    images = torch.rand(args.batch, 3, side, side)
    codes = tok.encode(images)
    rows = {}
    for what, fn in (("encode", lambda: tok.encode(images)), ("decode", lambda: tok.decode(codes))):
        times = timed(fn, args.batches, args.warmup)
        rate = args.batch / statistics.median(times)
        rows[what] = {"images_per_s": rate, "batch_s": times}
        print(f"{what}: {rate:.2f} images/s ({args.batch} images of {side}², median of {args.batches} batches"
              f" {statistics.median(times):.2f} s)")
    one = images[:1].to(tok.device, tok.compute_dtype)
    gflops = {"encoder": conv_gflops(tok.model.encoder, one),
              "decoder": conv_gflops(tok.model.decoder, tok.model.quantize.lookup(codes[:1].to(tok.device))
                                     .to(tok.compute_dtype))}
    hours = IMAGENET_TRAIN / rows["encode"]["images_per_s"] / 3600
    params = sum(v.numel() for v in tok.model.parameters())
    result = {"meta": {**device_facts(), "threads": torch.get_num_threads(), "precision": str(tok.compute_dtype),
                       "params": params, "side": side, "batch": args.batch, "tiny": args.tiny},
              **rows, "conv_gflops_per_image": gflops, "imagenet_train_encode_hours": hours}
    print(f"maskgit_tokenize: {params:,} params, {tok.compute_dtype}, {result['meta']['device']}, "
          f"{torch.get_num_threads()} threads, {gflops['encoder']:.0f} / {gflops['decoder']:.0f} conv GFLOPs per image "
          f"(encoder / decoder): ImageNet train (1,281,167 images) would take {hours:.1f} h to encode")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
