"""maskalign.py: frozen teacher, attention-guided sampling, whitened targets, Dynamic Alignment, loss, teacher
layouts, grid/depth mismatch, end-to-end runs, exact resume, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import maskalign as ma
import vit

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
STUDENT = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-patch-size", "4", "--depth", "2",
           "--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0", "--data", "synthetic",
           "--log-every", "1"]


def randomize(model):
    """Non-trivial values everywhere; LayerNorm weights near 1 (as tests/test_vit.py)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def save_encoder(path, **kw):
    """An encoder.pth as this repository writes it, with random weights."""
    m = randomize(vit.VisionTransformer(**{**TINY, "num_classes": 0, **kw}).eval())
    torch.save({"model": m.state_dict(), "arch": m.arch}, path)
    return m


def get_args(tmp_path, *extra):
    return ma.get_args(STUDENT + ["--out", str(tmp_path / "run"), *extra])


def student(args):
    return ma.build_encoder(args, pos_embed="sincos", drop_path_rate=args.drop_path)


def main_error(argv):
    """Run main() in-process; return the message it exits with."""
    with pytest.raises(SystemExit) as e:
        ma.main(ma.get_args(argv))
    return str(e.value.code)


# ---- teacher ----

def test_teacher_is_frozen_gets_no_gradient_and_is_not_saved(tmp_path):
    save_encoder(tmp_path / "t.pth")
    args = get_args(tmp_path, "--teacher", str(tmp_path / "t.pth"), "--top-k", "2")
    enc = student(args)
    teacher, _, _ = ma.build_teacher(args, enc)
    model = ma.MaskAlign(enc, 64, 2, 2).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.AdamW(ma.param_groups(model, 0.05, ["distill_weights"]), lr=1e-2)
    img = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        loss, _ = ma.maskalign_loss(model, teacher, img, "attention", 19)
        loss.backward()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), trainable  # DDP-safe
        opt.step()
        opt.zero_grad()
    feats, importance = teacher(img, attention=True)
    assert not feats.requires_grad and not importance.requires_grad
    assert not teacher.training and not teacher.vit.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("vit.") for k in model.state_dict())  # ckpt.pt holds no teacher
    assert not model.encoder.norm.weight.requires_grad  # the final norm is never trained (official: unused)


