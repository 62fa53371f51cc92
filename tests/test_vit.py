"""vit.py: shapes, gradients, SDPA vs explicit attention, timm equivalence, the methods' entries, converters."""
import math

import pytest
import torch
import torch.nn as nn

import vit

timm = pytest.importorskip("timm")
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)


def tiny(**kw):
    torch.manual_seed(0)
    return vit.VisionTransformer(**{**TINY, "num_classes": 10, **kw}).eval()


def randomize(model):
    """Non-trivial values everywhere, zero-initialised tables included; LayerNorm weights near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def test_shapes_and_pooling():
    x = torch.randn(2, 3, 32, 32)
    m = tiny()
    assert m.forward_features(x).shape == (2, 65, 64) and m(x).shape == (2, 10)
    avg = tiny(global_pool="avg")
    assert isinstance(avg.norm, nn.Identity) and isinstance(avg.fc_norm, nn.LayerNorm)
    assert tiny(num_classes=0)(x).shape == (2, 64)
    assert vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1).grid == (8, 8)


def test_every_parameter_gets_a_gradient():
    m = tiny(rel_pos_bias="shared", init_values=0.1, global_pool="avg", pos_embed="sincos").train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not m.pos_embed.requires_grad  # the fixed sin-cos table is saved but not trained


@pytest.mark.parametrize("rpb", ["none", "shared", "block"])
def test_sdpa_equals_explicit_attention(rpb):
    m = randomize(tiny(rel_pos_bias=rpb, init_values=0.1))
    x = torch.randn(2, 3, 32, 32)
    fast = m.forward_features(x)
    slow, _, logits = m.forward_features(x, attn=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert len(logits) == 2 and logits[0].shape == (2, 4, 65, 65)


@pytest.mark.parametrize("rpb", ["shared", "block"])
def test_fused_attention_with_a_bias_has_the_explicit_gradients(rpb):
    """The relative position bias goes to SDPA as an additive attn_mask with its gradient (on CUDA the efficient
    kernel takes both; bench/gpu.py reports the backend): outputs and every gradient, the tables' included, equal
    those of the explicit softmax path."""
    m = randomize(tiny(rel_pos_bias=rpb, init_values=0.1))
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for explicit in (False, True):
        m.zero_grad()
        out = m.forward_features(x, attn=explicit)
        (out[0] if explicit else out).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert any("relative_position_bias_table" in n for n in grads[0])
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_cpu_bf16_attention_path_matches_fp32(monkeypatch):
    m = randomize(tiny(rel_pos_bias="shared", init_values=0.1))
    x = torch.randn(2, 3, 32, 32)
    ref = m.forward_features(x)
    monkeypatch.setattr(vit.F, "scaled_dot_product_attention", None)  # must not be called: the explicit path runs
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (SDPA's CPU kernels are slower under bf16)
        low = m.forward_features(x)
    assert (low.float() - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg"), dict(init_values=0.1), dict(class_token=False,
                                                                                             global_pool="avg")])
def test_timm_keys_and_numerics(kw):
    ours = randomize(tiny(**kw))
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY, **kw).eval()
    assert ref.state_dict().keys() == ours.state_dict().keys()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(vit.SIZES))
def test_real_size_key_layout(name):
    with torch.device("meta"):
        ours, ref = vit.create_model(name), timm.create_model(name, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_sincos_table_is_maes():
    t = vit.sincos_pos_embed(8, (2, 3))[0]  # 1 + 6 rows
    assert t[0].abs().sum() == 0
    row, col = 1, 2  # patch 5 in row-major order
    w = 1 / 10000 ** (torch.arange(2) / 2.0)
    expect = torch.cat([torch.sin(col * w), torch.cos(col * w), torch.sin(row * w), torch.cos(row * w)])
    torch.testing.assert_close(t[1 + row * 3 + col], expect)


def test_mask_token_entry():
    m = tiny(pos_embed="none", class_token=False, global_pool="avg")
    x, token = torch.randn(2, 3, 32, 32), torch.randn(1, 1, 64)
    mask = torch.rand(2, 8, 8) < 0.5
    tokens = m.embed(x, mask=mask, mask_token=token)
    torch.testing.assert_close(tokens[mask.flatten(1)], token[0].expand(int(mask.sum()), -1))
    torch.testing.assert_close(tokens[~mask.flatten(1)], m.patch_embed(x)[~mask.flatten(1)])


@pytest.mark.parametrize("rpb", ["none", "shared", "block"])
def test_keep_is_a_gather_of_tokens(rpb):
    """Encoding every patch in a shuffled order gives the shuffled output: the visible-only path places positions
    (absolute and relative) by index, not by sequence order."""
    m = randomize(tiny(rel_pos_bias=rpb, pos_embed="none" if rpb != "none" else "learn"))
    x = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.randperm(64) for _ in range(2)])
    full, part = m.forward_features(x), m.forward_features(x, keep=keep)
    torch.testing.assert_close(part[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part[:, 1:], full[:, 1:].gather(1, keep[..., None].expand(-1, -1, 64)), atol=1e-5,
                               rtol=1e-5)
    few = m.forward_features(x, keep=keep[:, :16])
    assert few.shape == (2, 17, 64)


def test_out_blocks_and_attention_logits():
    m = randomize(tiny())
    x = torch.randn(2, 3, 32, 32)
    final, outs, logits = m.forward_features(x, out_blocks=[0, 1])
    h = m.embed(x)
    for blk, out in zip(m.blocks, outs):
        h = blk(h)
        torch.testing.assert_close(out, h)
    torch.testing.assert_close(final, m.norm(h))
    assert logits == []
    _, _, logits = m.forward_features(x, attn=True)
    probs = logits[-1].softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 65))
    _, last, only = m.forward_features(x, out_blocks=[-1], attn=[-1])  # negative indices count from the end
    torch.testing.assert_close(only[0], logits[-1])
    assert len(only) == 1 and len(last) == 1


def test_drop_path_only_in_training():
    m = randomize(tiny(drop_path_rate=0.5))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))


# ---- converters: random weights in each public layout -> ours -> same outputs as the original implementation ----

def test_simmim_beit_layout_against_timm_beit(tmp_path):
    """The official SimMIM ViT is BEiT-style (q/v biases, gamma_1/2, shared relative position bias, no absolute
    position embedding); timm's beit_* has exactly its keys. A pretraining checkpoint adds `encoder.`, `mask_token`,
    `decoder.0.*` and the index buffer."""
    kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    ref = timm.create_model("beit_base_patch16_224", use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                            use_rel_pos_bias=False, init_values=0.1, global_pool="token", **kw).eval()
    randomize(ref)
    sd = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
    sd.update({"encoder.mask_token": torch.zeros(1, 1, 64), "decoder.0.weight": torch.zeros(48, 64, 1, 1),
               "encoder.rel_pos_bias.relative_position_index": torch.zeros(65, 65, dtype=torch.long)})
    torch.save({"model": sd, "epoch": 3}, tmp_path / "simmim.pth")
    ours_sd, arch = vit.load_checkpoint(str(tmp_path / "simmim.pth"))
    assert arch["rel_pos_bias"] == "shared" and arch["pos_embed"] == "none" and arch["img_size"] == 32
    ours = vit.VisionTransformer(**arch, num_classes=0).eval()
    ours.load_state_dict(ours_sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_simmim_finetune_layout_per_block_tables():
    kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    ref = randomize(timm.create_model("beit_base_patch16_224", use_abs_pos_emb=False, use_rel_pos_bias=True,
                                      init_values=0.1, global_pool="avg", **kw).eval())
    sd, layout = vit.convert(ref.state_dict())
    assert layout == "beit"
    ours = vit.VisionTransformer(**kw, rel_pos_bias="block", pos_embed="none", init_values=0.1, global_pool="avg")
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-5, rtol=1e-5)


def test_torchvision_layout():
    tv = pytest.importorskip("torchvision").models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256, num_classes=7).eval()
    randomize(tv)
    sd, layout = vit.convert(tv.state_dict())
    ours = vit.VisionTransformer(**TINY, num_classes=7).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-5)


CLIP = dict(TINY, embed_dim=128, num_heads=2)  # CLIP's heads are 64 wide: the only way to infer their number


def clip_model():  # the CLIP architecture: ln_pre, bias-free patch conv, QuickGELU, eps 1e-5
    torch.manual_seed(0)
    return randomize(vit.VisionTransformer(**CLIP, pre_norm=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5,
                                           num_classes=16).eval())


def to_openai(sd):
    """Our CLIP-variant weights renamed into OpenAI's clip/model.py layout (the inverse of convert_openai_clip)."""
    out = {"visual.conv1.weight": sd["patch_embed.proj.weight"], "visual.class_embedding": sd["cls_token"].flatten(),
           "visual.positional_embedding": sd["pos_embed"][0], "visual.proj": sd["head.weight"].T,
           "visual.ln_pre.weight": sd["norm_pre.weight"], "visual.ln_pre.bias": sd["norm_pre.bias"],
           "visual.ln_post.weight": sd["norm.weight"], "visual.ln_post.bias": sd["norm.bias"],
           "transformer.resblocks.0.ln_1.weight": torch.ones(8), "token_embedding.weight": torch.zeros(5, 8)}
    names = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
             "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            for a, b in names.items():
                if rest.startswith(a):
                    out[f"visual.transformer.resblocks.{i}.{b}{rest[len(a):]}"] = v.half()
    return out


