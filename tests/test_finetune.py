"""finetune.py: layer ids and LR scales against the official tables, the no-decay set, the schedules, LARS, every
checkpoint layout and the refused-key check, the linear probe's frozen encoder, --eval, a run from simmim.py,
exact resume, flag errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import finetune
import swin
import vit

timm = pytest.importorskip("timm")
# the 64-wide test ViTs have one 64-channel head, which vit.py's loader infers and (rightly) warns about
pytestmark = pytest.mark.filterwarnings("ignore:.*none of timm's ViT sizes")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["--device", "cpu", "--no-compile", "--workers", "0"]
VIT = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=1)  # 64 wide: 1 head, as the loaders infer
SWIN = dict(img_size=48, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=6)  # 12 / 6 tokens


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """A tiny data set: train.npz (48 images) and test.npz (24) of 16 px, 3 classes."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in (("train", 48), ("test", 24)):
        np.savez(d / f"{name}.npz", images=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                 labels=np.arange(n) % 3)
    return str(d)


def randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def simmim_vit():
    """What simmim.py exports for a ViT: shared relative position bias, LayerScale 0.1, no absolute position."""
    return randomize(vit.VisionTransformer(**VIT, num_classes=0, rel_pos_bias="shared", init_values=0.1,
                                           pos_embed="none"))


def build(path, *flags, num_classes=3):
    args = finetune.get_args(["--pretrained", str(path), *flags, *CPU])
    family, arch, sd = finetune.read_arch(args)
    return finetune.build_model(args, family, arch, sd, num_classes)


def scales(model, decay, key="lr_scale"):
    by_id = {id(p): g[key] for g in finetune.param_groups_lrd(model, 0.05, decay) for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def weight_decay(model):
    return scales(model, 0.65, "weight_decay")


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


# ---- recipe: layer decay (finetune.md 2.1-2.2), no-decay set (section 3), schedules (section 5), LARS ----

def test_vit_b_layer_ids_and_scales_are_the_official_table():
    with torch.device("meta"):
        m = vit.create_model("vit_base_patch16_224", global_pool="avg")
    s = scales(m, 0.65)
    assert round(s["cls_token"], 4) == round(s["pos_embed"], 4) == round(s["patch_embed.proj.weight"], 4) == 0.0037
    assert s["blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** 12)  # 0.0057
    assert round(s["blocks.5.mlp.fc1.bias"], 3) == 0.049 and s["blocks.11.norm1.weight"] == pytest.approx(0.65)
    assert s["fc_norm.weight"] == s["head.weight"] == 1.0
    assert [finetune.layer_id(n, m.arch) for n in ("pos_embed", "blocks.3.attn.proj.weight", "head.bias")] == [0, 4, 13]


def test_swin_b_layer_ids_and_scales_are_the_official_table():
    with torch.device("meta"):
        m = swin.create_model("swin_base_patch4_window7_224")
    s = scales(m, 0.9)
    assert round(s["patch_embed.proj.weight"], 3) == 0.072  # 0.9^25
    assert s["layers.0.blocks.0.attn.qkv.weight"] == pytest.approx(0.9 ** 24)
    # the downsample opening stage s (timm) is the official one closing stage s-1: the id of that stage's last block
    for stage, last_block in ((1, "layers.0.blocks.1"), (2, "layers.1.blocks.1"), (3, "layers.2.blocks.17")):
        assert s[f"layers.{stage}.downsample.reduction.weight"] == s[f"{last_block}.mlp.fc1.weight"]
    names = ("layers.1.downsample.norm.weight", "layers.2.blocks.0.norm1.weight", "layers.3.downsample.reduction.weight",
             "layers.3.blocks.1.mlp.fc2.bias", "norm.weight", "head.fc.weight")
    ids = [finetune.layer_id(n, m.arch) for n in names]
    assert ids == [2, 5, 22, 24, 25, 25] and s["head.fc.weight"] == 1.0


def test_no_weight_decay_set():
    m = vit.VisionTransformer(**VIT, num_classes=3, rel_pos_bias="block", init_values=0.1, global_pool="avg")
    groups = finetune.param_groups_lrd(m, 0.05, 0.65)
    decayed = {n for n, wd in weight_decay(m).items() if wd > 0}
    no_decay = {n for n, wd in weight_decay(m).items() if wd == 0}
    assert decayed == {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.{k}.weight" for i in range(2) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert {"cls_token", "pos_embed", "blocks.0.attn.relative_position_bias_table", "blocks.1.ls1.gamma",
            "fc_norm.weight", "head.bias"} <= no_decay
    wd = weight_decay(swin.SwinTransformer(**SWIN, num_classes=3))
    assert wd["layers.1.blocks.1.attn.relative_position_bias_table"] == 0 and wd["layers.1.downsample.norm.weight"] == 0
    assert wd["layers.1.downsample.reduction.weight"] == wd["head.fc.weight"] == 0.05


def test_schedules_are_simmims_timm_cosine_and_maes():
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-3)
    sched = CosineLRScheduler(opt, t_initial=100, lr_min=1e-6, warmup_lr_init=2e-6, warmup_t=20, cycle_limit=1,
                              t_in_epochs=False)
    for t in range(100):
        sched.step_update(t)
        assert finetune.simmim_lr(t, 100, 20, 5e-3, 2e-6, 1e-6) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
    assert finetune.simmim_lr(80, 100, 10, 1.0, 0.0, 0.0, milestones=[70]) == pytest.approx(0.1)  # pretraining's
    assert finetune.mae_lr(5, 100, 10, 1.0, 0.0) == 0.5 and finetune.mae_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)


