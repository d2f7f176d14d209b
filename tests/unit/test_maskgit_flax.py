"""`--tokenizer maskgit-vq` and data_prep/convert_maskgit_flax.py against Google's own Flax network
(google-research/maskgit, the `maskgit` package): tests/maskgit_flax.py says how the reference was made.

In CI the reference is the stored output of a tiny config of Google's network on seeded random params; where
jax, flax and maskgit are importable, the live test reruns Google's network and also checks the stored file
is what it gives. Run at the real config once (2 images at 256², 2026-12-07): 512 of 512 codes equal, decoder
output within 5e-5 (of values up to 4.1), parameter counts equal (54,515,587)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep import convert_maskgit_flax
from elt_scale.tokenizers import build_tokenizer
from tests import maskgit_flax


def check_against(codes_ref: np.ndarray, decoded_ref: np.ndarray, weights, atol: float = 1e-4):
    tok = build_tokenizer("maskgit-vq", path=str(weights), device="cpu")
    x = torch.from_numpy(maskgit_flax.images()).permute(0, 3, 1, 2)        # NHWC -> NCHW
    codes = tok.encode(x)
    assert torch.equal(codes.long(), torch.from_numpy(codes_ref).long())
    with torch.no_grad():                                                  # before the clamp: all of it compared
        out = tok.model.decoder(tok.model.quantize.lookup(codes)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, decoded_ref, atol=atol, rtol=0)
    assert np.abs(decoded_ref).max() > 1                                   # so the clamp would have hidden some
    torch.testing.assert_close(tok.decode(codes), torch.from_numpy(decoded_ref).permute(0, 3, 1, 2).clamp(0, 1),
                               atol=atol, rtol=0)


def test_converted_flax_params_give_googles_codes_and_pixels(tmp_path, capsys):
    ref = maskgit_flax.read_fixture()
    assert ref["config"] == maskgit_flax.TINY
    src = tmp_path / "tokenizer_checkpoint"
    src.write_bytes(maskgit_flax.flax_msgpack(maskgit_flax.random_params(ref["leaves"])))
    out = tmp_path / "maskgit.safetensors"
    assert convert_maskgit_flax.main([str(src), "--out", str(out)]) == 0
    assert "16 codes of 4, 4x downsampling" in capsys.readouterr().out
    check_against(ref["codes"], ref["decoded"], out)
    assert convert_maskgit_flax.main([str(src), "--out", str(tmp_path / "maskgit.bin")]) == 0     # torch.save
    check_against(ref["codes"], ref["decoded"], tmp_path / "maskgit.bin")


def test_converter_errors_are_one_line_exit_2(tmp_path, capsys):
    ref = maskgit_flax.read_fixture()
    params = maskgit_flax.random_params(ref["leaves"])
    params["decoder"]["Conv_9"] = params["decoder"].pop("Conv_3")        # the last conv, misnamed
    src = tmp_path / "ck"
    src.write_bytes(maskgit_flax.flax_msgpack(params))
    assert convert_maskgit_flax.main([str(src), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "params/decoder/Conv_9: not a submodule" in err, err
    src.write_bytes(b"\x93garbage")
    assert convert_maskgit_flax.main([str(src), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "ck: " in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_live_against_googles_flax_network(tmp_path):
    pytest.importorskip("flax")
    pytest.importorskip("maskgit.nets.vqgan_tokenizer")
    from flax import serialization
    live = maskgit_flax.flax_reference()
    stored = maskgit_flax.read_fixture()
    assert [[k, list(s)] for k, s in live["leaves"]] == stored["leaves"]
    assert np.array_equal(live["codes"], stored["codes"])
    np.testing.assert_allclose(live["decoded"], stored["decoded"], atol=1e-5, rtol=0)
    src = tmp_path / "ck"
    src.write_bytes(serialization.to_bytes(live["variables"]))                 # flax's own writer
    assert convert_maskgit_flax.main([str(src), "--out", str(tmp_path / "w.safetensors")]) == 0
    check_against(live["codes"], live["decoded"], tmp_path / "w.safetensors")