def test_openai_clip_layout_torchscript_and_fp16(tmp_path):
    ours = clip_model()
    ours.head.bias.data.zero_()  # CLIP's projection has no bias
    sd = to_openai(ours.state_dict())

    class Holder(nn.Module):  # a TorchScript archive holding tensors under OpenAI's names, as ViT-B-16.pt is
        def __init__(self):
            super().__init__()
            for k, v in sd.items():
                *path, leaf = k.split(".")
                mod = self
                for p in path:
                    if not hasattr(mod, p):
                        mod.add_module(p, nn.Module())
                    mod = getattr(mod, p)
                mod.register_parameter(leaf, nn.Parameter(v, requires_grad=False))

        def forward(self, x):
            return x

    torch.jit.script(Holder()).save(str(tmp_path / "ViT-B-16.pt"))
    loaded, arch = vit.load_checkpoint(str(tmp_path / "ViT-B-16.pt"))
    assert arch["act"] == "quick_gelu" and arch["norm_eps"] == 1e-5 and not arch["patch_bias"] and arch["pre_norm"]
    assert all(v.dtype == torch.float32 for v in loaded.values())
    clip = vit.VisionTransformer(**arch, num_classes=16).eval()
    clip.load_state_dict(loaded, strict=True)
    x = torch.randn(2, 3, 32, 32)
    # the blocks were stored in fp16, so compare against our model with the same rounding
    ours.load_state_dict({k: v.half().float() if k.startswith("blocks.") else v for k, v in ours.state_dict().items()})
    torch.testing.assert_close(clip(x), ours(x), atol=1e-5, rtol=1e-5)