def layout(name, tmp_path):
    """A random-weight teacher written in a public layout -> (path, reference(x) -> (block outputs, last-block
    attention probabilities or None)), the reference being that layout's own implementation where there is one."""
    if name == "encoder":  # our own encoder.pth
        m = save_encoder(tmp_path / "encoder.pth")
        path = tmp_path / "encoder.pth"
    elif name == "openai":  # OpenAI clip/model.py keys (ViT-B-16.pt renamed; the jit container is tested in test_vit)
        m = randomize(vit.VisionTransformer(**{**TINY, "embed_dim": 128, "num_heads": 2}, num_classes=0,
                                            pre_norm=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5).eval())
        sd = m.state_dict()
        out = {"visual.conv1.weight": sd["patch_embed.proj.weight"],
               "visual.class_embedding": sd["cls_token"].flatten(),
               "visual.positional_embedding": sd["pos_embed"][0], "visual.proj": torch.randn(128, 32),
               "visual.ln_pre.weight": sd["norm_pre.weight"], "visual.ln_pre.bias": sd["norm_pre.bias"],
               "visual.ln_post.weight": sd["norm.weight"], "visual.ln_post.bias": sd["norm.bias"],
               "token_embedding.weight": torch.zeros(5, 8)}
        names = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                 "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
        for k, v in sd.items():
            if k.startswith("blocks."):
                i, rest = k.split(".", 2)[1:]
                a = next(a for a in names if rest.startswith(a))
                out[f"visual.transformer.resblocks.{i}.{names[a]}{rest[len(a):]}"] = v
        path = tmp_path / "ViT-B-16.pt"
        torch.save(out, path)
    elif name in ("hf_clip", "hf_vit"):  # Hugging Face folders, as the official code loads them
        transformers = pytest.importorskip("transformers")
        kw = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4)
        if name == "hf_clip":
            hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw, attn_implementation="eager"))
        else:  # facebook/dino-vitb16's class, with the unused pooler MaskAlign builds
            hf = transformers.ViTModel(transformers.ViTConfig(**kw, attn_implementation="eager"))
        randomize(hf.eval()).save_pretrained(tmp_path / name)

        def ref(x):
            out = hf(pixel_values=x, output_hidden_states=True, output_attentions=True)
            return out.hidden_states[1:], out.attentions[-1]
        return tmp_path / name, ref
    elif name == "dino":  # timm keys inside a DINO training checkpoint (teacher / module.backbone. / head)
        timm = pytest.importorskip("timm")
        # 192 wide, 3 heads: a file in timm keys does not store the number of heads; vit.py takes timm's for a width
        t = randomize(timm.create_model("vit_base_patch16_224", **{**TINY, "embed_dim": 192, "num_heads": 3},
                                        num_classes=0).eval())
        torch.save({"teacher": {f"module.backbone.{k}": v for k, v in t.state_dict().items()}
                    | {"module.head.mlp.0.weight": torch.zeros(3, 3)}, "epoch": 1}, tmp_path / "dino.pth")

        def ref(x):
            x, outs = t.norm_pre(t._pos_embed(t.patch_embed(x))), []
            for blk in t.blocks:
                outs.append(x := blk(x))
            return outs, None
        return tmp_path / "dino.pth", ref
    elif name == "torchvision":
        tv = randomize(pytest.importorskip("torchvision").models.VisionTransformer(
            image_size=32, patch_size=4, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=7).eval())
        torch.save(tv.state_dict(), tmp_path / "vit_b_16.pth")

        def ref(x):
            x = tv._process_input(x)
            x, outs = torch.cat([tv.class_token.expand(x.shape[0], -1, -1), x], 1) + tv.encoder.pos_embedding, []
            for layer in tv.encoder.layers:
                outs.append(x := layer(x))
            return outs, None
        return tmp_path / "vit_b_16.pth", ref
    else:  # "simmim": the official SimMIM ViT pretraining checkpoint (BEiT-style), timm's beit as the reference
        timm = pytest.importorskip("timm")
        b = randomize(timm.create_model("beit_base_patch16_224", use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                                        use_rel_pos_bias=False, init_values=0.1, **TINY, num_classes=0).eval())
        torch.save({"model": {f"encoder.{k}": v for k, v in b.state_dict().items()}
                    | {"encoder.mask_token": torch.zeros(1, 1, 64), "decoder.0.weight": torch.zeros(48, 64, 1, 1)}},
                   tmp_path / "simmim.pth")

        def ref(x):
            x = b.patch_embed(x)
            x, bias, outs = torch.cat([b.cls_token.expand(x.shape[0], -1, -1), x], 1), b.rel_pos_bias(), []
            for blk in b.blocks:
                outs.append(x := blk(x, shared_rel_pos_bias=bias))
            return outs, None
        return tmp_path / "simmim.pth", ref

    def ref(x):  # the same weights in vit.py
        _, outs, logits = m.forward_features(x, out_blocks=range(2), attn=True)
        return outs, logits[-1].softmax(-1)
    return path, ref