def test_lars_step_is_maes():
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w.grad, b.grad = gw.clone(), gb.clone()
    finetune.LARS([w, b], lr=0.5, weight_decay=0.1).step()
    d = gw + 0.1 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * 0.001 * w0.norm() / d.norm() * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: no weight decay, no trust ratio


def test_recipes_fill_only_unset_flags():
    def resolved(*flags, family="vit", img=224, pretrained=True):
        args = finetune.get_args([*(["--pretrained", "x.pth"] if pretrained else []), "--img-size", str(img), *flags])
        finetune.resolve(args, family, {"depth": 12}, scratch=not pretrained)
        return args
    a = resolved()
    assert (a.blr, a.warmup_lr, a.layer_decay, a.clip_grad, a.epochs, a.warmup_epochs, a.mixup, a.cutmix) == (
        1.25e-3, 2.5e-7, 0.65, 5.0, 100, 20, 0.8, 1.0)
    a = resolved("--recipe", "mae", "--layer-decay", "0.75", "--epochs", "10")
    assert (a.blr, a.layer_decay, a.clip_grad, a.warmup_epochs, a.min_lr) == (5e-4, 0.75, 0.0, 0.5, 1e-6)
    assert resolved("--recipe", "maskalign", family="swin").layer_decay == 0.9
    a = resolved("--recipe", "localmim", family="swin")
    assert (a.lr, a.min_lr, a.layer_decay) == (4e-3, 2.5e-7, 0.9)
    a = resolved(img=32, pretrained=False)
    assert (a.mixup, a.cutmix, a.reprob, a.randaug, a.layer_decay) == (0.0, 0.0, 0.0, 9, 1.0)  # small images, scratch
    a = resolved("--linear-probe")
    assert (a.blr, a.weight_decay, a.epochs, a.batch_size, a.global_pool) == (0.1, 0.0, 90, 512, "token")


# ---- loading: each layout -> the classifier, the expected keys only ----

def save_ours(tmp_path):
    m = simmim_vit()
    torch.save({"model": m.state_dict(), "arch": m.arch}, tmp_path / "encoder.pth")
    return m.state_dict()


def save_simmim_ckpt(tmp_path):  # simmim.py's ckpt.pt: the method module, encoder under `encoder.`
    sd = simmim_vit().state_dict()
    full = {f"encoder.{k}": v for k, v in sd.items()} | {"mask_token": torch.zeros(1, 1, 64),
                                                         "decoder.0.weight": torch.zeros(48, 64, 1, 1)}
    torch.save({"model": full, "optimizer": {}, "step": 2}, tmp_path / "ckpt.pt")
    return sd