def test_openai_clip_against_timm_converter():
    """timm's own OpenAI-CLIP converter and model are the reference implementation here."""
    from timm.models.vision_transformer import _convert_openai_clip
    ours = clip_model()
    ours.head.bias.data.zero_()
    openai = {k: v.float() for k, v in to_openai(ours.state_dict()).items()}
    ref = timm.create_model("vit_base_patch16_clip_quickgelu_224", num_classes=16, **CLIP).eval()
    ref.load_state_dict(_convert_openai_clip(openai, ref), strict=True)
    mine = vit.VisionTransformer(**CLIP, num_classes=16, pre_norm=True, patch_bias=False, act="quick_gelu",
                                 norm_eps=1e-5).eval()
    mine.load_state_dict(vit.convert(openai)[0], strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=1e-5)


def test_hf_clip_and_hf_vit_layouts(tmp_path):
    transformers = pytest.importorskip("transformers")
    x = torch.randn(2, 3, 32, 32)
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=4)
    hf = randomize(transformers.CLIPVisionModel(cfg).eval())
    hf.save_pretrained(tmp_path / "clip")
    sd, arch = vit.load_checkpoint(str(tmp_path / "clip"))
    assert arch["num_heads"] == 4 and arch["act"] == "quick_gelu"
    ours = vit.VisionTransformer(**arch, num_classes=0).eval()
    ours.load_state_dict(sd, strict=True)
    out = hf(pixel_values=x, output_hidden_states=True)
    final, blocks, _ = ours.forward_features(x, out_blocks=range(2))
    for mine, theirs in zip(blocks, out.hidden_states[1:]):  # hidden_states[i] = block i's output, before any norm
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final[:, 0], out.pooler_output, atol=1e-5, rtol=1e-5)

    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=4)
    hf = randomize(transformers.ViTModel(cfg).eval())
    hf.save_pretrained(tmp_path / "dino")  # files keep the hub's names (encoder.layer.i.attention.attention.query)
    sd, arch = vit.load_checkpoint(str(tmp_path / "dino"))
    assert arch["norm_eps"] == cfg.layer_norm_eps and arch["num_heads"] == 4
    ours = vit.VisionTransformer(**arch, num_classes=0).eval()
    ours.load_state_dict(sd, strict=True)
    torch.testing.assert_close(ours.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_dino_training_checkpoint_and_our_encoder(tmp_path):
    m = randomize(tiny(num_classes=0, pos_embed="sincos", global_pool="avg"))
    dino = {"teacher": {f"module.backbone.{k}": v for k, v in m.state_dict().items()}
            | {"module.head.mlp.0.weight": torch.zeros(3, 3), "module.head.last_layer.weight_g": torch.zeros(3)}}
    torch.save(dino, tmp_path / "dino.pth")
    with pytest.warns(UserWarning, match="width 64 is none of timm's ViT sizes"):  # heads cannot be read off
        sd, arch = vit.load_checkpoint(str(tmp_path / "dino.pth"))
    assert sd.keys() == m.state_dict().keys() and arch["pos_embed"] == "learn"  # a foreign file: pos_embed inferred
    torch.save({"model": m.state_dict(), "arch": m.arch}, tmp_path / "encoder.pth")
    sd, arch = vit.load_checkpoint(str(tmp_path / "encoder.pth"))
    assert arch == m.arch  # our own export is self-describing
    again = vit.VisionTransformer(**arch, num_classes=0).eval()
    again.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(x), m(x))