@pytest.mark.parametrize("name", ["encoder", "openai", "hf_clip", "hf_vit", "dino", "torchvision", "simmim"])
def test_teacher_from_each_layout_gives_the_reference_features(name, tmp_path):
    path, ref = layout(name, tmp_path)
    args = get_args(tmp_path, "--teacher", str(path), "--top-k", "2")
    teacher, _, desc = ma.build_teacher(args, student(args))
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)  # ImageNet-normalised, as the loader gives it
    clip = name in ("openai", "hf_clip")  # CLIP towers get CLIP's mean/std, the others the batch as it is
    assert ("clip mean/std" in desc) == clip
    x = img
    if clip:
        raw = img * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
        x = (raw - torch.tensor(ma.CLIP_MEAN).view(3, 1, 1)) / torch.tensor(ma.CLIP_STD).view(3, 1, 1)
    feats, importance = teacher(img, attention=True)
    with torch.no_grad():
        outs, attn = ref(x)
    torch.testing.assert_close(feats, torch.stack(list(outs)), atol=1e-4, rtol=1e-4)
    if attn is not None:  # HF's attentions are probabilities over all keys: cls row, patch columns, head mean
        torch.testing.assert_close(importance, attn[:, :, 0, 1:].mean(1), atol=1e-5, rtol=1e-4)


def test_teacher_of_another_patch_size_sees_the_students_grid(tmp_path):
    """CLIP-L/14 under a /16 student: the official code feeds 196 px and resizes the 16x16 positions to 14x14
    (models_pretrain.py L24-30, L275). Here: a /2 teacher trained at 32 px under a /4 student of 32 px."""
    t = save_encoder(tmp_path / "p2.pth", patch_size=2)
    args = get_args(tmp_path, "--teacher", str(tmp_path / "p2.pth"), "--top-k", "2")
    teacher, _, _ = ma.build_teacher(args, student(args))
    assert teacher.size == 16 and teacher.vit.grid == (8, 8)
    img = torch.randn(2, 3, 32, 32)
    feats, importance = teacher(img, attention=True)
    assert feats.shape == (2, 2, 1 + 64, 64) and importance.shape == (2, 64)
    pos = t.pos_embed.detach()  # the official resize_pos_embed: bicubic on the patch rows, cls row kept
    grid = F.interpolate(pos[:, 1:].reshape(1, 16, 16, 64).permute(0, 3, 1, 2), (8, 8), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 64)
    small = vit.VisionTransformer(**{**t.arch, "img_size": 16}, num_classes=0).eval()
    small.load_state_dict({**t.state_dict(), "pos_embed": torch.cat([pos[:, :1], grid], 1)})
    x = F.interpolate(img, (16, 16), mode="bicubic", align_corners=False)
    _, outs, _ = small.forward_features(x, out_blocks=range(2))
    torch.testing.assert_close(feats, torch.stack(outs), atol=1e-5, rtol=1e-5)


# ---- masking ----

def test_attention_guided_sampling_keeps_salient_patches_as_sampling_without_replacement():
    torch.manual_seed(0)
    p = torch.tensor([8.0] * 4 + [2.0] * 4 + [1.0] * 8)
    p = (p / p.sum()).expand(20000, -1)  # (B, N) importance, N = 16
    ours = ma.attention_keep(p, 4)
    official = torch.multinomial(p, 16, replacement=False)[:, :4]  # models_pretrain.py attention_masking
    freq = lambda ids: torch.zeros(p.shape).scatter_(1, ids, 1.0).mean(0)  # (N,) how often each patch is visible
    assert (freq(ours) - freq(official)).abs().max() < 0.02  # both are sampling without replacement, prob ~ p
    f = freq(ours)
    assert f[:4].mean() > f[4:8].mean() + 0.2 and f[4:8].mean() > f[8:].mean() + 0.05  # salient -> visible more
    first = torch.bincount(ours[:, 0], minlength=16) / len(p)  # the first draw follows p itself
    assert (first - p[0]).abs().max() < 0.01
    uniform = freq(ma.random_keep(20000, 16, 4, "cpu"))
    assert (uniform - 0.25).abs().max() < 0.02


def test_attention_guided_sampling_never_fails_on_zeros():
    imp = torch.zeros(3, 16)
    imp[0, :5] = 0.2  # 5 patches with attention, 8 to keep
    imp[2] = torch.rand(16) * 1e-40  # underflow-sized (subnormal) values; row 1 underflowed to all zeros
    with pytest.raises(RuntimeError):
        torch.multinomial(imp[1:2], 16, replacement=False)  # the official sampler breaks here
    keep = ma.attention_keep(imp.half(), 8)
    assert keep.shape == (3, 8) and all(len(set(row.tolist())) == 8 for row in keep)
    assert set(range(5)) <= set(keep[0].tolist())  # every non-zero patch is drawn before any zero one