def save_timm(tmp_path):  # timm / MAE / DeiT / DINO: vanilla vit_* keys; a DeiT-like 1000-class head is dropped
    ref = randomize(timm.create_model("vit_tiny_patch16_224", **VIT, num_classes=1000))
    torch.save({"model": ref.state_dict()}, tmp_path / "mae.pth")
    return {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}


def save_beit(tmp_path):  # the official SimMIM ViT pretraining: BEiT keys, `encoder.`, mask token, decoder
    ref = randomize(timm.create_model("beit_base_patch16_224", use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                                      use_rel_pos_bias=False, init_values=0.1, global_pool="token", num_classes=0,
                                      **{k: v for k, v in VIT.items() if k != "num_heads"}, num_heads=1))
    sd = {f"encoder.{k}": v for k, v in ref.state_dict().items()} | {"encoder.mask_token": torch.zeros(1, 1, 64),
                                                                       "decoder.0.weight": torch.zeros(48, 64, 1, 1)}
    torch.save({"model": sd, "config": "yacs"}, tmp_path / "simmim_pretrain__vit.pth")
    return vit.convert(ref.state_dict())[0]


def save_torchvision(tmp_path):
    tv = randomize(pytest.importorskip("torchvision").models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=1, hidden_dim=64, mlp_dim=256, num_classes=7))
    torch.save(tv.state_dict(), tmp_path / "vit_b_16.pth")
    return {k: v for k, v in vit.convert(tv.state_dict())[0].items() if not k.startswith("head.")}


def save_hf_clip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=1, image_size=16, patch_size=4)
    randomize(transformers.CLIPVisionModel(cfg)).save_pretrained(tmp_path / "clip")
    return vit.load_checkpoint(str(tmp_path / "clip"))[0]


def save_swin_simmim(tmp_path):  # Microsoft layout: downsample closes a stage, buffers saved, `encoder.`, decoder
    m = randomize(swin.SwinTransformer(**SWIN, num_classes=0))
    out = {}
    for k, v in m.state_dict().items():
        if ".downsample." in k:
            k = f"layers.{int(k.split('.')[1]) - 1}.downsample.{k.split('.downsample.')[1]}"
        out[f"encoder.{k}"] = v
    out |= {"encoder.mask_token": torch.zeros(1, 1, 16), "decoder.0.weight": torch.zeros(3072, 32, 1, 1),
            "encoder.layers.0.blocks.0.attn.relative_position_index": torch.zeros(36, 36, dtype=torch.long)}
    torch.save({"model": out}, tmp_path / "simmim_pretrain__swin.pth")
    return m.state_dict()


