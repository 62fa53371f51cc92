"""analyze.py: the sanity values of every metric (hand-built attention, CKA on random data, AvgDist against brute
force), a random-init ViT, Swin windows, averaging over images, and the command line end to end."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import analyze
import data
import swin
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def geometry(g, p):
    """The distance matrix of a g x g grid of p-pixel patches, from a one-block ViT."""
    return analyze.layer_geometry(vit.VisionTransformer(img_size=g * p, patch_size=p, embed_dim=8, depth=1,
                                                        num_heads=1))[0]


def box(g, k):
    """(N, N) bool: query i may see key j iff j is in the k x k neighbourhood of i (clipped at the border)."""
    r = torch.arange(g * g)
    return ((r[:, None] // g - r[None] // g).abs() <= k // 2) & ((r[:, None] % g - r[None] % g).abs() <= k // 2)


def logits_of(allowed):  # uniform over the allowed keys: 0 there, -1e4 elsewhere (exp(-1e4) = 0 in float64)
    return torch.where(allowed, 0.0, -1e4)


def tiny_vit(**kw):
    torch.manual_seed(0)
    return vit.VisionTransformer(**{**dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                           num_classes=0), **kw})


def tiny_swin():
    torch.manual_seed(0)
    return swin.SwinTransformer(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4,
                                num_classes=0)


def loader(n, batch_size):
    ds = data.build_dataset("synthetic", "val", data.eval_transform(32), img_size=32, num_images=n)
    return data.build_loader(ds, batch_size, train=False, workers=0, drop_last=False)


# ---- attention distance, entropy, NMI, KL on hand-built attention (analysis.md sections 1-3, 6) ----

@pytest.mark.parametrize("g,p,want", [(8, 4, 16.5), (14, 16, 116.5), (8, 8, 33.1), (16, 2, 16.7)])
def test_uniform_attention(g, p, want):
    geo = geometry(g, p)
    st = analyze.attention_stats(torch.zeros(2, 1, 3, g * g, g * g), geo["dist"])
    brute = sum(p * math.dist(a, b) for a in itertools.product(range(g), repeat=2)
                for b in itertools.product(range(g), repeat=2)) / g ** 4
    assert st["distance"].mean().item() == pytest.approx(brute, rel=1e-6) == pytest.approx(want, abs=0.05)
    assert geo["uniform_distance_px"] == pytest.approx(brute, rel=1e-6)
    torch.testing.assert_close(st["entropy"], torch.full_like(st["entropy"], math.log(g * g)))
    assert st["nmi"].abs().max() < 1e-9 and st["kl"].abs().max() < 1e-9


@pytest.mark.parametrize("k,want", [(3, 17.2), (5, 30.0), (7, 42.4)])
def test_local_box_head(k, want):
    g = 14  # ViT-B/16 at 224: the sanity values are for a query whose whole k x k box is inside the grid
    geo = geometry(g, 16)
    allowed = box(g, k)
    logits = torch.stack([logits_of(allowed), torch.zeros(g * g, g * g)])[None, None]  # heads: box, uniform
    st = analyze.attention_stats(logits, geo["dist"])
    r = torch.arange(g * g)
    inner = ((r // g >= k // 2) & (r // g < g - k // 2) & (r % g >= k // 2) & (r % g < g - k // 2))
    assert st["distance"][0, 0, 0, inner].mean().item() == pytest.approx(want, abs=0.05)
    torch.testing.assert_close(st["entropy"][0, 0, 0, inner], torch.full((int(inner.sum()),), math.log(k * k),
                                                                        dtype=torch.float64))
    # KL(box || uniform) = ln N - H(box) for every query; the reverse is infinite in theory, huge here
    h_box = allowed.sum(1).double().log().mean()
    assert st["kl"][0, 0, 0, 1].item() == pytest.approx(math.log(g * g) - h_box.item(), rel=1e-9)
    assert st["kl"][0, 0, 1, 0] > 1000 and st["kl"][0, 0, 0, 0] == 0


def test_identity_and_collapsed_attention():
    g = 8
    geo = geometry(g, 4)
    eye = analyze.attention_stats(logits_of(torch.eye(g * g, dtype=torch.bool))[None, None, None], geo["dist"])
    assert eye["distance"].abs().max() == 0 and eye["entropy"].abs().max() < 1e-9
    assert eye["nmi"].item() == pytest.approx(1.0, abs=1e-9)
    row = torch.randn(g * g) * 3  # every query with the same peaked distribution: attention collapse
    same = analyze.attention_stats(row.expand(g * g, -1)[None, None, None], geo["dist"])
    assert abs(same["nmi"].item()) < 1e-9
    one = torch.zeros(g * g, dtype=torch.bool)
    one[5] = True  # all on one key: H(k) = 0, MI = 0 -> NMI 0, not 0/0
    assert analyze.attention_stats(logits_of(one.expand(g * g, -1))[None, None, None], geo["dist"])["nmi"] == 0


def test_kl_between_heads():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 1, 16, 16).repeat(1, 1, 3, 1, 1) * 2  # three identical heads
    assert analyze.attention_stats(logits, torch.zeros(1, 16, 16))["kl"].abs().max() < 1e-12
    logits = torch.randn(2, 1, 4, 16, 16) * 2
    logp = logits.double().log_softmax(-1)
    direct = (logp.exp()[:, :, :, None] * (logp[:, :, :, None] - logp[:, :, None])).sum(-1).mean(-1)  # per query
    torch.testing.assert_close(analyze.attention_stats(logits, torch.zeros(1, 16, 16))["kl"], direct)


# ---- CKA (analysis.md section 4) ----

def test_minibatch_cka():
    torch.manual_seed(0)
    x, noise = torch.randn(1024, 64), torch.randn(1024, 64)
    q = torch.linalg.qr(torch.randn(64, 64))[0]
    feats = [x, 3 * x @ q + 1, noise, x[:, :32]]
    hsic = sum(analyze.hsic_batch([f[i:i + 128] for f in feats]) for i in range(0, 1024, 128))
    c = analyze.cka(hsic)
    torch.testing.assert_close(c.diagonal(), torch.ones(4, dtype=torch.float64))
    assert c[0, 1].item() == pytest.approx(1.0, abs=1e-9)  # invariant to orthogonal maps, scale and shift
    assert abs(c[0, 2].item()) < 0.05 and 0.3 < c[0, 3].item() < 0.8
    # one batch against the formula written out (Nguyen et al. 2020 Eq. 3)
    a, b = (f[:64].double() for f in feats[:2])
    K, L = a @ a.T, b @ b.T
    K.fill_diagonal_(0), L.fill_diagonal_(0)
    n, one = 64, torch.ones(64, dtype=torch.float64)
    want = (torch.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))
    assert analyze.hsic_batch([f[:64] for f in feats])[0, 1].item() == pytest.approx(want.item(), rel=1e-9)


# ---- AvgDist (SimMIM; analysis.md section 5) ----

@pytest.mark.parametrize("img,m,ratio", [(16, 4, 0.5), (12, 2, 0.75), (16, 8, 0.3), (24, 4, 0.9)])
def test_avgdist_equals_brute_force(img, m, ratio):
    masks = analyze.simmim_masks(6, img, m, ratio, torch.Generator().manual_seed(3))
    assert (masks.flatten(1).sum(1) == math.ceil((img // m) ** 2 * ratio)).all()  # SimMIM's ceil
    yx = torch.stack(torch.meshgrid(torch.arange(img), torch.arange(img), indexing="ij"), -1).view(-1, 2).double()
    brute = []
    for mask in masks:
        pix = mask.repeat_interleave(m, 0).repeat_interleave(m, 1).flatten()
        brute.append(torch.cdist(yx[pix], yx[~pix]).min(1).values.mean().item())  # to the nearest visible centre
    assert analyze.avg_dist(img, m, ratio, n=6, seed=3) == pytest.approx(sum(brute) / 6, rel=1e-6)


def test_avgdist_equals_simmim_py():
    import simmim  # method files do not import each other: each has its copy, this test holds them together
    for setting in ((32, 4, 0.75), (64, 16, 0.3), (96, 32, 0.6)):
        assert analyze.avg_dist(*setting, n=40, seed=1) == pytest.approx(simmim.avg_dist(*setting, n=40, seed=1),
                                                                          rel=1e-5)


def test_avgdist_reference_values():
    assert analyze.avg_dist(32, 4, 0.75) == pytest.approx(3.1, abs=0.1)  # analysis.md, 500 masks
    assert analyze.avg_dist(224, 32, 0.6, n=200) == pytest.approx(15.0, abs=0.4)  # SimMIM's ViT-B default
    assert analyze.avg_dist(192, 32, 0.6, n=200) == pytest.approx(15.4, abs=0.4)
    assert analyze.avg_dist(32, 32, 0.6) is None  # one cell, masked: undefined


# ---- models ----

def test_random_init_vit_is_uniform():
    model = tiny_vit()
    geo, sums, images, hsic, batches = analyze.measure(model, loader(16, 8), torch.device("cpu"))
    assert (images, batches) == (16, 2)
    for g, s in zip(geo, sums):
        assert (s["distance"] / images - g["uniform_distance_px"]).abs().max() < 0.3  # 16.5 px
        assert (s["entropy"] / images - math.log(64)).abs().max() < 0.01
        assert (s["kl"] / images).abs().max() < 1e-3 and (s["nmi"] / images).abs().max() < 0.01
    torch.testing.assert_close(analyze.cka(hsic).diagonal(), torch.ones(3, dtype=torch.float64))


def test_sums_over_images_not_means_of_batch_means():
    model = tiny_vit(global_pool="avg", class_token=False)
    with torch.no_grad():  # attention far from uniform, different for every image
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    a = analyze.measure(model, loader(13, 8), torch.device("cpu"))  # batches of 8 + 5
    b = analyze.measure(model, loader(13, 4), torch.device("cpu"))  # 4 + 4 + 4 + 1
    for sa, sb in zip(a[1], b[1]):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k])
    assert (a[4], b[4]) == (1, 3) and (a[1][0]["entropy"] / 13).max() < math.log(64) - 0.5  # far from uniform


def test_swin_windows():
    model = tiny_swin()
    norms = analyze.representation_norms(model)  # the LayerNorm that reads the stream after each block
    assert norms == [model.layers[0].blocks[1].norm1, model.layers[1].downsample.norm, model.layers[1].blocks[1].norm1,
                     model.norm]
    geo = analyze.layer_geometry(model)
    blk = model.layers[0].blocks[1]  # 8x8 tokens, window 4, shift 2, stride 4
    assert (geo[1]["window"], geo[1]["shift"], geo[1]["stride_px"]) == (4, 2, 4)
    d, mask = geo[1]["dist"], blk.attn_mask[0]
    # absolute positions, the roll undone: pairs the shift mask keeps are inside one window, the others are not
    assert d[mask == 0].max() <= geo[1]["max_distance_px"] + 1e-4 < d[mask != 0].max()
    assert geo[1]["uniform_distance_px"] < geo[0]["uniform_distance_px"] and geo[1]["uniform_nmi"] > 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    geo, sums, images, hsic, batches = analyze.measure(model, loader(8, 8), torch.device("cpu"))
    for g, s in zip(geo, sums):
        assert (s["distance"] / images <= g["max_distance_px"] + 1e-4).all()
        assert (s["entropy"] / images <= math.log(g["tokens"]) + 1e-6).all()
    torch.testing.assert_close(analyze.cka(hsic).diagonal(), torch.ones(4, dtype=torch.float64))


# ---- the command line ----

def test_command_line_end_to_end(tmp_path):
    enc, cls = tiny_vit(), tiny_vit(num_classes=10, global_pool="avg")
    torch.save({"model": enc.state_dict(), "arch": enc.arch}, tmp_path / "encoder.pth")
    torch.save({"model": cls.state_dict(), "arch": {**cls.arch, "num_classes": 10}, "epoch": 1}, tmp_path / "cls.pth")
    sw = tiny_swin()
    torch.save({"model": sw.state_dict(), "arch": sw.arch}, tmp_path / "swin.pth")
    out = tmp_path / "out"
    cmd = [sys.executable, "analyze.py", str(tmp_path / "encoder.pth"), str(tmp_path / "cls.pth"),
           str(tmp_path / "swin.pth"), f"init:{tmp_path / 'encoder.pth'}", "--names", "mim", "sup", "swin", "init",
           "--data", "synthetic", "--num-images", "12", "--batch-size", "8", "--workers", "0", "--device", "cpu",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.load(open(out / "metrics.json"))
    assert [c["name"] for c in m["checkpoints"]] == ["mim", "sup", "swin", "init"] and m["img_size"] == 32
    assert set(m["definitions"]) >= {"distance_px", "entropy", "head_kl", "nmi", "cka", "swin"}
    for c in m["checkpoints"]:
        assert (c["num_images"], c["cka_images"]) == (12, 8)
        assert [row[i] for i, row in enumerate(c["cka"])] == [1.0] * len(c["layers"])
        for layer in c["layers"]:
            assert len(layer["distance_px"]) == len(layer["nmi"]) == layer["heads"] == 2
            assert max(layer["distance_px"]) <= layer["max_distance_px"]
    sw = m["checkpoints"][2]
    assert [(x["stage"], x["window"], x["shift"], x["stride_px"]) for x in sw["layers"]] == \
        [(0, 4, 0, 4), (0, 4, 2, 4), (1, 4, 0, 8), (1, 4, 0, 8)]
    assert m["checkpoints"][0]["layers"] == m["checkpoints"][3]["layers"]  # same seed, same init
    for f in ("attention_distance.png", "entropy.png", "head_kl.png", "nmi.png", "cka.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"


def test_default_names(tmp_path):
    hf = tmp_path / "dino-vitb16"
    hf.mkdir()
    args = analyze.get_args(["runs/pre/encoder.pth", "init:runs/pre/encoder.pth", "runs/ft/classifier.pth", str(hf)])
    assert args.names == ["pre", "pre/init", "ft", "dino-vitb16"] and args.img_size is None


def test_command_line_errors(tmp_path, capsys):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "junk.pth")
    for argv, msg in [([str(tmp_path / "missing.pth")], "no such checkpoint"),
                      ([str(tmp_path / "junk.pth")], "nor a Swin checkpoint"),
                      ([f"init:{tmp_path / 'junk.pth'}"], "nor a Swin checkpoint")]:
        with pytest.raises(SystemExit, match=msg):
            analyze.main(argv + ["--out", str(tmp_path)])
    enc = tiny_vit()
    torch.save({"model": {**enc.state_dict(), "extra.weight": torch.zeros(1)}, "arch": enc.arch}, tmp_path / "e.pth")
    with pytest.raises(SystemExit, match="unexpected"):
        analyze.main([str(tmp_path / "e.pth"), "--out", str(tmp_path)])
    torch.save({"model": enc.state_dict(), "arch": enc.arch}, tmp_path / "e.pth")
    with pytest.raises(SystemExit, match="CKA needs one full batch"):
        analyze.main([str(tmp_path / "e.pth"), "--num-images", "6", "--batch-size", "8", "--out", str(tmp_path)])
    for argv in ([], ["a.pth", "b.pth", "--names", "x"], ["a.pth", "--batch-size", "3"],
                 ["--avgdist", "--mask-ratio", "1.2"], ["--avgdist", "--img-size", "32", "--mask-patch-size", "6"]):
        with pytest.raises(SystemExit) as e:
            analyze.main(argv)
        assert e.value.code == 2
    assert "--names" in capsys.readouterr().err


def test_avgdist_mode(tmp_path, capsys):
    analyze.main(["--avgdist", "--img-size", "32", "--mask-patch-size", "4", "--mask-ratio", "0.75", "--masks", "50",
                  "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "AvgDist at 32 px, mask patch 4, ratio 0.75: 3." in text and "| 64 | n/a |" in text
    t = json.load(open(tmp_path / "avgdist.json"))
    assert t["setting"]["avgdist"] == pytest.approx(3.1, abs=0.2)
    assert t["table"]["4"]["0.7"] < t["setting"]["avgdist"] < t["table"]["4"]["0.8"]
    assert t["table"]["32"]["0.9"] is None and t["table"]["64"]["0.1"] is None  # all masked; 64 does not divide 32
    assert (tmp_path / "avgdist.md").read_text().count("\n") == 9 and "| 32 | all | all |" in text