# ---- targets, Dynamic Alignment, loss ----

def test_targets_are_whitened_teacher_tokens_at_cls_and_visible_positions():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 17, 8) * 5 + 3  # (K, B, 1+N, Dt)
    keep = torch.stack([torch.randperm(16)[:4] for _ in range(3)])  # (B, n)
    y = ma.whitened_targets(feats, keep)
    assert y.shape == (2, 3, 5, 8)
    for k in range(2):  # the official order (L313-327): whiten all 1+N tokens, then cls + gather
        w = F.layer_norm(feats[k], (8,))
        ref = torch.cat([w[:, :1], torch.gather(w[:, 1:], 1, keep[..., None].expand(-1, -1, 8))], 1)
        torch.testing.assert_close(y[k], ref)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 3, 5), atol=1e-3, rtol=0)
    quiet = feats * 1e-3  # var ~ 2.5e-5: the eps of 1e-5 shows
    x = torch.cat([quiet[:, :, :1], torch.gather(quiet[:, :, 1:], 2, keep[None, ..., None].expand(2, -1, -1, 8))], 2)
    hand = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(ma.whitened_targets(quiet, keep), hand)


def test_dynamic_alignment_init_and_no_weight_decay():
    enc = vit.VisionTransformer(**{**TINY, "depth": 6}, num_classes=0, pos_embed="sincos")
    m = ma.MaskAlign(enc, teacher_dim=48, teacher_depth=6, top_k=5)
    assert torch.equal(m.distill_weights.data, (torch.eye(6) + 0.01)[1:])  # official I + 0.01, rows of blocks 2..6
    assert len(m.distill_heads) == 5 and m.distill_heads[0].weight.shape == (48, 64)
    for h in m.distill_heads:  # xavier-uniform, zero bias
        assert h.weight.abs().max() <= (6 / (64 + 48)) ** 0.5 and not h.bias.any()
    decay, no_decay = ({id(p) for p in g["params"]} for g in ma.param_groups(m, 0.05, skip=["distill_weights"]))
    assert id(m.distill_weights) in no_decay  # skip_list=["distill_weights"], main_pretrain.py L206
    assert id(enc.cls_token) in decay and id(m.distill_heads[0].weight) in decay  # cls_token decayed, as MAE
    assert id(m.distill_heads[0].bias) in no_decay
    assert id(enc.pos_embed) not in decay | no_decay and id(enc.norm.weight) not in decay | no_decay  # frozen
    other = ma.MaskAlign(vit.VisionTransformer(**{**TINY, "depth": 3}, num_classes=0), 48, teacher_depth=6, top_k=5)
    assert torch.equal(other.distill_weights.data, torch.full((5, 3), 1 / 3))  # depths differ: official `sum` init


def test_loss_formula_on_hand_built_tensors():
    t = torch.zeros(2, 3, 4)
    loss, levels = ma.align_loss([t + 0.5, t - 3.0], [t, t])
    # 2 * SmoothL1(beta 1): |d| = 0.5 -> 2 * 0.5 d^2 = 0.25; |d| = 3 -> 2 * (3 - 0.5) = 5; mean over the levels
    torch.testing.assert_close(levels, torch.tensor([0.25, 5.0]))
    torch.testing.assert_close(loss, torch.tensor(2.625))