LAYOUTS = {  # name: (writer, file, flags, fresh keys, dropped keys)
    "ours": (save_ours, "encoder.pth", [], ["fc_norm.", "head."], ["norm."]),
    "simmim_ckpt": (save_simmim_ckpt, "ckpt.pt", [], ["fc_norm.", "head."], ["norm."]),
    "timm_mae_deit": (save_timm, "mae.pth", [], ["fc_norm.", "head."], ["norm."]),
    "timm_token_pool": (save_timm, "mae.pth", ["--global-pool", "token"], ["head."], []),
    "simmim_official_vit": (save_beit, "simmim_pretrain__vit.pth", [], ["fc_norm.", "head."], ["norm."]),
    "torchvision": (save_torchvision, "vit_b_16.pth", [], ["fc_norm.", "head."], ["norm."]),
    "hf_clip": (save_hf_clip, "clip", [], ["fc_norm.", "head."], ["norm."]),
    "simmim_official_swin": (save_swin_simmim, "simmim_pretrain__swin.pth", [], ["head."], []),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_loads_with_only_the_expected_keys(tmp_path, layout):
    write, name, flags, fresh, dropped = LAYOUTS[layout]
    ref = write(tmp_path)
    model, missing, unexpected = build(tmp_path / name, *flags)
    assert missing and all(k.startswith(tuple(fresh)) for k in missing)
    assert all(k.startswith(tuple(dropped)) for k in unexpected) and bool(unexpected) == bool(dropped)
    own = model.state_dict()
    if "rel_pos_bias.relative_position_bias_table" in ref:  # SimMIM's remap: the shared table goes to every block
        table = ref.pop("rel_pos_bias.relative_position_bias_table")
        assert all(torch.equal(own[f"blocks.{i}.attn.relative_position_bias_table"], table) for i in range(2))
    for k, v in ref.items():
        if not k.startswith(("norm.", "head.")) or layout in ("timm_token_pool", "simmim_official_swin"):
            assert torch.equal(own[k], v), k
    fc = model.head.fc if layout.endswith("swin") else model.head
    assert fc.weight.std() < 1e-4 and fc.out_features == 3  # MAE's head init, std 2e-5


def test_resolution_and_window_changes_are_interpolated(tmp_path):
    save_timm(tmp_path)
    model, _, _ = build(tmp_path / "mae.pth", "--img-size", "32")  # 4x4 -> 8x8 patches, MAE's bicubic
    assert model.pos_embed.shape == (1, 65, 64)
    save_swin_simmim(tmp_path)
    model, _, _ = build(tmp_path / "simmim_pretrain__swin.pth", "--img-size", "56", "--window-size", "7")
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (169, 2)  # 121 rows -> 169


def test_fixed_sincos_table_is_fine_tuned(tmp_path):
    """LocalMIM and MaskAlign export MAE's fixed sin-cos table; MAE's fine-tuning loads it into a learnable one."""
    enc = randomize(vit.VisionTransformer(**VIT, num_classes=0, pos_embed="sincos"))
    torch.save({"model": enc.state_dict(), "arch": enc.arch}, tmp_path / "encoder.pth")
    model, _, _ = build(tmp_path / "encoder.pth")
    assert model.pos_embed.requires_grad and model.arch["pos_embed"] == "learn"
    torch.testing.assert_close(model.pos_embed.data, enc.pos_embed.data)


def test_init_path_is_that_architecture_from_scratch(tmp_path):
    sd = save_ours(tmp_path)
    model, missing, _ = build(f"init:{tmp_path / 'encoder.pth'}")
    assert missing is None and model.arch["rel_pos_bias"] == "block" and model.arch["init_values"] == 0.1
    assert not torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    args = finetune.get_args(["--pretrained", f"init:{tmp_path / 'encoder.pth'}", *CPU])
    finetune.read_arch(args)
    assert args.layer_decay == 1.0 and args.blr == 1.25e-3  # the recipe, without layer decay (MAE's scratch runs)


def test_official_finetuned_releases_evaluate_strictly(tmp_path):
    """SimMIM's fine-tuned files: BEiT ViT with per-block tables + fc_norm + head; Microsoft Swin with `head.*`."""
    ref = randomize(timm.create_model("beit_base_patch16_224", use_abs_pos_emb=False, use_rel_pos_bias=True,
                                      init_values=0.1, global_pool="avg", num_classes=3,
                                      **{k: v for k, v in VIT.items() if k != "num_heads"}, num_heads=1)).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "simmim_finetune__vit.pth")
    model, missing, unexpected = build(tmp_path / "simmim_finetune__vit.pth", "--eval")
    x = torch.randn(2, 3, 16, 16)
    assert missing == unexpected == [] and torch.allclose(model.eval()(x), ref(x), atol=1e-5)
    m = randomize(swin.SwinTransformer(**SWIN, num_classes=3)).eval()
    ms = {}
    for k, v in m.state_dict().items():  # Microsoft layout: downsample closes the previous stage, `head.*`
        if ".downsample." in k:
            k = f"layers.{int(k.split('.')[1]) - 1}.downsample.{k.split('.downsample.')[1]}"
        ms[k.replace("head.fc.", "head.")] = v
    torch.save({"model": ms}, tmp_path / "simmim_finetune__swin.pth")
    model, missing, unexpected = build(tmp_path / "simmim_finetune__swin.pth", "--eval")
    x = torch.randn(2, 3, 48, 48)
    assert missing == unexpected == [] and torch.equal(model.eval()(x), m(x))


