"""mae.py: masking, loss, the official forward and checkpoint layouts, presets, and end-to-end runs (CPU, tiny)."""
import json
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn

import mae
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-patch-size", "4", "--depth", "2",
       "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "4"]
RUN = ["--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0", "--data", "synthetic",
       "--num-images", "16", "--log-every", "1", "--epochs", "10", "--warmup-epochs", "1"]  # 2 steps per epoch


def run(argv, tmp_path, name="run"):
    out = str(tmp_path / name)
    mae.main(mae.get_args(argv + ["--out", out]))
    return out


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def tiny(norm_pix_loss=True, depth=2):
    torch.manual_seed(0)
    enc = vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth, num_classes=0,
                           pos_embed="sincos")
    return mae.MAE(enc, 32, 1, 4, norm_pix_loss)


# ---- masking ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L, ratio, kept", [(196, 0.75, 49), (196, 0.6, 78), (100, 0.8, 19), (64, 0.75, 16)])
def test_masking_counts_are_the_official_truncation(L, ratio, kept):
    keep, restore, mask = mae.random_masking(32, L, ratio, "cpu")
    assert keep.shape == (32, kept)  # int(L (1 - r)): 100 at 0.8 keeps 19, the official float truncation
    assert (mask.sum(1) == L - kept).all() and mask.dtype == torch.float32
    for k, m in zip(keep, mask):  # the kept indices are exactly the zeros of the mask
        assert sorted(k.tolist()) == torch.where(m == 0)[0].tolist()


def test_masks_are_independent_per_image_and_restore_inverts_the_shuffle():
    torch.manual_seed(0)
    noise = torch.rand(500, 64)
    keep, restore, mask = mae.random_masking(500, 64, 0.75, "cpu", noise)
    assert len({tuple(m.tolist()) for m in mask}) == 500  # one subset per image
    assert (mask.mean(0) - 0.75).abs().max() < 0.08  # every patch removed with probability 3/4
    shuffle = noise.argsort(1)
    assert torch.equal(shuffle.gather(1, restore), torch.arange(64).expand(500, -1))  # restore = inverse
    assert torch.equal(keep, shuffle[:, :16])  # kept in ascending-noise order, as x_masked officially


# ---- loss: the reference values of ../shared/reference/mae.md section 1.8 (official code, float32) ----------------

def reference_inputs():
    n = 2 * 3 * 224 * 224
    img = (torch.linspace(-1, 1, n) + 0.5 * torch.sin(torch.arange(n, dtype=torch.float32))).view(2, 3, 224, 224)
    pred = 0.1 * torch.cos(torch.arange(2 * 196 * 768, dtype=torch.float32)).view(2, 196, 768)
    mask = torch.zeros(2, 196)
    mask[0, ::2] = 1  # 98 removed
    mask[1, :147] = 1
    return img, pred, mask


@pytest.mark.parametrize("norm_pix, expect", [(False, 0.437145), (True, 1.003693)])
def test_loss_equals_the_official_values(norm_pix, expect):
    img, pred, mask = reference_inputs()
    assert mae.mae_loss(mae.patchify(img, 16), pred, mask, norm_pix).item() == pytest.approx(expect, abs=2e-6)


def test_loss_by_hand_and_patchify_order():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    x = mae.patchify(img, 4)  # (2, 4, 48): [n, i * w + j, (a * p + b) * 3 + c] = img[n, c, i p + a, j p + b]
    assert x[1, 3, (2 * 4 + 1) * 3 + 2] == img[1, 2, 4 + 2, 4 + 1]
    assert torch.equal(mae.unpatchify(x, 4, 8), img)
    target = torch.randn(2, 4, 48)
    pred = torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    per_patch = ((pred - target) ** 2).mean(-1)
    assert mae.mae_loss(target, pred, mask, False) == pytest.approx(((per_patch * mask).sum() / 3).item())
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(mae.norm_pix(target), t)


