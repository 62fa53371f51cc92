"""LocalMIM (localmim.py): HOG targets, scales, masks, loss, the visible-only encoders, --stop-grad, and short runs."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import localmim
import swin
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-patch-size", "4", "--depth", "4"]
CPU = ["--device", "cpu", "--no-compile", "--workers", "0"]


def tiny_vit(depth=4, **kw):
    torch.manual_seed(0)
    enc = vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth, num_classes=0,
                           pos_embed="sincos")
    return localmim.LocalMIM(enc, **kw)


def tiny_swin(**kw):  # 128 px: 4x4 mask units of 32 px, stage outputs 32/16/8/4, decoder grids 16/8/4/4
    torch.manual_seed(0)
    enc = swin.SwinTransformer(img_size=128, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                               window_size=4, num_classes=0, norm_eps=1e-6)
    return localmim.LocalMIM(enc, nbins=18, hog_bias=True, **kw)


def hog(img, cells=(1, 2, 4, 8), nbins=9, bias=False):
    return localmim.HOG(nbins, list(cells), bias)(img)


# ---- HOG against hand-computed cases ------------------------------------------------------------------------------

def test_hog_vertical_edge_is_bin_4_of_9_and_18():
    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:] = 1.0  # dark | bright: the Sobel x response (left - right) is -4 at columns 7 and 8, phase -pi/2
    for nbins, b in ((9, 4), (18, 9)):
        fine, _, mid, coarse = hog(img, nbins=nbins)
        one_hot = torch.zeros(3 * nbins)
        one_hot[[b, nbins + b, 2 * nbins + b]] = 1.0
        assert torch.allclose(coarse, one_hot.expand(1, 4, -1))  # both 8-px cells hold one edge column
        grid = mid.view(4, 4, -1)
        assert torch.allclose(grid[:, 1:3], one_hot.expand(4, 2, -1))  # the 4-px cells beside the edge
        assert grid[:, [0, 3]].abs().sum() == 0  # the others are flat: zero vectors
        assert torch.allclose(fine.view(16, 16, -1)[:, 7:9], one_hot.expand(16, 2, -1))  # 1-px cells: one-hot
        assert fine.view(16, 16, -1)[:, :7].abs().sum() == 0


def test_hog_horizontal_edge_is_bin_0_and_negation_invariant():
    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:, :] = 1.0  # top - bottom = -4: atan2(0, -4) = pi -> bin 9 mod 9 = 0
    coarse = hog(img)[3]
    assert torch.allclose(coarse[0, :, [0, 9, 18]], torch.ones(4, 3)) and coarse[0, :, 1:9].abs().sum() == 0
    x = torch.randn(2, 3, 16, 16)
    for a, b in zip(hog(x), hog(-x)):  # opposite gradient directions share a bin (unsigned orientation)
        assert torch.allclose(a, b, atol=1e-6)


def test_hog_atan2_argument_order_and_reflect_padding():
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    img = (x + 2 * y).expand(1, 3, 16, 16)  # left - right = -8, top - bottom = -16 everywhere inside
    fine = hog(img)[0].view(16, 16, 3, 9)
    # atan2(-8, -16) = -2.68 -> floor(-7.67) = -8 mod 9 = bin 1; the usual atan2(gy, gx) would give bin 3
    assert (fine[1:-1, 1:-1].argmax(-1) == 1).all()
    # reflect padding: at the left border the pixel left of x=0 is x=1, so the x response there is 0: the
    # direction is pure y, atan2(0, -16) = pi -> bin 0 (zero padding would leave bin 1)
    assert (fine[1:-1, 0].argmax(-1) == 0).all()


def test_hog_flat_cells_and_colour_order_and_bias():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert all(t.abs().sum() == 0 for t in hog(flat))  # no bias: zero vectors
    torch.manual_seed(0)
    layer = localmim.HOG(9, [4, 8], bias=True)
    assert layer.bias.shape == (2, 2) and layer.bias.abs().max() <= 1 / 3  # one draw per scale, U(+-1/3)
    for k, t in enumerate(layer(flat)):  # bias on: the constant response b lands in the bin of atan2(b0, b1)
        b = layer.bias[k]
        expect = math.floor(math.atan2(b[0], b[1]) / math.pi * 9) % 9
        assert torch.allclose(t[0, :, [expect, 9 + expect, 18 + expect]], torch.ones(t.shape[1], 3))
    img = torch.zeros(1, 3, 16, 16)
    img[:, 1, :, 8:] = 1.0  # an edge in the green plane only: bins 9..17 of [R | G | B]
    coarse = hog(img)[3][0]
    assert coarse[:, :9].abs().sum() == 0 and coarse[:, 18:].abs().sum() == 0
    assert torch.allclose(coarse[:, 13], torch.ones(4))


def test_hog_equals_the_one_hot_map_average_pooled():
    """HOG adds each pixel's magnitude into its (plane, bin, cell) slot: the official HOGLayer's full-resolution
    one-hot map average-pooled per cell, including the rows and columns avg_pool2d leaves out (36 px, 8-px cells)."""
    torch.manual_seed(0)
    img = torch.randn(2, 3, 36, 36)
    for bias in (False, True):
        layer = localmim.HOG(9, [4, 8, 16], bias=bias)
        g = F.conv2d(F.pad(img.reshape(6, 1, 36, 36), (1, 1, 1, 1), mode="reflect"), layer.sobel)  # (6, 2, H, W)
        for k, (c, out) in enumerate(zip([4, 8, 16], layer(img))):
            gk = g + layer.bias[k].view(1, 2, 1, 1) if bias else g
            bins = (torch.atan2(gk[:, 0], gk[:, 1]) / math.pi * 9).floor().long() % 9
            onehot = torch.zeros(6, 9, 36, 36).scatter_(1, bins[:, None], torch.hypot(gk[:, 0], gk[:, 1])[:, None])
            ref = F.normalize(F.avg_pool2d(onehot, c), dim=1)  # (6, 9, 36 // c, 36 // c)
            ref = ref.view(2, 27, -1).transpose(1, 2)
            assert out.shape == ref.shape == (2, (36 // c) ** 2, 27)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_targets_are_fp32_without_grad_under_autocast():
    model = tiny_vit()
    img = torch.randn(2, 3, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for t in model.targets(img):
            assert t.dtype == torch.float32 and not t.requires_grad
    pix = tiny_vit(target="pixel").targets(img)
    x = localmim.patchify(img.detach(), 8)  # (B, 16, 192): 8-px cells, rows in (row, col, channel) order
    assert torch.equal(x[0, 0, :6], img[0, :, 0, :2].detach().T.flatten())
    ref = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(pix[3], ref, atol=1e-6)
    assert torch.equal(localmim.unpatchify(x, 8, 32), img.detach())


# ---- scales, shapes and masks ------------------------------------------------------------------------------------

def test_vit_shapes_at_every_scale():
    for target, dims in (("hog", [27] * 4), ("pixel", [3, 12, 48, 192])):  # pixel: 3 c^2 for cells 1/2/4/8 px
        model = tiny_vit(target=target)
        assert model.grids == [32, 16, 8, 4] and model.cells == [1, 2, 4, 8]
        loss, terms, preds, targets, masks = model(torch.randn(2, 3, 32, 32))
        for g, d, p, t, m in zip(model.grids, dims, preds, targets, masks):
            assert p.shape == t.shape == (2, g * g, d) and m.shape == (2, g * g)
        assert terms.shape == (4,) and torch.isclose(loss, terms.sum())


def test_vit_b_decoders_match_the_official_ones():
    # parameter counts of the official MAE_Decoders of ViT-B (localmim.md), pos_embed included
    counts = [sum(p.numel() for p in localmim.ViTDecoder(768, (14, 14), s, 27).parameters()) for s in (4, 2, 1, 0.5)]
    assert [round(c / 1e6, 3) for c in counts] == [1.204, 1.173, 1.045, 1.045]
    keys = tiny_vit(depth=7).state_dict()
    for k in ("norm.3.weight", "decoder.0.pred.1.weight", "decoder.0.pred.4.weight", "decoder.1.pred.1.weight",
              "decoder.2.pred.0.weight", "decoder.3.pred.1.weight", "decoder.0.blocks.0.attn.qkv.weight",
              "decoder.0.mask_token", "decoder.0.embed.weight"):
        assert k in keys, k
    assert localmim.local_layers(12) == [1, 3, 9, 11] and localmim.local_layers(24) == [1, 3, 21, 23]
    for depth in range(4, 13):  # shallow models: 4 distinct blocks, increasing, the last one on top
        ids = localmim.local_layers(depth)
        assert len(set(ids)) == 4 and ids == sorted(ids) and ids[-1] == depth - 1
    assert localmim.local_layers(4) == [0, 1, 2, 3] and localmim.local_layers(7) == [1, 3, 4, 6]


def test_swin_shapes_at_every_scale():
    model = tiny_swin()
    assert model.grids == [16, 8, 4, 4] and model.cells == [8, 16, 32, 32] and model.mask_grid == 4
    _, _, preds, targets, masks = model(torch.randn(2, 3, 128, 128))
    for g, p, t, m in zip(model.grids, preds, targets, masks):
        assert p.shape == t.shape == (2, g * g, 54) and m.shape == (2, g * g)
    mask = model.random_mask(1, "cpu")  # 4 x 4 units of 32 px, int(0.75 * 16) + 1 = 13 masked: 3 visible
    latents = model.encode(torch.randn(1, 3, 128, 128), mask)  # the visible tokens of each scale, and where they are
    assert [tuple(z.shape) for z, _ in latents] == [(1, 48, 32), (1, 12, 64), (1, 3, 128), (1, 3, 128)]
    for (_, where), g in zip(latents, model.grids):
        hidden = localmim.mask_to_scale(mask, g)[0]
        assert torch.equal(torch.where(hidden == 0)[0], where)  # raster positions of the visible cells
    two = swin.SwinTransformer(img_size=64, embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4, num_classes=0)
    with pytest.raises(ValueError, match="a Swin of 2 stages"):
        localmim.LocalMIM(two)


def test_random_masks():
    torch.manual_seed(0)
    m = tiny_vit().random_mask(4, "cpu")  # (4, 8, 8): MAE keeps int(64 * 0.25) = 16 per sample
    assert m.shape == (4, 8, 8) and (m.flatten(1).sum(1) == 48).all() and not torch.equal(m[0], m[1])
    m = tiny_swin().random_mask(3, "cpu")  # randperm(16) <= int(0.75 * 16): 13 of 16 units, one mask per batch
    assert m.shape == (3, 4, 4) and m[0].sum() == 13 and torch.equal(m[0], m[2])
    enc = swin.SwinTransformer(img_size=224, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=0)
    model = localmim.LocalMIM(enc)
    assert model.random_mask(1, "cpu").sum() == 37  # 37 of 49 at 224 (75.5%, P10)


def test_mask_mapping_to_every_scale():
    mask = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0, 0, 0, 0], [1, 1, 1, 1]]])  # (1, 4, 4)
    up = localmim.mask_to_scale(mask, 16).view(16, 16)  # x4: each flag repeated 4x4
    assert torch.equal(up, mask[0].repeat_interleave(4, 0).repeat_interleave(4, 1))
    assert torch.equal(localmim.mask_to_scale(mask, 4), mask.flatten(1))
    soft = localmim.mask_to_scale(mask, 2)  # x1/2: the mean of 2x2 flags, fractional weights (P6)
    assert torch.equal(soft, torch.tensor([[0.75, 0.25, 0.5, 0.5]]))
    model = tiny_vit()
    masks = model(torch.randn(2, 3, 32, 32))[4]
    assert set(masks[3].unique().tolist()) <= {0, 0.25, 0.5, 0.75, 1} and masks[3].sum() == masks[2].sum() / 4


# ---- loss ---------------------------------------------------------------------------------------------------------

def test_loss_ignores_visible_cells_and_is_batch_normalised():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.0]])
    loss = localmim.local_loss(pred, target, mask)
    per_cell = ((pred - target) ** 2).mean(-1)
    assert torch.isclose(loss, (per_cell * mask).sum() / 3.5)  # one sum over the batch, not a mean of images
    moved = pred.clone()
    moved[0, 1:] += 10.0
    moved[1, 3] -= 10.0  # visible cells: no effect
    assert torch.equal(localmim.local_loss(moved, target, mask), loss)
    moved[1, 2] += 1.0  # a half-visible cell counts with weight 0.5
    assert not torch.equal(localmim.local_loss(moved, target, mask), loss)
    model = tiny_vit()
    img, m = torch.randn(2, 3, 32, 32), model.random_mask(2, "cpu")
    loss, terms, preds, targets, masks = model(img, m)
    ref = [(((p - t) ** 2).mean(-1) * w).sum() / w.sum() for p, t, w in zip(preds, targets, masks)]
    assert torch.allclose(terms, torch.stack(ref)) and torch.isclose(loss, sum(ref))


# ---- visible-only encoders and --stop-grad ------------------------------------------------------------------------

def test_masked_pixels_never_reach_visible_tokens():
    torch.manual_seed(0)
    for model, size in ((tiny_vit(), 32), (tiny_swin(), 128)):
        img, mask = torch.randn(2, 3, size, size), model.random_mask(2, "cpu")
        hidden = localmim.mask_to_scale(mask, size).view(2, 1, size, size)
        noisy = img + 5 * torch.randn_like(img) * hidden  # change only the masked pixels
        with torch.no_grad():
            a, b = model.encode(img, mask), model.encode(noisy, mask)
            c = model.encode(img + 5 * torch.randn_like(img) * (1 - hidden), mask)  # ... or only the visible ones
        for k, (za, zb, zc) in enumerate(zip(a, b, c)):
            if not model.is_vit:  # Swin latents: (visible tokens, their positions)
                za, zb, zc = za[0], zb[0], zc[0]
            assert torch.allclose(za, zb, atol=1e-5), k
            assert not torch.allclose(za, zc, atol=1e-3), k


@pytest.mark.parametrize("make", [lambda **kw: tiny_vit(depth=7, **kw), tiny_swin], ids=["vit", "swin"])
def test_stop_grad_blocks_gradients_between_stages(make):
    torch.manual_seed(0)
    for stop in (False, True):
        model = make(stop_grad=stop)
        size = model.encoder.arch["img_size"]
        terms = model(torch.randn(2, 3, size, size))[1]
        terms[3].backward()  # the top scale's loss alone
        enc = model.encoder
        low = enc.blocks[0] if model.is_vit else enc.layers[0]  # below the first local layer
        top = enc.blocks[-1] if model.is_vit else enc.layers[3]  # between the last two local layers
        grad = lambda m: sum(p.grad.abs().sum() for p in m.parameters() if p.grad is not None)  # noqa: E731
        assert grad(top) > 0
        assert (grad(low) == 0) == stop  # with --stop-grad, only the layers since the previous local layer learn


def test_every_parameter_trains_and_the_no_decay_sets():
    for model in (tiny_vit(), tiny_swin()):
        model(torch.randn(2, 3, *(model.encoder.arch["img_size"],) * 2))[0].backward()
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == set()
        assert not any(n.startswith("encoder.norm.") for n in names)  # frozen: unused, as there is no final norm
        decay, no_decay = localmim.param_groups(model, 0.05, model.no_decay)
        ids = {id(p): n for n, p in model.named_parameters()}
        decay, no_decay = {ids[id(p)] for p in decay["params"]}, {ids[id(p)] for p in no_decay["params"]}
        if model.is_vit:  # the official ViT decays cls_token and the mask tokens (MAE's quirk); pos_embeds frozen
            assert {"encoder.cls_token", "decoder.0.mask_token", "decoder.3.mask_token"} <= decay
            assert not any("pos_embed" in n for n in decay | no_decay)
        else:  # the official Swin skips 'token' and 'position_bias'
            assert {"decoder.0.mask_token", "encoder.layers.0.blocks.0.attn.relative_position_bias_table"} <= no_decay
        assert "decoder.0.pred.weight" in decay or "decoder.0.pred.4.weight" in decay
        assert "norm.0.weight" in no_decay and "decoder.0.embed.bias" in no_decay


# ---- runs ---------------------------------------------------------------------------------------------------------

def test_two_steps_vit_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "localmim.py", *TINY_VIT, "--batch-size", "8", "--steps", "2", *CPU, "--data", "synthetic",
           "--target", "pixel", "--stop-grad", "--amp", "bf16", "--log-every", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "grids 32/16/8/4" in r.stdout and "pixel cells 1/2/4/8 px" in r.stdout
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs] == [1, 2]
    for rec in recs:
        assert math.isfinite(rec["loss"]) and rec["img_per_s"] > 0 and rec["peak_mem_mb"] > 0
        assert len(rec["loss_scales"]) == 4 and math.isclose(sum(rec["loss_scales"]), rec["loss"], rel_tol=1e-3)
    assert (out / "pixel_final.png").stat().st_size > 0
    timm = pytest.importorskip("timm")
    enc = torch.load(out / "encoder.pth", weights_only=True)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=4)
    ref.load_state_dict(enc["model"])  # strict: timm keys, no side norms or decoders
    assert enc["arch"]["pos_embed"] == "sincos"


def run(argv):
    localmim.main(localmim.get_args(argv))


def test_two_steps_swin(tmp_path, monkeypatch):
    # no flag shrinks a Swin (every swin.py size has 28M+ parameters): the loop runs the 128-px tiny Swin instead
    built = {}
    monkeypatch.setattr(localmim, "build_encoder", lambda args, **kw: built.setdefault("enc", swin.SwinTransformer(
        img_size=args.img_size, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=0, **kw)))
    run(["--model", "swin_tiny_patch4_window7_224", "--img-size", "128", "--window-size", "4", "--batch-size", "2",
         "--accum-iter", "2", "--clip-grad", "1", "--steps", "2", *CPU, "--log-every", "1", "--out", str(tmp_path)])
    assert built["enc"].arch["window_size"] == 4 and built["enc"].arch["norm_eps"] == 1e-6  # the official eps
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["nbins"] == 18 and ckpt["args"]["epochs"] == 400  # the Swin-B recipe
    assert ckpt["model"]["hog.bias"].shape == (4, 2)
    assert (tmp_path / "hog_final.png").exists()
    sd = torch.load(tmp_path / "encoder.pth", weights_only=True)["model"]
    assert "layers.1.downsample.reduction.weight" in sd and not any(k.startswith(("norm.0", "decoder")) for k in sd)


def test_resume_is_exact(tmp_path):
    rng = np.random.default_rng(0)  # 8 images at batch 4: 2 steps per epoch, so the runs cross an epoch
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", images=images, labels=np.zeros(8, np.int64))
    args = [*TINY_VIT, "--data", str(tmp_path / "tiny.npz"), "--batch-size", "4", *CPU, "--hog-bias",
            "--vis-every", "1"]
    run([*args, "--steps", "3", "--out", str(tmp_path / "a")])
    run([*args, "--steps", "2", "--out", str(tmp_path / "b")])
    run([*args, "--steps", "3", "--out", str(tmp_path / "b"), "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 3 and "hog.bias" in a["model"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    assert (tmp_path / "a" / "hog_epoch1.png").exists() and (tmp_path / "a" / "hog_final.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--mask-ratio", "1.0"], "--mask-ratio 1.0: must be in (0, 1)"),
    (["--model", "vit_nano"], "--model vit_nano: choose one of"),
    ([*TINY_VIT[:4], "--model-patch-size", "6", "--img-size", "48"], "patch divisible by 4"),
    ([*TINY_VIT[:6], "--depth", "3"], "--depth 3: LocalMIM needs 4 blocks"),
    (["--model", "swin_tiny_patch4_window7_224", "--img-size", "64"], "masks all 4 mask units"),
    (["--target", "pixel", "--nbins", "9"], "--nbins / --hog-bias: apply to --target hog only"),
    (["--nbins", "0"], "--nbins 0: must be at least 1"),
    ([*TINY_VIT, "--window-size", "4"], "--window-size applies to Swin models only"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        localmim.get_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_and_resume_end_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: --data .*: no such file or folder"):
        run([*TINY_VIT, *CPU, "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: --resume: no checkpoint"):
        run([*TINY_VIT, *CPU, "--resume", "--out", str(tmp_path / "empty")])


def test_pretrained_continues_from_an_encoder_and_swin_large_uses_window_14(tmp_path):
    a = localmim.get_args(["--model", "swin_large_patch4_window7_224"])
    assert a.window_size == 14 and a.epochs == 800 and a.nbins == 18  # the official Swin-L recipe
    assert localmim.get_args(["--model", "swin_large_patch4_window7_224", "--window-size", "7"]).window_size == 7
    run([*TINY_VIT, "--batch-size", "8", "--steps", "1", *CPU, "--data", "synthetic", "--num-images", "16",
         "--out", str(tmp_path / "first")])
    first = torch.load(tmp_path / "first" / "encoder.pth", weights_only=True)["model"]
    run([*TINY_VIT, "--batch-size", "8", "--steps", "1", *CPU, "--data", "synthetic", "--num-images", "16",
         "--pretrained", str(tmp_path / "first" / "encoder.pth"), "--warmup-epochs", "1", "--out", str(tmp_path / "b")])
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    # warmup from lr 0: the first step changes nothing, so the encoder is exactly the one it started from
    assert all(torch.equal(ckpt["encoder." + k], v) for k, v in first.items())
    wide = vit.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=0)
    torch.save({"model": wide.state_dict(), "arch": wide.arch}, tmp_path / "wide.pth")
    with pytest.raises(SystemExit, match="wide.pth: does not fit this encoder"):
        run([*TINY_VIT, "--batch-size", "8", *CPU, "--pretrained", str(tmp_path / "wide.pth"), "--out",
             str(tmp_path / "c")])