def test_refused_keys_name_the_keys_and_the_file(tmp_path):
    sd = simmim_vit().state_dict()
    torch.save({"model": sd | {"blocks.0.attn.extra": torch.zeros(3)}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth.*unexpected blocks\.0\.attn\.extra"):
        build(tmp_path / "odd.pth")
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("norm.")}}, tmp_path / "localmim.pth")
    build(tmp_path / "localmim.pth")  # average pooling needs no final norm (LocalMIM's ViT)
    with pytest.raises(ValueError, match=r"localmim\.pth.*missing norm\.weight"):
        build(tmp_path / "localmim.pth", "--global-pool", "token")
    torch.save({"model": sd}, tmp_path / "headless.pth")
    with pytest.raises(ValueError, match=r"missing fc_norm\.weight.*missing head\.weight"):
        build(tmp_path / "headless.pth", "--eval", "--global-pool", "avg")
    save_swin_simmim(tmp_path)
    with pytest.raises(ValueError, match="holds a swin"):
        build(tmp_path / "simmim_pretrain__swin.pth", "--model", "vit_tiny_patch16_224")
    torch.save({"model": {"layers.0.weight": torch.zeros(2)}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="junk.pth: not a ViT.*not a Swin"):
        build(tmp_path / "junk.pth")


# ---- runs: linear probe, simmim.py -> finetune.py -> --eval, resume, errors ----

def run(*flags):
    finetune.main(finetune.get_args([*flags, *CPU]))


def test_linear_probe_leaves_the_encoder_bit_identical(tmp_path, npz):
    sd = save_ours(tmp_path)
    out = str(tmp_path / "lp")
    run("--pretrained", str(tmp_path / "encoder.pth"), "--linear-probe", "--probe-block", "1", "--data", npz,
        "--batch-size", "16", "--steps", "2", "--out", out)
    after = torch.load(os.path.join(out, "classifier.pth"))["model"]
    assert not any(k.startswith("blocks.1.") for k in after)  # SimMIM's probe: the blocks after it are cut
    for k, v in after.items():
        if k.startswith(("patch_embed", "cls_token", "blocks.0.")) and "relative_position" not in k:
            assert torch.equal(v, sd[k]), k
        if "relative_position" in k:
            assert torch.equal(v, sd["rel_pos_bias.relative_position_bias_table"])
    assert after["head.0.num_batches_tracked"] == 2  # MAE#54: the probe trains the BatchNorm's statistics
    state = torch.load(os.path.join(out, "ckpt.pt"))["optimizer"]["state"]
    assert len(state) == 2 and all("mu" in s for s in state.values())  # LARS moved the head's weight and bias only
    run("--eval", "--pretrained", os.path.join(out, "classifier.pth"), "--data", npz, "--batch-size", "16",
        "--out", out)
    assert log(out)[-1]["top1"] == log(out)[-2]["top1"]  # the BatchNorm head is rebuilt from the file's keys


def test_simmim_pretraining_to_finetune_to_eval(tmp_path, npz):
    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    subprocess.run([sys.executable, "simmim.py", "--data", npz, "--model", "vit_tiny_patch16_224", "--img-size", "16",
                    "--model-patch-size", "4", "--depth", "2", "--mask-patch-size", "4", "--batch-size", "8",
                    "--steps", "2", "--out", pre, *CPU], cwd=ROOT, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "finetune.py", "--pretrained", os.path.join(pre, "encoder.pth"), "--data", npz,
                        "--batch-size", "8", "--steps", "2", "--mixup", "0.8", "--cutmix", "1.0", "--out", ft, *CPU],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "missing ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']" in r.stdout
    rec = log(ft)[-1]
    assert rec["step"] == 2 and {"loss", "lr", "img_per_s", "peak_mem_mb", "top1", "top5", "best_top1"} <= set(rec)
    saved = torch.load(os.path.join(ft, "classifier.pth"))
    assert saved["num_classes"] == 3 and saved["arch"]["rel_pos_bias"] == "block" and "head.weight" in saved["model"]
    run("--eval", "--pretrained", os.path.join(ft, "classifier.pth"), "--data", npz, "--batch-size", "8", "--out", ft)
    assert log(ft)[-1]["top1"] == rec["top1"] and log(ft)[-1]["top5"] == rec["top5"]


def test_resume_continues_exactly(tmp_path, npz):
    save_ours(tmp_path)
    common = ["--pretrained", str(tmp_path / "encoder.pth"), "--data", npz, "--batch-size", "16", "--log-every", "1",
              "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--epochs", "4"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(*common, "--steps", "4", "--out", a)  # 3 steps per epoch: the run crosses an epoch and evaluates twice
    run(*common, "--steps", "2", "--out", b)
    run(*common, "--steps", "4", "--out", b, "--resume")
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt")) for d in (a, b))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert [r["loss"] for r in log(a)] == [r["loss"] for r in log(b)]
    assert [r["top1"] for r in log(a) if r["step"] % 3 == 0] == [r["top1"] for r in log(b) if r["step"] % 3 == 0]


def test_cifar_preset_is_the_efficacy_recipe_and_the_checkpoint_keeps_its_architecture():
    a = finetune.get_args(["--preset", "cifar", "--pretrained", "runs/mae/encoder.pth"])
    assert (a.recipe, a.lr, a.layer_decay, a.randaug, a.batch_size, a.epochs) == ("mae", 2e-3, 0.75, 0, 64, 100)
    assert a.model is None and a.depth is None  # the encoder file decides those
    a = finetune.get_args(["--preset", "cifar", "--lr", "1e-3"])
    assert (a.lr, a.model, a.depth, a.img_size) == (1e-3, "vit_tiny_patch16_224", 6, 32)  # from scratch: the preset's


def test_eval_every_evaluates_at_those_epochs_and_at_the_end(tmp_path, npz):
    out = str(tmp_path / "ft")  # 3 steps per epoch, 3 epochs: evaluations after epoch 2 and at the end only
    run("--model", "vit_tiny_patch16_224", "--img-size", "16", "--model-patch-size", "4", "--depth", "1", "--data", npz,
        "--batch-size", "16",
        "--epochs", "3", "--eval-every", "2", "--log-every", "1", "--out", out)
    assert [r["step"] for r in log(out) if "top1" in r] == [6, 9]


@pytest.mark.parametrize("flags, message", [
    (["--eval"], "--eval needs --pretrained"),
    (["--eval", "--pretrained", "init:x.pth"], "--eval needs --pretrained CLASSIFIER"),
    (["--probe-block", "8"], "--probe-block 8: a block number >= 1, with --linear-probe"),
    (["--layer-decay", "1.5"], "--layer-decay 1.5: must be in"),
    (["--pretrained", "x.pth", "--depth", "2"], "--depth / --model-patch-size shape a model from scratch"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
])
def test_bad_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.get_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_setups_end_in_one_line(tmp_path, npz):
    tiny = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--model-patch-size", "4", "--depth", "2"]
    save_swin_simmim(tmp_path)
    swin_ckpt = ["--pretrained", str(tmp_path / "simmim_pretrain__swin.pth")]
    for flags, message in ((tiny + ["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2 must be below"),
                           (tiny + ["--linear-probe", "--probe-block", "3"], "--probe-block 3: the encoder has 2"),
                           (swin_ckpt + ["--global-pool", "token"], "are for ViT models"),
                           (swin_ckpt + ["--window-size", "5"], "--img-size 48: stages of 12/6 tokens"),
                           (tiny + ["--window-size", "7"], "--window-size applies to Swin models only"),
                           (["--pretrained", str(tmp_path / "none.pth")], "none.pth: no such checkpoint file")):
        with pytest.raises(SystemExit) as e:
            run("--data", npz, "--out", str(tmp_path), *flags)
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    r = subprocess.run([sys.executable, "finetune.py", "--pretrained", str(tmp_path / "none.pth"), *CPU,
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path}/none.pth: no such checkpoint file"]  # no traceback