def test_minimal_alignment_equals_the_official_full_module():
    """Official: W (L, L), L heads, weights [0]*(L-K) + [1/K]*K. Ours: the last K rows and heads. Same loss and
    gradients; the official rows 0..L-K-1 get none."""
    torch.manual_seed(0)
    enc = vit.VisionTransformer(**{**TINY, "depth": 4}, num_classes=0, pos_embed="sincos").eval()
    m = ma.MaskAlign(enc, 24, teacher_depth=4, top_k=2)
    W = (torch.eye(4) + 0.01 + 0.1 * torch.randn(4, 4)).requires_grad_()  # a trained-looking W
    heads = [torch.nn.Linear(64, 24) for _ in range(4)]
    with torch.no_grad():
        m.distill_weights.copy_(W[2:])
        for ours, theirs in zip(m.distill_heads, heads[2:]):
            ours.load_state_dict(theirs.state_dict())
    img, keep = torch.randn(2, 3, 32, 32), torch.stack([torch.randperm(64)[:19] for _ in range(2)])
    targets = torch.randn(4, 2, 20, 24)
    loss, _ = m(img, keep, targets[2:])
    _, hs, _ = enc.forward_features(img, keep=keep, out_blocks=range(4))
    student = torch.einsum("ab,bcde->acde", W, torch.stack(hs))  # get_student
    weights = [0.0, 0.0, 0.5, 0.5]  # --loss_weights top2
    official = sum(w * 2 * F.smooth_l1_loss(targets[i], heads[i](student[i])) for i, w in enumerate(weights) if w > 0)
    torch.testing.assert_close(loss, official)
    g_ours, = torch.autograd.grad(loss, m.distill_weights)
    g_official, = torch.autograd.grad(official, W)
    torch.testing.assert_close(g_ours, g_official[2:])
    assert not g_official[:2].any()


# ---- end to end ----

def test_two_steps_end_to_end_and_export(tmp_path):
    save_encoder(tmp_path / "teacher.pth")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "maskalign.py", *STUDENT, "--steps", "2", "--top-k", "2",
                        "--teacher", str(tmp_path / "teacher.pth"), "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cls + 19 of 64 patches (attention masking)" in r.stdout and "WARNING" not in r.stderr
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [x["step"] for x in recs] == [1, 2]
    for key in ("loss", "lr", "img_per_s", "peak_mem_mb", "loss_t1", "loss_t2"):
        assert all(isinstance(x[key], float | int) and x[key] == x[key] for x in recs), key
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "step", "args"} and ckpt["step"] == 2
    sd = ckpt["model"]
    assert sd["distill_weights"].shape == (2, 2) and sd["distill_heads.1.weight"].shape == (64, 192)
    assert not any(k.startswith(("vit.", "teacher")) for k in sd) and len(ckpt["args"]["teacher_sha256"]) == 64
    enc = torch.load(out / "encoder.pth", weights_only=True)
    assert torch.equal(enc["model"]["norm.weight"], torch.ones(192))  # never trained, as officially
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0)
    ref.load_state_dict(enc["model"], strict=True)


def test_depth_width_and_patch_mismatch(tmp_path):
    """A 3-block, 48-wide, /2 teacher under a 2-block, 192-wide, /4 student: the official `sum` fusion, heads
    192 -> 48, the teacher on a 16-px input."""
    save_encoder(tmp_path / "t.pth", depth=3, embed_dim=48, patch_size=2)
    ma.main(ma.get_args(STUDENT + ["--steps", "2", "--top-k", "2", "--mask-type", "random", "--out", str(tmp_path),
                                   "--teacher", str(tmp_path / "t.pth")]))
    sd = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert sd["distill_weights"].shape == (2, 2) and sd["distill_heads.0.weight"].shape == (48, 192)
    torch.testing.assert_close(sd["distill_weights"], torch.full((2, 2), 0.5), atol=1e-6, rtol=0)  # tiny warmup LR
    rec = json.loads(open(tmp_path / "log.jsonl").readlines()[-1])
    assert {"loss_t2", "loss_t3"} <= rec.keys()  # the top-2 of 3 teacher blocks