# ---- resolution changes ----

def test_pos_embed_resize_is_maes_bicubic():
    pos = torch.randn(1, 1 + 16, 8)
    new = vit.resize_pos_embed(pos, (6, 6))
    assert new.shape == (1, 37, 8) and torch.equal(new[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 36, 8))
    m = tiny(img_size=48)
    sd = vit.resize_state_dict(tiny().state_dict(), m)
    m.load_state_dict(sd)  # 8x8 grid checkpoint into the 12x12 model


def test_rel_pos_table_resize_matches_scipy():
    interpolate = pytest.importorskip("scipy.interpolate")
    table = torch.randn(11 * 11 + 3, 2, dtype=torch.float64)  # window/grid 6 -> 7, plus ViT's 3 cls rows
    new = vit.resize_rel_pos_table(table, 13, extra=3)
    assert new.shape == (13 * 13 + 3, 2) and torch.equal(new[-3:], table[-3:])
    # the reference: SimMIM's geometric coordinates and a FITPACK cubic interpolant per head
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** 5) / (1 - q) > 6 else (q, hi)
    dis = [sum(q ** j for j in range(i + 1)) for i in range(5)]
    x = [-d for d in reversed(dis)] + [0] + dis
    xq = [min(max(v, x[0]), x[-1]) for v in range(-6, 7)]
    for h in range(2):
        spline = interpolate.RectBivariateSpline(x, x, table[:121, h].view(11, 11).numpy(), kx=3, ky=3, s=0)
        ref = torch.from_numpy(spline(xq, xq))
        torch.testing.assert_close(new[:169, h].view(13, 13), ref, atol=1e-6, rtol=1e-6)
    same = vit.resize_rel_pos_table(table, 11, extra=3)
    assert same is table


def test_resize_state_dict_moves_rel_pos_tables_to_the_new_grid():
    small = tiny(rel_pos_bias="shared", pos_embed="none")
    big = tiny(rel_pos_bias="shared", pos_embed="none", img_size=40)  # 8x8 -> 10x10 grid
    sd = vit.resize_state_dict(small.state_dict(), big)
    assert sd["rel_pos_bias.relative_position_bias_table"].shape == (19 * 19 + 3, 4)
    big.load_state_dict(sd, strict=True)


# ---- errors ----

def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="--model vit_gigantic"):
        vit.create_model("vit_gigantic")
    with pytest.raises(ValueError, match="--img-size 30"):
        vit.create_model("vit_tiny_patch16_224", img_size=30, patch_size=4)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vit.load_checkpoint(str(tmp_path / "nope.pth"))
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="resnet.pth: not a ViT checkpoint"):
        vit.load_checkpoint(str(tmp_path / "resnet.pth"))
