"""swin.py: shapes, gradients, SDPA vs explicit attention, timm equivalence, the stage rule, the methods' entries,
the Microsoft/SimMIM/LocalMIM converter, relative-position-table resizing, errors."""
import pytest
import torch
import torch.nn as nn

import swin

timm = pytest.importorskip("timm")
TINY = dict(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4)  # 16/8/4 tokens


def tiny(**kw):
    torch.manual_seed(0)
    return swin.SwinTransformer(**{**TINY, "num_classes": 10, **kw}).eval()


def randomize(model):
    """Non-trivial values everywhere; LayerNorm weights near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def test_shapes():
    x = torch.randn(2, 3, 64, 64)
    m = tiny()
    assert m.forward_features(x).shape == (2, 4, 4, 64) and m(x).shape == (2, 10)
    assert (m.grid, m.stride, m.num_features) == ((16, 16), 16, 64)
    final, outs, logits = m.forward_features(x, out_stages=True)
    assert [o.shape for o in outs] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64)] and logits == []
    torch.testing.assert_close(final, m.norm(outs[-1]))
    headless = tiny(num_classes=0)
    assert isinstance(headless.head, nn.Identity) and headless(x).shape == (2, 64)
    two = swin.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2),
                            num_heads=(2, 4), window_size=4)
    assert two(torch.randn(1, 3, 32, 32)).shape == (1, 1000) and two.stride == 8
    assert set(two.arch) == {"img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size",
                             "mlp_ratio", "qkv_bias", "norm_eps"}


def test_every_parameter_gets_a_gradient():
    m = tiny(drop_path_rate=0.1).train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all(), name


@pytest.mark.parametrize("visible_only", [False, True])
def test_sdpa_equals_explicit_attention(visible_only):
    m = randomize(tiny())
    x, mask, token = torch.randn(2, 3, 64, 64), torch.rand(2, 16, 16) < 0.6, torch.randn(1, 1, 16)
    with torch.no_grad():  # SDPA (in CPU training the explicit path runs, see WindowAttention)
        fast = m.forward_features(x, mask, token, visible_only=visible_only)
    slow, _, logits = m.forward_features(x, mask, token, visible_only=visible_only, attn=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert [a.shape for a in logits] == [(2, 16, 2, 16, 16)] * 2 + [(2, 4, 4, 16, 16)] * 2 + [(2, 1, 8, 16, 16)] * 2
    torch.testing.assert_close(logits[1].softmax(-1).sum(-1), torch.ones(2, 16, 2, 16))
    assert (logits[1] == -float("inf")).any() == visible_only  # visible queries never see masked keys
    # gradients through SDPA equal the explicit ones (frozen tables: a mask without gradient keeps CPU on SDPA)
    grads = []
    for name, p in m.named_parameters():
        p.requires_grad_(not name.endswith("relative_position_bias_table"))
    for attn in (False, True):
        m.zero_grad()
        out = m.forward_features(x, mask, token, visible_only=visible_only, attn=attn)
        (out[0] if attn else out).square().sum().backward()
        grads.append(m.layers[0].blocks[1].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_timm_keys_and_numerics():
    ours = randomize(tiny())
    ref = timm.models.swin_transformer.SwinTransformer(**TINY, num_classes=10, drop_path_rate=0.0).eval()
    assert ref.state_dict().keys() == ours.state_dict().keys()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():  # SDPA; with gradients on CPU, the explicit path
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    randomize(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)  # and the other way
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in ours.state_dict())


@pytest.mark.parametrize("name", list(swin.SIZES))
def test_real_size_key_layout_and_windows(name):
    """Keys, shapes, and every block's window and shift against timm at the same geometry (on the meta device, so
    nothing is allocated). timm has no 192-px names: its 224-px model of the same size, rebuilt at 192 px."""
    dim, depths, heads, window, img = swin.SIZES[name]
    size = name.split("_")[1]
    with torch.device("meta"):
        ours = swin.create_model(name)
        ref = timm.create_model(f"swin_{size}_patch4_window7_224", img_size=img, window_size=window)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    for a, b in zip(ours.layers, ref.layers):
        assert [(blk.window_size, blk.shift_size) for blk in a.blocks] == \
               [(blk.window_size[0], blk.shift_size[0]) for blk in b.blocks]


def test_stage_rule_of_simmim_layouts():
    """A stage no larger than the window takes one window of its size and no shift (simmim.md section 1.3)."""
    def layout(m):
        return [(s.blocks[1].window_size, s.blocks[1].shift_size) for s in m.layers]
    with torch.device("meta"):
        base = swin.create_model("swin_base_patch4_window6_192")  # 48/24/12/6
        large = swin.create_model("swin_large_patch4_window12_192")
        large224 = swin.create_model("swin_large_patch4_window7_224", window_size=14)  # SimMIM's fine-tune, 56/28/14/7
    assert layout(base) == [(6, 3), (6, 3), (6, 3), (6, 0)]
    assert layout(large) == [(12, 6), (12, 6), (12, 0), (6, 0)]
    assert layout(large224) == [(14, 7), (14, 7), (14, 0), (7, 0)]
    rows = [s.blocks[0].attn.relative_position_bias_table.shape[0] for s in large.layers]
    assert rows == [529, 529, 529, 121] and large.layers[3].blocks[1].attn_mask is None
    assert base.layers[0].blocks[1].attn_mask.shape == (1, 64, 36, 36)  # the official (64, 36, 36) mask


def test_mask_token_entry():
    m = tiny()
    x, token = torch.randn(2, 3, 64, 64), torch.randn(1, 1, 16)
    mask = torch.rand(2, 16, 16) < 0.5
    tokens = m.embed(x, mask=mask, mask_token=token)
    torch.testing.assert_close(tokens[mask], token[0].expand(int(mask.sum()), -1))
    torch.testing.assert_close(tokens[~mask], m.patch_embed(x)[~mask])


def test_visible_only_hides_masked_tokens_at_every_stage():
    """Change the pixels under the mask: in visible-only mode no visible token of any stage moves (and in the dense
    mode they do, so the test can fail). A random token mask, so the property holds for any mask, with a fully
    masked and a fully visible window to check that no row of the softmax is empty."""
    m = randomize(tiny())
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, 16) < 0.6
    mask[:, :4, :4], mask[:, 4:8, :4] = True, False
    pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]  # (B, 1, 64, 64)
    y = torch.where(pixels, torch.randn_like(x) * 3, x)
    for kw in (dict(mask=mask, visible_only=True), dict()):
        _, a, _ = m.forward_features(x, out_stages=True, **kw)
        _, b, _ = m.forward_features(y, out_stages=True, **kw)
        visible = ~mask
        for s, (oa, ob) in enumerate(zip(a, b)):
            visible = swin.merge_visible(visible) if s else visible
            assert visible.any() and oa.isfinite().all()
            assert torch.allclose(oa[visible], ob[visible], atol=1e-6) == bool(kw), (kw.keys(), s)


def test_stages_can_be_driven_by_hand():
    """LocalMIM takes the tokens right after PatchMerging: stage.downsample, merge_visible and the blocks work alone."""
    m = randomize(tiny())
    x, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16, 16) < 0.5
    _, outs, _ = m.forward_features(x, mask, visible_only=True, out_stages=True)
    h, v = m.embed(x), ~mask
    for s, stage in enumerate(m.layers):
        h, v = stage.downsample(h), swin.merge_visible(v) if s else v
        for blk in stage.blocks:
            h = blk(h, v)
        torch.testing.assert_close(h, outs[s])
    assert swin.merge_visible(torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1]]]).bool()).tolist() == [[[True, False]]]


def test_drop_path_only_in_training():
    m = randomize(tiny(drop_path_rate=0.5))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))


# ---- the official layouts: random weights -> official keys -> converter -> same outputs ----

def to_microsoft(sd, model):
    """Our (timm) dict in the Microsoft/SimMIM pretraining layout: downsample at the end of the previous stage,
    `head.*`, persistent index and mask buffers, `encoder.` prefix, `mask_token` and `decoder.0.*`."""
    out = {}
    for k, v in sd.items():
        if k.startswith("layers.") and ".downsample." in k:
            s, rest = k.split(".", 2)[1], k.split(".downsample.")[1]
            k = f"layers.{int(s) - 1}.downsample.{rest}"
        out[k.replace("head.fc.", "head.")] = v
    for s, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            out[f"layers.{s}.blocks.{j}.attn.relative_position_index"] = blk.attn.relative_position_index
            if blk.attn_mask is not None:
                out[f"layers.{s}.blocks.{j}.attn_mask"] = blk.attn_mask[0]
    out = {f"encoder.{k}": v for k, v in out.items()}
    return out | {"encoder.mask_token": torch.zeros(1, 1, 16), "decoder.0.weight": torch.zeros(3072, 64, 1, 1),
                  "decoder.0.bias": torch.zeros(3072)}


def test_microsoft_simmim_layout(tmp_path):
    m = randomize(tiny())
    official = to_microsoft(m.state_dict(), m)
    assert "encoder.layers.0.downsample.reduction.weight" in official and "encoder.head.weight" in official
    torch.save({"model": official, "epoch": 99}, tmp_path / "simmim_pretrain.pth")
    sd, arch = swin.load_checkpoint(str(tmp_path / "simmim_pretrain.pth"))
    assert arch == m.arch  # 16/8/4 tokens with window 4: img_size = stride 16 x last window 4
    again = swin.SwinTransformer(**arch, num_classes=10).eval()
    again.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again(x), m(x), atol=0, rtol=0)
    headless = {k: v for k, v in m.state_dict().items() if not k.startswith("head.")}
    assert swin.convert_microsoft(headless).keys() == headless.keys()  # our layout passes unchanged


def test_localmim_layout_and_our_encoder(tmp_path):
    m = randomize(tiny(num_classes=0))
    official = {k: v for k, v in to_microsoft(m.state_dict(), m).items() if not k.startswith("encoder.norm.")}
    for i, c in enumerate((32, 64, 64, 64)):  # LocalMIM's side norms replace the final norm
        official[f"encoder.norm.{i}.weight"], official[f"encoder.norm.{i}.bias"] = torch.ones(c), torch.zeros(c)
    official["hog_enc.0.conv.weight"] = torch.zeros(2, 1, 3, 3)
    torch.save({"model": official}, tmp_path / "swin_base_localmim_hog_400ep_pretrain.pth")
    sd, arch = swin.load_checkpoint(str(tmp_path / "swin_base_localmim_hog_400ep_pretrain.pth"))
    assert arch["norm_eps"] == 1e-6  # LocalMIM's LayerNorm
    missing, unexpected = swin.SwinTransformer(**arch, num_classes=0).load_state_dict(sd, strict=False)
    assert missing == ["norm.weight", "norm.bias"] and unexpected == []
    torch.save({"model": m.state_dict(), "arch": {**m.arch, "img_size": 128}}, tmp_path / "encoder.pth")
    assert swin.load_checkpoint(str(tmp_path / "encoder.pth"))[1]["img_size"] == 128  # our stored arch wins


# ---- SimMIM fine-tuning: window 6 -> 7 ----

def test_rel_pos_table_resize_6_to_7_matches_scipy():
    interpolate = pytest.importorskip("scipy.interpolate")
    kw = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=0)
    pre = randomize(swin.SwinTransformer(img_size=48, window_size=6, **kw))  # 12/6 tokens, as 192 px with w6
    fine = swin.SwinTransformer(img_size=56, window_size=7, **kw)  # 14/7 tokens, as 224 px with w7
    sd = swin.resize_state_dict(pre.state_dict(), fine)
    fine.load_state_dict(sd, strict=True)
    key = "layers.1.blocks.1.attn.relative_position_bias_table"
    table, new = pre.state_dict()[key].double(), sd[key].double()
    assert table.shape == (121, 4) and new.shape == (169, 4)
    # the reference: SimMIM's geometric coordinates and a FITPACK cubic interpolant per head
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** 5) / (1 - q) > 6 else (q, hi)
    dis = [sum(q ** j for j in range(i + 1)) for i in range(5)]
    x = [-d for d in reversed(dis)] + [0] + dis
    xq = [min(max(v, x[0]), x[-1]) for v in range(-6, 7)]
    for h in range(4):
        spline = interpolate.RectBivariateSpline(x, x, table[:, h].view(11, 11).numpy(), kx=3, ky=3, s=0)
        torch.testing.assert_close(new[:, h].view(13, 13), torch.from_numpy(spline(xq, xq)), atol=1e-5, rtol=1e-5)
    assert torch.equal(sd["layers.1.blocks.0.mlp.fc1.weight"], pre.state_dict()["layers.1.blocks.0.mlp.fc1.weight"])


# ---- errors ----

def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="--model swin_huge"):
        swin.create_model("swin_huge")
    with pytest.raises(ValueError, match="--img-size 200.*e.g. 224"):
        swin.create_model("swin_tiny_patch4_window7_224", img_size=200)
    with pytest.raises(ValueError, match="num_heads"):
        swin.create_model("swin_tiny_patch4_window7_224", depths=(2, 2))
    with pytest.raises(ValueError, match="--img-size 64"):
        tiny()(torch.randn(1, 3, 32, 32))
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="resnet.pth: not a Swin checkpoint"):
        swin.load_checkpoint(str(tmp_path / "resnet.pth"))


# ---- LocalMIM's Swin release: PatchMerging children row-first (GreenMIM's first release) ----

def test_localmim_release_merges_are_reordered_for_pretraining(tmp_path):
    m = randomize(tiny(num_classes=0))
    x = torch.randn(2, 16, 16, 16)  # a stage-0 output
    merge = m.layers[1].downsample
    # the released model: children of each 2x2 cell concatenated row-first, (0,0) (0,1) (1,0) (1,1)
    rows = x.view(2, 8, 2, 8, 2, 16).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, 64)
    released = swin.reorder_merges(m.state_dict())  # the same function, in its weights
    norm = torch.nn.functional.layer_norm(rows, (64,), released["layers.1.downsample.norm.weight"],
                                          released["layers.1.downsample.norm.bias"], 1e-5)
    torch.testing.assert_close(norm @ released["layers.1.downsample.reduction.weight"].T, merge(x))
    assert not torch.equal(released["layers.1.downsample.reduction.weight"], merge.reduction.weight)
    official = {k: v for k, v in to_microsoft(released, m).items() if not k.startswith("encoder.norm.")}
    for i, c in enumerate((32, 64, 64, 64)):  # the side norms that tell a LocalMIM release
        official[f"encoder.norm.{i}.weight"], official[f"encoder.norm.{i}.bias"] = torch.ones(c), torch.zeros(c)
    torch.save({"model": official}, tmp_path / "localmim_swin.pth")
    sd, _ = swin.load_checkpoint(str(tmp_path / "localmim_swin.pth"), pretraining=True)
    assert torch.equal(sd["layers.1.downsample.reduction.weight"], merge.reduction.weight)  # back in Swin's order
    sd, _ = swin.load_checkpoint(str(tmp_path / "localmim_swin.pth"))  # fine-tuning: as stored, as officially
    assert torch.equal(sd["layers.1.downsample.reduction.weight"], released["layers.1.downsample.reduction.weight"])


# ---- LocalMIM's visible-token path: the same outputs as the dense one, on a quarter of the tokens ----

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_visible_tokens_alone_equal_the_dense_visible_only_path(seed):
    """96 px, window 6: windows of 6 x 6 tokens straddle the 8 x 8-token mask units, and the shifted windows cut
    them again; every stage of the gathered path equals the dense one at the visible tokens."""
    torch.manual_seed(seed)
    m = randomize(swin.SwinTransformer(img_size=96, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                       window_size=6, num_classes=0).eval())
    units = torch.randperm(9) >= 7  # 2 of 3 x 3 units of 32 px visible, one mask for the batch (LocalMIM's)
    visible = units.view(3, 3).repeat_interleave(8, 0).repeat_interleave(8, 1)  # (24, 24) tokens
    img = torch.randn(2, 3, 96, 96)
    dense, vis = m.embed(img), visible.expand(2, -1, -1)
    coords = visible.nonzero()
    x = m.embed(img)[:, coords[:, 0], coords[:, 1]]  # (2, 128, 16)
    for s, stage in enumerate(m.layers):
        res = 24 >> s
        if s > 0:
            dense, vis = stage.downsample(dense), swin.merge_visible(vis)
            coords, children = swin.merge_children(coords, 2 * res)
            x = stage.downsample.forward_visible(x, children)
        for blk in stage.blocks:
            dense = blk(dense, vis)
        x = stage.forward_visible(x, coords, res)
        assert torch.equal(vis[0].nonzero(), coords)  # the same tokens, in raster order
        torch.testing.assert_close(x, dense[:, coords[:, 0], coords[:, 1]], atol=1e-5, rtol=1e-5)


def test_window_groups_by_hand():
    coords = torch.tensor([[0, 0], [0, 1], [1, 3], [3, 3]])  # a 4 x 4 stage, windows of 2
    index, pad, rel, back = swin.window_groups(coords, 4, 2, 0)
    groups = [sorted(index[g][~pad[g]].tolist()) for g in range(len(index))]
    assert groups == [[0, 1], [2], [3]] and index.shape == (3, 2)
    assert index.flatten()[back].tolist() == [0, 1, 2, 3] and not pad.flatten()[back].any()  # each token's slot
    assert rel[0, 0, 1] == (0 + 1) * 3 + (0 - 1 + 1)  # token 0 -> token 1: offset (0, -1) in a 3 x 3 table
    index, pad, rel, _ = swin.window_groups(coords, 4, 2, 1)  # shifted by 1: (0,0) and (3,3) share a window but not a
    assert pad.shape == (4, 1) and not pad.any()  # region (they are no neighbours), (0,0) and (0,1) no window