def test_predictions_depend_on_the_visible_patches_only():
    model = tiny().eval()
    img = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    _, pred, mask = model(img, 0.75, noise)
    hidden = mae.unpatchify(mask[..., None].expand(-1, -1, 48), 4, 32)  # (2, 3, 32, 32), 1 = removed
    _, pred2, _ = model(img + 5 * torch.randn_like(img) * hidden, 0.75, noise)  # other pixels under the mask
    torch.testing.assert_close(pred, pred2)  # every prediction, removed patches included, sees the visible ones only


def test_official_init_and_weight_decay_groups():
    model = tiny()
    qkv = model.encoder.blocks[0].attn.qkv.weight  # xavier on the fused (3D, D) matrix: bound sqrt(6 / 4D)
    assert qkv.abs().max() <= math.sqrt(6 / (4 * 192)) and qkv.abs().max() > 0.9 * math.sqrt(6 / (4 * 192))
    assert model.decoder_embed.bias.abs().max() == 0 and 0.01 < model.mask_token.std() < 0.03
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    decay, no_decay = mae.param_groups(model, 0.05)
    ids = {id(p) for p in decay["params"]}
    assert id(model.mask_token) in ids and id(model.encoder.cls_token) in ids  # the official quirk: 3-D tokens decay
    assert all(p.ndim == 1 for p in no_decay["params"])


# ---- the official forward and checkpoint layouts ---------------------------------------------------------------------

class Official(nn.Module):
    """models_mae.py MaskedAutoencoderViT, transcribed with timm's Block and PatchEmbed (the official structure)."""

    def __init__(self, img=32, p=4, D=192, depth=2, heads=3, dd=32, ddepth=1, dheads=4, norm_pix_loss=True):
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img, p, 3, D)
        L, self.p, self.norm_pix_loss = self.patch_embed.num_patches, p, norm_pix_loss
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=False)
        self.blocks = nn.ModuleList([Block(D, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(D)
        self.decoder_embed = nn.Linear(D, dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dd, dheads, 4.0, qkv_bias=True, norm_layer=norm)
                                             for _ in range(ddepth)])
        self.decoder_norm = norm(dd)
        self.decoder_pred = nn.Linear(dd, p * p * 3, bias=True)

    def random_masking(self, x, mask_ratio, noise):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L])
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs, mask_ratio, noise):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = mae.patchify(imgs, self.p)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


def official_checkpoint(tmp_path, name, encoder_only=False):
    pytest.importorskip("timm")
    torch.manual_seed(1)
    ref = Official().eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    ref.pos_embed.data = vit.sincos_pos_embed(192, (8, 8))  # the frozen tables are saved in every state dict
    ref.decoder_pos_embed.data = vit.sincos_pos_embed(32, (8, 8))
    sd = ref.state_dict()
    if encoder_only:  # mae_pretrain_vit_*.pth: the encoder in timm keys, no decoder, no mask token
        sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    path = str(tmp_path / name)
    torch.save({"model": sd}, path)
    return ref, path