def test_random_teacher_warns_and_resume_is_exact(tmp_path, capsys):
    base = STUDENT + ["--teacher", "random", "--top-k", "2"]
    ma.main(ma.get_args(base + ["--steps", "2", "--out", str(tmp_path / "a")]))
    assert "WARNING: --teacher random" in capsys.readouterr().err
    ma.main(ma.get_args(base + ["--steps", "1", "--out", str(tmp_path / "b")]))
    save_encoder(tmp_path / "other.pth")
    msg = main_error(STUDENT + ["--teacher", str(tmp_path / "other.pth"), "--top-k", "2", "--steps", "2",
                                "--out", str(tmp_path / "b"), "--resume"])
    assert "--resume" in msg and "other weights" in msg
    ma.main(ma.get_args(base + ["--steps", "2", "--out", str(tmp_path / "b"), "--resume"]))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=0, rtol=0, msg=k)


# ---- errors ----

@pytest.mark.parametrize("argv, expect", [
    (["--mask-ratio", "1.0"], "--mask-ratio 1.0"),
    (["--mask-ratio", "0.99"], "no visible patch"),
    (["--model", "swin_base_patch4_window7_224"], "--model swin_base_patch4_window7_224"),
    (["--top-k", "0"], "--top-k 0"),
    (["--img-size", "30"], "--img-size 30"),
    (["--drop-path", "1.5"], "--drop-path 1.5"),
    (["--mask-type", "block"], "--mask-type"),
])
def test_bad_flags_name_the_flag(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        ma.get_args(STUDENT + argv)
    assert e.value.code == 2 and expect in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*none of timm's ViT sizes")  # the tiny hub folder's width
def test_teacher_errors_are_one_line_and_say_how_to_get_one(tmp_path, monkeypatch):
    base = STUDENT + ["--steps", "1", "--out", str(tmp_path / "run")]
    msg = main_error(base + ["--teacher", str(tmp_path / "missing.pt")])
    assert msg.startswith("error: --teacher") and "huggingface-cli download" in msg and "\n" not in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = main_error(base + ["--teacher", "no-such-org/no-such-model"])
    assert "Hugging Face hub" in msg and "ViT-B-16.pt" in msg
    hub = pytest.importorskip("huggingface_hub")
    folder = tmp_path / "hub"  # what a download leaves: a folder with *.safetensors
    folder.mkdir()
    pytest.importorskip("safetensors.torch").save_file(save_encoder(tmp_path / "x.pth").state_dict(),
                                                       str(folder / "model.safetensors"))
    monkeypatch.setattr(hub, "snapshot_download", lambda name, allow_patterns: str(folder))
    ma.main(ma.get_args(base[:-1] + [str(tmp_path / "ok"), "--teacher", "org/teacher", "--top-k", "2"]))
    binary = tmp_path / "hub_bin"  # a hub repository that ships pytorch_model.bin only: the second request gets it
    binary.mkdir()
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", lambda name, allow_patterns: calls.append(allow_patterns) or str(binary))
    torch.save(save_encoder(tmp_path / "y.pth").state_dict(), binary / "pytorch_model.bin")
    ma.main(ma.get_args(base[:-1] + [str(tmp_path / "ok_bin"), "--teacher", "org/teacher", "--top-k", "2"]))
    assert calls[-1] == ["config.json", "pytorch_model.bin"]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    assert "ModuleNotFoundError" in main_error(base + ["--teacher", "org/teacher"])
    torch.save({"foo": torch.zeros(1)}, tmp_path / "junk.pth")
    assert "not a ViT checkpoint" in main_error(base + ["--teacher", str(tmp_path / "junk.pth")])
    save_encoder(tmp_path / "t.pth")
    assert "--top-k 5: the teacher has only 2 blocks" in main_error(base + ["--teacher", str(tmp_path / "t.pth")])
    save_encoder(tmp_path / "nocls.pth", class_token=False, global_pool="avg")
    assert "class token" in main_error(base + ["--teacher", str(tmp_path / "nocls.pth"), "--top-k", "2"])
    msg = main_error(base + ["--teacher", str(tmp_path / "t.pth"), "--top-k", "2", "--out", str(tmp_path / "new"),
                             "--resume"])
    assert "no checkpoint" in msg
