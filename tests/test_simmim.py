"""simmim.py: masks, AvgDist, loss, schedule, init, weight decay, flags, and end-to-end runs (CPU, tiny models)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import simmim
import swin
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-patch-size", "4", "--depth", "2"]
SWIN = ["--model", "swin_tiny_patch4_window7_224", "--img-size", "32", "--window-size", "4"]
RUN = ["--mask-patch-size", "8", "--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0",
       "--data", "synthetic", "--num-images", "16", "--log-every", "1"]  # 16 images = 2 steps per epoch


def run(argv, tmp_path, name="run"):
    """simmim.main in this process (fast); returns the output folder."""
    out = str(tmp_path / name)
    simmim.main(simmim.get_args(argv + ["--out", out]))
    return out


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def tiny_model(arch="vit", **kw):
    torch.manual_seed(0)
    if arch == "vit":
        enc = vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0,
                               pos_embed="none", rel_pos_bias="shared", init_values=0.1, **kw)
    else:
        enc = swin.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, num_classes=0, **kw)
    return simmim.SimMIM(enc)


# ---- masking ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("img, m, p, count", [(224, 32, 16, 30), (192, 32, 4, 22), (32, 8, 4, 10)])
def test_mask_count_alignment_and_upsampling(img, m, p, count):
    grid, scale = img // m, m // p
    blocks = simmim.block_masks(64, grid, 0.6, "cpu")
    assert blocks.dtype == torch.bool and blocks.shape == (64, grid, grid)
    assert (blocks.flatten(1).sum(1) == count).all()  # ceil(0.6 * 49) = 30, ceil(0.6 * 36) = 22: exact per image
    tokens = simmim.upsample(blocks, scale)  # what the encoder gets
    assert tokens.shape == (64, img // p, img // p)
    assert torch.equal(tokens, simmim.upsample(tokens[:, ::scale, ::scale], scale))  # constant on each block
    pixels = simmim.upsample(tokens, p)  # what the loss gets
    assert pixels.shape == (64, img, img) and (pixels.flatten(1).sum(1) == count * m * m).all()
    assert torch.equal(pixels, simmim.upsample(blocks, m))


@pytest.mark.parametrize("ratio, grid, count", [(0.55, 10, 56), (0.23, 10, 23), (0.6, 7, 30), (0.6, 6, 22)])
def test_mask_count_multiplies_in_the_official_order(ratio, grid, count):
    """data_simmim.py: int(np.ceil(token_count * mask_ratio)); ratio * grid * grid rounds 0.55 on 10x10 to 55."""
    assert simmim.mask_count(grid * grid, ratio) == count
    assert (simmim.block_masks(4, grid, ratio, "cpu").flatten(1).sum(1) == count).all()
    np = pytest.importorskip("numpy")
    mismatches = [(r / 100, g) for r in range(1, 100) for g in range(1, 33)
                  if simmim.mask_count(g * g, r / 100) != int(np.ceil(g * g * (r / 100)))]
    assert mismatches == []


def test_masks_are_independent_and_uniform_per_image():
    blocks = simmim.block_masks(4000, 7, 0.6, "cpu").flatten(1).float()  # (4000, 49)
    assert len({tuple(b.tolist()) for b in blocks[:200]}) == 200  # one mask per image, not one per batch
    freq = blocks.mean(0)  # every block is hidden with probability 30/49
    assert (freq - 30 / 49).abs().max() < 0.04
    corr = torch.corrcoef(blocks[:, :2].T)[0, 1]  # without replacement: slightly negative, -1/48
    assert abs(corr + 1 / 48) < 0.05


def test_pixel_dist_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    visible = ~simmim.block_masks(6, 4, 0.6, "cpu", g)  # 16 px images of 4 px blocks
    fast = simmim.pixel_dist(visible, 4)  # (6, 16, 16)
    yx = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1).view(-1, 2)
    dist = torch.cdist(yx, yx)  # (256, 256) between pixel centres
    for v, f in zip(simmim.upsample(visible, 4), fast):
        slow = dist[:, v.flatten()].amin(1).view(16, 16)  # nearest visible pixel, over all of them
        torch.testing.assert_close(f, slow)


def test_avg_dist_matches_the_reference_values():
    assert abs(simmim.avg_dist(224, 32, 0.6) - 15.0) < 0.3  # analysis.md section 5: 15.0 (500 masks)
    assert abs(simmim.avg_dist(192, 32, 0.6) - 15.4) < 0.3
    assert abs(simmim.avg_dist(192, 8, 0.6, n=64) - 3.7) < 0.2


# ---- loss -------------------------------------------------------------------------------------------------------

def official_norm_targets(targets, patch_size):
    """microsoft/Swin-Transformer models/simmim.py, verbatim."""
    targets_ = targets
    targets_count = torch.ones_like(targets)
    targets_square = targets ** 2.
    targets_mean = F.avg_pool2d(targets, kernel_size=patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)
    targets_square_mean = F.avg_pool2d(targets_square, kernel_size=patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)
    targets_count = F.avg_pool2d(targets_count, kernel_size=patch_size, stride=1, padding=patch_size // 2, count_include_pad=True) * (patch_size ** 2)
    targets_var = (targets_square_mean - targets_mean ** 2.) * (targets_count / (targets_count - 1))
    targets_var = torch.clamp(targets_var, min=0.)
    targets_ = (targets_ - targets_mean) / (targets_var + 1.e-6) ** 0.5
    return targets_


def test_loss_by_hand():
    img = torch.zeros(1, 3, 2, 2)
    pred = torch.full((1, 3, 2, 2), 100.0)  # visible pixels: wildly wrong, and ignored
    pred[0, :, 0, 0] = torch.tensor([1.0, -2.0, 3.0])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one masked pixel
    assert simmim.simmim_loss(img, pred, mask).item() == pytest.approx(6 / (1 + 1e-5) / 3, rel=1e-7)


@pytest.mark.parametrize("norm_target", [0, 7])
def test_loss_equals_the_official_formula(norm_target):
    torch.manual_seed(0)
    x, x_rec = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    token_mask = simmim.upsample(simmim.block_masks(2, 4, 0.6, "cpu"), 2)  # (2, 8, 8), patch 4
    mask = token_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).contiguous()  # official forward
    target = official_norm_targets(x, norm_target) if norm_target else x
    loss_recon = F.l1_loss(target, x_rec, reduction="none")
    official = (loss_recon * mask).sum() / (mask.sum() + 1e-5) / 3
    torch.testing.assert_close(simmim.simmim_loss(x, x_rec, mask, norm_target), official)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_prediction_uses_visible_pixels_only_and_loss_masked_pixels_only(arch):
    model = tiny_model(arch).eval()
    img = torch.randn(2, 3, 32, 32, requires_grad=True)
    mask = simmim.upsample(simmim.block_masks(2, 4, 0.6, "cpu"), 2)  # tokens of 4 px
    pixels = simmim.upsample(mask, 4).unsqueeze(1).expand(-1, 3, -1, -1)  # (2, 3, 32, 32)
    pred = model.reconstruct(img, mask)
    pred[pixels].sum().backward()  # the prediction at the masked pixels ...
    assert (img.grad[~pixels].abs() > 0).any()  # ... depends on the visible pixels
    assert (img.grad[pixels] == 0).all()  # ... and never sees the masked ones
    pred = pred.detach().requires_grad_()
    simmim.simmim_loss(img.detach(), pred, pixels[:, :1].float()).backward()
    assert (pred.grad[~pixels] == 0).all() and (pred.grad[pixels] != 0).all()


# ---- model, optimizer, schedule -------------------------------------------------------------------------------

def test_official_vit_init():
    model = tiny_model("vit")  # dim 192
    enc = model.encoder
    fc1 = enc.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= 0.02 and abs(fc1.std().item() - 0.0108) < 0.0005  # trunc-normal at +-1 std
    assert enc.patch_embed.proj.weight.abs().max() <= 0.02 and enc.cls_token.abs().max() <= 0.02
    assert model.mask_token.abs().max() <= 0.02 and model.mask_token.std() > 0.005
    for i, blk in enumerate(enc.blocks, 1):  # fix_init_weight
        assert blk.attn.proj.weight.abs().max() <= 0.02 / math.sqrt(2 * i) + 1e-9
        assert blk.mlp.fc2.weight.abs().max() <= 0.02 / math.sqrt(2 * i) + 1e-9
        assert (blk.ls1.gamma == 0.1).all() and (blk.attn.qkv.bias == 0).all()
    assert (enc.rel_pos_bias.relative_position_bias_table == 0).all() and enc.pos_embed is None
    assert model.decoder[0].weight.abs().max() > 0.05  # PyTorch's default init, bound 1/sqrt(192)
    assert set(model.state_dict()) >= {"decoder.0.weight", "decoder.0.bias", "mask_token"}
    sw = tiny_model("swin")
    assert abs(sw.mask_token.std().item() - 0.02) < 0.006 and sw.decoder[0].out_channels == 32 * 32 * 3


def test_no_weight_decay_set():
    for arch in ("vit", "swin"):
        model = tiny_model(arch)
        decay, no_decay = simmim.param_groups(model, 0.05, simmim.NO_DECAY)
        ids = {id(p) for p in no_decay["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in ids}
        assert "mask_token" in names  # the official ViT decays it
        tables = {n for n in dict(model.named_parameters()) if n.endswith("relative_position_bias_table")}
        assert tables and tables <= names  # the official Swin decays them all
        for n, p in model.named_parameters():
            assert (n in names) == (p.ndim <= 1 or n.endswith(".bias") or n in tables or "token" in n), n
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    plain = simmim.SimMIM(vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=0))
    _, no_decay = simmim.param_groups(plain, 0.05, simmim.NO_DECAY)
    assert any(p is plain.encoder.pos_embed for p in no_decay["params"])


def test_simmim_lr_by_hand_and_against_timm():
    lr, wlr, mlr, total, warm = 8e-4, 4e-6, 4e-5, 1000, 100
    f = lambda t, ms=None: simmim.simmim_lr(t, total, warm, lr, wlr, mlr, ms)  # noqa: E731
    assert f(0) == pytest.approx(4e-6) and f(50) == pytest.approx(4.02e-4)  # linear from WARMUP_LR
    assert f(100) == pytest.approx(4e-5 + 3.8e-4 * (1 + math.cos(0.1 * math.pi)))  # 7.814e-4: cosine from step 0
    assert f(500) == pytest.approx(4.2e-4) and f(999) == pytest.approx(4e-5, rel=1e-3)
    assert f(699, [700]) == pytest.approx(8e-4) and f(700, [700]) == pytest.approx(8e-5)
    assert f(900, [700, 800]) == pytest.approx(8e-6) and f(10, [700]) == f(10)
    sched = pytest.importorskip("timm.scheduler")
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = sched.CosineLRScheduler(opt, t_initial=total, lr_min=mlr, warmup_lr_init=wlr, warmup_t=warm,
                                           cycle_limit=1, t_in_epochs=False, warmup_prefix=False)
    for t in range(0, total, 37):
        assert f(t) == pytest.approx(ref._get_lr(t)[0], rel=1e-12)


def test_presets_and_defaults():
    a = simmim.get_args([])
    assert (a.model, a.img_size, a.epochs, a.blr, a.warmup_lr, a.min_lr, a.schedule, a.drop_path) == \
        ("vit_base_patch16_224", 224, 100, 2e-4, 1e-6, 1e-5, "cosine", 0.1)
    assert (a.mask_ratio, a.mask_patch_size, a.warmup_epochs, a.weight_decay, a.clip_grad) == (0.6, 32, 10, 0.05, 5.0)
    a = simmim.get_args(["--preset", "vit_base_800", "--epochs", "5", "--milestones", "600"])  # flags win
    assert (a.model, a.epochs, a.blr, a.warmup_lr, a.schedule, a.milestones, a.drop_path) == \
        ("vit_base_patch16_224", 5, 1e-4, 5e-7, "multistep", [600], 0.1)
    a = simmim.get_args(["--preset", "swin_base_100", "--patch", "16"])
    assert (a.model, a.img_size, a.epochs, a.blr, a.min_lr, a.drop_path, a.mask_patch_size) == \
        ("swin_base_patch4_window6_192", 192, 100, 2e-4, 1e-5, 0.0, 16)
    a = simmim.get_args(["--preset", "swin_large_800"])
    assert (a.model, a.img_size, a.epochs, a.schedule, a.milestones) == \
        ("swin_large_patch4_window12_192", 192, 800, "multistep", [700])


@pytest.mark.parametrize("argv, flag", [
    (["--mask-ratio", "1.0"], "--mask-ratio"), (["--mask-ratio", "0"], "--mask-ratio"),
    (["--img-size", "240"], "--img-size"), (["--mask-patch-size", "24"], "--mask-patch-size"),
    (["--img-size", "32", "--model-patch-size", "4"], "--mask-ratio"),  # 1 block of 32 px: all hidden
    (["--norm-target-patch-size", "4"], "--norm-target-patch-size"),
    (["--schedule", "multistep", "--milestones", "5"], "--milestones"),
    (["--window-size", "6"], "--window-size"), (["--model", "resnet50"], "--model"), (["--batch-size", "0"], "--batch")])
def test_bad_flags_give_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        simmim.get_args(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last and flag in last


@pytest.mark.parametrize("argv, words", [
    (["--data", "/no/such/folder"], "--data"),
    (SWIN[:4] + ["--mask-patch-size", "8"], "--img-size 32"),  # Swin-T's window 7 does not fit 32 px
    (["--resume"], "--resume"), (["--accum-iter", "3"], "--accum-iter")])
def test_runtime_errors_are_one_line(argv, words, tmp_path):
    with pytest.raises(SystemExit) as e:
        run((VIT if "--model" not in argv else []) + RUN + argv, tmp_path)
    assert str(e.value).startswith("error: ") and words in str(e.value) and "\n" not in str(e.value)


# ---- end to end -------------------------------------------------------------------------------------------------

def cli(argv, tmp_path, name, torchrun=False):
    out = str(tmp_path / name)
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(launch + ["simmim.py"] + argv + ["--out", out], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout


def test_end_to_end_vit(tmp_path):
    out, stdout = cli(VIT + RUN + ["--steps", "2", "--vis-every", "1"], tmp_path, "vit")
    assert "AvgDist" in stdout and "10 of 4x4 blocks" in stdout
    rec = records(out)
    assert [r["step"] for r in rec] == [1, 2] and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rec)
    # 16 images, batch 8: 2 steps/epoch, 100 epochs, 10 warmup; the second step runs at lr(1)
    assert rec[1]["lr"] == pytest.approx(simmim.simmim_lr(1, 200, 20, 2e-4 * 8 / 512, 1e-6 * 8 / 512, 1e-5 * 8 / 512))
    assert os.path.exists(os.path.join(out, "recon_epoch1.png")) and os.path.exists(os.path.join(out, "recon_final.png"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["epoch"] == 1 and not any("_orig_mod" in k or "module." in k for k in ckpt["model"])
    sd, arch = vit.load_checkpoint(os.path.join(out, "encoder.pth"))  # how finetune.py reads it
    enc = vit.VisionTransformer(**arch, num_classes=0)
    enc.load_state_dict(sd)  # strict
    assert arch["rel_pos_bias"] == "shared" and arch["init_values"] == 0.1 and arch["pos_embed"] == "none"
    for k, v in sd.items():
        assert torch.equal(v, ckpt["model"]["encoder." + k]), k


def test_end_to_end_swin_norm_target_bf16(tmp_path):
    timm = pytest.importorskip("timm")
    out, _ = cli(SWIN + RUN + ["--steps", "2", "--norm-target", "--norm-target-patch-size", "7", "--amp", "bf16"],
                 tmp_path, "swin")
    assert all(math.isfinite(r["loss"]) for r in records(out)) and os.path.exists(os.path.join(out, "recon_final.png"))
    sd = torch.load(os.path.join(out, "encoder.pth"), weights_only=True)["model"]
    ref = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=32, window_size=4)
    ref.load_state_dict(sd)  # strict: timm's keys
    ours = swin.SwinTransformer(**swin.load_checkpoint(os.path.join(out, "encoder.pth"))[1], num_classes=0)
    ours.load_state_dict(sd)


def test_plain_vit_exports_to_timm_with_fp16_and_multistep(tmp_path):
    timm = pytest.importorskip("timm")
    out = run(VIT + RUN + ["--steps", "3", "--vit-variant", "plain", "--amp", "fp16", "--schedule", "multistep",
                           "--milestones", "1", "--warmup-epochs", "0"], tmp_path)
    rec = records(out)  # 2 steps per epoch: the milestone of epoch 1 is step 2
    assert all(math.isfinite(r["loss"]) for r in rec)
    assert [r["lr"] for r in rec] == pytest.approx([2e-4 * 8 / 512, 2e-4 * 8 / 512, 2e-5 * 8 / 512])
    sd = torch.load(os.path.join(out, "encoder.pth"), weights_only=True)["model"]
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2)
    ref.load_state_dict(sd)  # strict


def test_torchrun_two_processes_with_accumulation(tmp_path):
    out, stdout = cli(VIT + RUN + ["--steps", "2", "--accum-iter", "2", "--num-images", "32"], tmp_path, "ddp",
                      torchrun=True)
    assert "device cpu x 2" in stdout and "batch 32" in stdout and stdout.count("AvgDist") == 1  # rank 0 prints
    assert [r["step"] for r in records(out)] == [1, 2]  # rank 0 alone writes


def test_resume_gives_the_same_weights(tmp_path):
    a = run(VIT + RUN + ["--steps", "3"], tmp_path, "straight")
    b = run(VIT + RUN + ["--steps", "1"], tmp_path, "resumed")  # stops inside epoch 0 ...
    with open(os.path.join(b, "log.jsonl"), "a") as f:  # a record written after the checkpoint, then a crash
        f.write(json.dumps({**records(b)[-1], "step": 2}) + "\n")
    run(VIT + RUN + ["--steps", "3", "--resume"], tmp_path, "resumed")  # ... and goes on across the epoch end
    ka, kb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert ka["step"] == kb["step"] == 3
    for k in ka["model"]:
        assert torch.equal(ka["model"][k], kb["model"][k]), k
    assert records(a)[-1]["loss"] == records(b)[-1]["loss"]
    assert [r["step"] for r in records(b)] == [r["step"] for r in records(a)] == [1, 2, 3]  # each step once


def test_non_finite_loss_stops_with_the_step(tmp_path):
    with pytest.raises(SystemExit) as e:
        run(VIT + RUN + ["--steps", "4", "--blr", "1e30", "--warmup-epochs", "0"], tmp_path)
    assert "loss is not finite at step" in str(e.value)