def test_official_full_checkpoint_loads_strictly_and_gives_the_official_forward(tmp_path):
    ref, path = official_checkpoint(tmp_path, "mae_visualize_vit_tiny.pth")
    ours = tiny().eval()
    assert mae.load_pretrained(ours, path, unsafe=False) == "encoder + decoder"
    img, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    loss, pred, mask = ours(img, 0.75, noise)
    ref_loss, ref_pred, ref_mask = ref(img, 0.75, noise)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, ref_mask) and loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_official_encoder_only_checkpoint_and_our_exports(tmp_path):
    ref, path = official_checkpoint(tmp_path, "mae_pretrain_vit_tiny.pth", encoder_only=True)
    ours = tiny()
    fresh = ours.decoder_pred.weight.clone()
    assert mae.load_pretrained(ours, path, unsafe=False).startswith("encoder only")
    assert torch.equal(ours.encoder.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    assert torch.equal(ours.decoder_pred.weight, fresh)  # the decoder starts fresh
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: does not fit"):
        mae.load_pretrained(tiny(), str(tmp_path / "other.pth"), unsafe=False)


def test_visualize_an_official_checkpoint(tmp_path):
    _, path = official_checkpoint(tmp_path, "mae_visualize_vit_tiny.pth")
    out = run(VIT + RUN + ["--pretrained", path, "--visualize", "--no-norm-pix-loss"], tmp_path)
    assert os.path.exists(os.path.join(out, "recon_final.png")) and not os.path.exists(os.path.join(out, "ckpt.pt"))


# ---- flags, presets, runs ------------------------------------------------------------------------------------------

def test_defaults_are_the_recipe_and_presets():
    a = mae.get_args([])
    assert (a.model, a.img_size, a.epochs, a.warmup_epochs, a.blr, a.min_lr, a.weight_decay, a.mask_ratio) == \
        ("vit_large_patch16_224", 224, 800, 40, 1.5e-4, 0.0, 0.05, 0.75)
    assert (a.decoder_dim, a.decoder_depth, a.decoder_heads, a.norm_pix_loss, a.clip_grad, a.batch_size) == \
        (512, 8, 16, True, 0.0, 64)
    a = mae.get_args(["--preset", "vit_huge_1600", "--epochs", "3"])
    assert (a.model, a.epochs) == ("vit_huge_patch14_224", 3)  # flags win over the preset
    a = mae.get_args(["--preset", "tiny"])
    assert (a.device, a.img_size, a.depth, a.model_patch_size) == ("cpu", 32, 6, 4)


@pytest.mark.parametrize("argv, flag", [
    (["--mask-ratio", "0"], "--mask-ratio"), (["--mask-ratio", "1"], "--mask-ratio"),
    (["--img-size", "230"], "--img-size"), (["--decoder-heads", "5"], "--decoder-dim"),
    (["--model", "swin_tiny_patch4_window7_224"], "--model"), (["--visualize"], "--visualize")])
def test_bad_flags_give_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        mae.get_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_end_to_end(tmp_path):
    out = run(VIT + RUN + ["--steps", "2", "--vis-every", "1"], tmp_path)
    rec = records(out)
    assert [r["step"] for r in rec] == [1, 2] and all(math.isfinite(r["loss"]) for r in rec)
    assert rec[1]["lr"] == pytest.approx(mae.mae_lr(1, 20, 2, 1.5e-4 * 8 / 256, 0.0))
    for name in ("recon_epoch1.png", "recon_final.png", "loss.png", "encoder.pth"):
        assert os.path.exists(os.path.join(out, name)), name
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    enc = torch.load(os.path.join(out, "encoder.pth"), weights_only=True)
    assert ckpt["step"] == enc["step"] == 2  # written together
    sd, arch = vit.load_checkpoint(os.path.join(out, "encoder.pth"))
    vit.VisionTransformer(**arch, num_classes=0).load_state_dict(sd)  # strict; how finetune.py reads it
    assert arch["pos_embed"] == "sincos"


def test_exports_load_in_timm(tmp_path):
    timm = pytest.importorskip("timm")
    out = run(VIT + RUN + ["--steps", "1"], tmp_path)
    sd = torch.load(os.path.join(out, "encoder.pth"), weights_only=True)["model"]
    timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2).load_state_dict(sd)


def test_resume_gives_the_same_weights(tmp_path):
    a = run(VIT + RUN + ["--steps", "3"], tmp_path, "straight")
    b = run(VIT + RUN + ["--steps", "1"], tmp_path, "resumed")
    run(VIT + RUN + ["--steps", "3", "--resume"], tmp_path, "resumed")  # across the end of epoch 1
    ka, kb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert ka["step"] == kb["step"] == 3
    for k in ka["model"]:
        assert torch.equal(ka["model"][k], kb["model"][k]), k
    assert [r["step"] for r in records(b)] == [1, 2, 3]


def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "mae.py",
                        *VIT, *RUN, "--steps", "2", "--num-images", "32", "--out", out], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "device cpu x 2" in p.stdout and "batch 16" in p.stdout and p.stdout.count("done:") == 1
    assert [r["step"] for r in records(out)] == [1, 2]
