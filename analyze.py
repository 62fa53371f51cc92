"""Attention and representation analysis of trained ViTs and Swins: Dark Secrets of MIM, arXiv 2205.13543.

The figures of "Revealing the Dark Secrets of Masked Image Modeling" (Xie et al., CVPR 2023) for any checkpoint this
repository or timm reads.

    python analyze.py runs/simmim/encoder.pth runs/sup/classifier.pth --names SimMIM supervised \\
        --data path/to/imagenet --num-images 1000 --batch-size 64 --img-size 224 --out runs/analysis
    python analyze.py --avgdist --img-size 192 --mask-patch-size 32 --mask-ratio 0.6 --out runs/analysis

Per layer and head, over the same images in the same order for every checkpoint: the averaged attention distance in
input pixels, the attention entropy, the KL divergence between the heads of a layer (Dark Secrets' head diversity),
the query-key NMI of Park et al. ("What Do Self-Supervised Vision Transformers Learn?", ICLR 2023, arXiv 2305.00729),
and linear CKA between every pair of layers (Kornblith et al. 2019; the minibatch estimator of Nguyen, Raghu and
Kornblith, arXiv 2010.15327). Out: OUT/metrics.json (every number and its definition), attention_distance.png,
entropy.png, head_kl.png, nmi.png, cka.png — checkpoints side by side. `--avgdist` prints SimMIM's AvgDist
(arXiv 2111.09886, Fig. 3) for one masking setting and its table over ratios x mask patch sizes.

The Dark Secrets code was never released; each definition follows a public implementation, named in DEFINITIONS
below (also written into metrics.json): naver-ai/cl-vs-mim self_attention_analysis.ipynb (distance, NMI),
wangsr126/mae-lite attn_analyzer.py (entropy) and rep_cmp_analyzer.py + forward_hook.py's RepCatcher (CKA),
microsoft/SimMIM data/data_simmim.py (the mask generator). Where none pins a choice down: patch-only attention with
renormalised rows (sayakpaul/probing-vits drops CLS without renormalising, which biases distances low); pixels =
patch size x grid distance (mae-lite multiplies by 14 for /16 models); Swin per window with the shift undone.
"""
import argparse
import json
import math
import os
import sys

import torch
from tqdm import tqdm

import data
import swin
import vit

# Definitions: what every number in metrics.json is (written into it), with the implementation followed

DEFINITIONS = {
    "attention": "P = patch-to-patch attention of a head: CLS row and column dropped, rows renormalised (log_softmax "
                 "of the sliced logits, as cl-vs-mim and mae-lite); model in fp32, metrics in float64",
    "distance_px": "sum_j P_ij * patch size * grid distance(i, j), averaged over queries, then images: pixels of the "
                   "network input (ViT App. D.7, probing-vits, cl-vs-mim); distance_frac = distance_px / img_size",
    "entropy": "-sum_j P_ij ln P_ij in nats, averaged over queries, then images (mae-lite attn_analyzer.py)",
    "head_kl": "Dark Secrets' head diversity: KL(P^h_i || P^g_i) per query, averaged over queries and images "
               "(head_kl_pairs[h][g]); head h's dot is the mean over the other heads g",
    "nmi": "Park et al. (cl-vs-mim): query uniform, p(k|q=i) = P_i, MI / sqrt(H(q) H(k)) per image, mean over images",
    "cka": "linear CKA, minibatch unbiased HSIC (Nguyen et al. 2020 Eq. 3) over full batches of batch_size, numerators "
           "and denominators averaged separately (mae-lite rep_cmp_analyzer.py); layer i = mae-lite RepCatcher's: the "
           "residual stream after block i through the LayerNorm that reads it next (block i+1's norm1; the final norm, "
           "or fc_norm under average pooling, after the last; Swin at a stage end: the next PatchMerging norm), CLS "
           "dropped, flattened over tokens x channels",
    "swin": "per window (tokens = window^2), then the mean over windows; distances between the tokens' absolute "
            "positions (shift undone) x the stage stride; pairs the shift mask separates carry ~e^-100 of the weight",
    "uniform": "uniform_* = the metric for uniform attention over the keys a query may see (the figures' dashed line)",
    "averaging": "sums over images and image counts, not means of batch means",
}

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # SimMIM Fig. 3's sweep
MASK_PATCHES = (4, 8, 16, 32, 64)


EXAMPLES = """examples:
  python analyze.py --avgdist                                        # SimMIM's AvgDist table at 192 px, ~1 min
  python analyze.py runs/simmim/encoder.pth init:runs/simmim/encoder.pth --names SimMIM random --data cifar10
  python analyze.py runs/mae/encoder.pth runs/ft/classifier.pth --data /imagenet --num-images 1000
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every default shown, and the examples kept as written."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("ckpts", nargs="*", help="encoder.pth / ckpt.pt / classifier.pth, any file or HF folder vit.py or "
                   "swin.py reads; init:PATH = PATH's architecture with freshly initialised weights")
    p.add_argument("--names", nargs="+", default=None, help="one per checkpoint (default: the checkpoint's folder)")
    p.add_argument("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | stl10 | ImageFolder | .npz")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (downloaded)")
    p.add_argument("--split", default="val", help="'train' or a held-out split")
    p.add_argument("--num-images", type=int, default=1000, help="a fixed random subset of the split (ViT paper: 128, "
                   "probing-vits: 1000, mae-lite: 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="also the CKA minibatch (unbiased HSIC needs n > 3)")
    p.add_argument("--img-size", type=int, default=None, help="default: the first checkpoint's; with --avgdist 192")
    p.add_argument("--out", default="runs/analysis", help="metrics.json and the figures (avgdist.json/.md)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run the models")
    p.add_argument("--workers", type=int, default=8, help="data loader processes")
    p.add_argument("--unsafe-load", action="store_true", help="let the checkpoints run the code they pickle (only "
                   "for files you trust; public checkpoints do not need it)")
    p.add_argument("--seed", type=int, default=0, help="the image subset and init: weights")
    p.add_argument("--avgdist", action="store_true", help="print SimMIM's AvgDist for --mask-ratio/--mask-patch-size "
                   "at --img-size and the table over ratios x mask patch sizes; no checkpoints")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="SimMIM's default")
    p.add_argument("--mask-patch-size", "--patch", type=int, default=32, help="SimMIM's default")
    p.add_argument("--masks", type=int, default=500, help="masks per AvgDist value")
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size", "img_size", "mask_patch_size", "masks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: must not be negative")
    if os.path.isfile(args.out) or (os.path.exists(args.out) and not os.access(args.out, os.W_OK)):
        p.error(f"--out {args.out}: not a writable folder")
    if args.avgdist:
        args.img_size = args.img_size or 192  # SimMIM's masking ablations: Swin-B at 192 px
        if not 0 < args.mask_ratio < 1:
            p.error(f"--mask-ratio {args.mask_ratio}: must be in (0, 1)")
        if args.img_size % args.mask_patch_size:
            p.error(f"--img-size {args.img_size} is not divisible by --mask-patch-size {args.mask_patch_size}")
        return args
    if not args.ckpts:
        p.error("give one or more checkpoints, or --avgdist")
    def default_name(c):  # the run folder of a file (runs/pre/encoder.pth -> pre), a HF folder's own name
        path = os.path.abspath(c.removeprefix("init:"))
        name = os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))
        return name + "/init" if c.startswith("init:") else name

    args.names = args.names or [default_name(c) for c in args.ckpts]
    if len(args.names) != len(args.ckpts) or len(set(args.names)) != len(args.names):
        p.error(f"--names: give {len(args.ckpts)} distinct names, one per checkpoint (got {args.names})")
    if args.batch_size < 4:
        p.error(f"--batch-size {args.batch_size}: the unbiased HSIC of a CKA minibatch needs at least 4 images")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Per-head attention metrics (Dark Secrets: Fig. 1 and the head-diversity figure; Park et al.: the NMI)

def grid_distance(coords):
    """coords (..., N, 2) token positions -> (..., N, N) Euclidean distances (exact, unlike cdist's matmul form)."""
    return (coords[..., :, None, :] - coords[..., None, :, :]).float().pow(2).sum(-1).sqrt()


def attention_stats(logits, dist):
    """logits (B, W, H, N, N): pre-softmax, patch-only, W windows of N tokens (a ViT has one window: the image);
    dist (W, N, N) pixels between query and key. Returns per-query distance and entropy (B, W, H, N), the KL between
    heads (B, W, H, H) averaged over queries, and the NMI (B, W, H)."""
    # float64: the efficient KL below subtracts two sums of N*N terms of size ~ln N (fp32 leaves ~1e-4 nats)
    logp = logits.double().log_softmax(-1)  # renormalised over patches; log P without a log(0)
    p = logp.exp()
    n = logits.shape[-1]
    distance = torch.einsum("bwhij,wij->bwhi", p, dist.double())  # attention-weighted key distance (cl-vs-mim)
    entropy = -(p * logp).sum(-1)  # nats (mae-lite attn_analyzer.py)
    # KL(P^h_i || P^g_i) per query, then the mean over queries: -H^h - sum_j P^h_ij log P^g_ij, one einsum for all pairs
    cross = torch.einsum("bwhij,bwgij->bwhg", p, logp) / n  # (B, W, H, H)
    kl = -entropy.mean(-1).unsqueeze(-1) - cross
    kl.diagonal(dim1=-2, dim2=-1).zero_()  # KL(P || P) = 0 exactly; rounding would leave ~1e-7
    # NMI (cl-vs-mim): query uniform, p(k=j|q=i) = P_ij; MI = H(k) - mean_i H(P_i), normalised by sqrt(H(q) H(k))
    pk = p.mean(-2)  # (B, W, H, N) key marginal
    hk = -torch.special.xlogy(pk, pk).sum(-1)
    nmi = (hk - entropy.mean(-1)) / (math.log(n) * hk).sqrt().clamp_min(1e-12)  # 0/0 (all on one key) -> 0
    return dict(distance=distance, entropy=entropy, kl=kl, nmi=nmi)


def layer_geometry(model):
    """Per block: where its attention lives, and what uniform attention gives there (the reference lines). ViT: one
    window, the whole grid, patch size x grid distance. Swin: the block's windows as they are in its shifted frame;
    the tokens' absolute positions are rolled as the block rolls them (torch.roll by -shift), so a distance is the
    true one in the image, stage stride x grid distance. In a shifted block the shift mask alone splits windows into
    regions, so uniform attention there is uniform over a query's region (smaller distance, entropy, NMI > 0)."""
    if isinstance(model, vit.VisionTransformer):
        (h, w), px = model.grid, model.patch_size
        ij = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)  # (h, w, 2)
        dist = px * grid_distance(ij.view(1, -1, 2))  # (1, N, N)
        out = [dict(dist=dist, mask=torch.zeros(1, 1, h * w, h * w), stage=None, window=None, shift=None,
                    stride_px=px, tokens=h * w, max_distance_px=px * math.hypot(h - 1, w - 1)) for _ in model.blocks]
    else:
        out = []
        for s, stage in enumerate(model.layers):
            res, stride = model.grid[0] >> s, model.arch["patch_size"] << s
            ij = torch.stack(torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij"), -1)
            for blk in stage.blocks:
                w, sh = blk.window_size, blk.shift_size
                dist = stride * grid_distance(swin.window_partition(torch.roll(ij, (-sh, -sh), (0, 1))[None], w)[0])
                mask = torch.zeros(1, *dist.shape) if blk.attn_mask is None else blk.attn_mask.cpu()  # (1, nW, N, N)
                out.append(dict(dist=dist, mask=mask, stage=s, window=w, shift=sh, stride_px=stride, tokens=w * w,
                                max_distance_px=stride * (w - 1) * math.sqrt(2)))
    for g in out:  # uniform attention under the block's own mask: the reference lines of the figures
        uniform = attention_stats(g.pop("mask")[:, :, None], g["dist"])
        g.update(uniform_distance_px=uniform["distance"].mean().item(),
                 uniform_entropy=uniform["entropy"].mean().item(), uniform_nmi=uniform["nmi"].mean().item())
    return out


# ----------------------------------------------------------------------------------------------------------------
# CKA between layers: minibatch linear CKA with the unbiased HSIC (Nguyen et al. 2020, arXiv 2010.15327 Eq. 3,
# after Song et al. 2012), as wangsr126/mae-lite rep_cmp_analyzer.py (from AntixK/PyTorch-Model-Compare)

def hsic_batch(feats):
    """feats: L tensors (n, p_l), the same n images in the same order -> (L, L) HSIC_1 of every pair of layers."""
    K = torch.stack([f.double() @ f.double().T for f in feats])  # (L, n, n) linear Grams
    n = K.shape[-1]
    K.diagonal(dim1=1, dim2=2).zero_()  # the unbiased estimator works on Grams with a zero diagonal, no centring
    trace = torch.einsum("aij,bij->ab", K, K)  # tr(K~ L~), the Grams being symmetric
    total = K.sum((1, 2))  # 1' K~ 1
    rows = K.sum(2)  # K~ 1, (L, n)
    return (trace + total[:, None] * total[None] / ((n - 1) * (n - 2)) - 2 / (n - 2) * rows @ rows.T) / (n * (n - 3))


def cka(hsic_sum):
    """Numerators and denominators are averaged over minibatches separately (not a mean of per-batch CKAs)."""
    d = hsic_sum.diagonal().sqrt()
    return hsic_sum / (d[:, None] * d[None])


# ----------------------------------------------------------------------------------------------------------------
# SimMIM's AvgDist (its masking-strategy study, Fig. 3): the mean Euclidean distance from a masked pixel to the
# nearest visible one

def simmim_masks(n, img_size, mask_patch_size, ratio, gen):
    """(n, s, s) bool, True = masked, s = img_size / mask_patch_size: microsoft/SimMIM's MaskGenerator draws
    ceil(s*s * ratio) cells uniformly without replacement, per image."""
    s = img_size // mask_patch_size
    count = math.ceil(s * s * ratio)  # ceil as np.ceil(token_count * mask_ratio) there, same float order
    perm = torch.rand(n, s * s, generator=gen).argsort(1)  # a random permutation per image
    return (perm < count).view(n, s, s)  # the cells that draw one of the first `count` ranks (as simmim.py)


def avg_dist(img_size, mask_patch_size, ratio, n=500, seed=0):
    """AvgDist over n masks, in pixels between pixel centres (a masked pixel beside a visible one is at 1); None when
    every cell is masked. Exact, like scipy.ndimage.distance_transform_edt, using the block structure: inside a row
    of cells all pixel rows are alike, so the squared distance is min over cell rows r of (horizontal distance to the
    nearest visible pixel of row r)^2 + (vertical distance to row r)^2."""
    m, s = mask_patch_size, img_size // mask_patch_size
    count = math.ceil(s * s * ratio)
    if count >= s * s:
        return None
    x = torch.arange(img_size, dtype=torch.float)
    top = torch.arange(s, dtype=torch.float)[:, None] * m  # first pixel row of each cell row
    dy = (top - x).clamp(min=0) + (x - top - (m - 1)).clamp(min=0)  # (s, H) from pixel row y to cell row r
    gen, total = torch.Generator().manual_seed(seed), 0.0
    chunk = max(1, 2 ** 24 // (s * img_size * img_size))  # (chunk, s, H, W) below: 64 MB
    for start in range(0, n, chunk):
        mask = simmim_masks(min(chunk, n - start), img_size, m, ratio, gen)  # (k, s, s)
        rows = mask.repeat_interleave(m, 2)  # (k, s, W): the pixels of each cell row
        left = torch.where(rows, -math.inf, x).cummax(-1).values  # nearest visible column at or left of x
        right = torch.where(rows, math.inf, x).flip(-1).cummin(-1).values.flip(-1)
        dx = torch.minimum(x - left, right - x)  # (k, s, W), inf in an all-masked cell row
        d = (dx[:, :, None] ** 2 + dy[None, :, :, None] ** 2).amin(1).sqrt()  # (k, H, W)
        pix = mask.repeat_interleave(m, 1).repeat_interleave(m, 2)
        total += d[pix].sum().item() / (count * m * m)  # every mask has the same number of masked pixels
    return total / n


def avgdist_table(img_size, n, seed=0, progress=False):
    """{mask patch: {ratio: AvgDist or None}}; None also where the patch does not divide the image."""
    bar = tqdm(total=len(MASK_PATCHES) * len(RATIOS), desc="AvgDist table", disable=not progress, leave=False)
    table = {}
    for m in MASK_PATCHES:
        for r in RATIOS:
            table.setdefault(m, {})[r] = avg_dist(img_size, m, r, n, seed) if img_size % m == 0 else None
            bar.update()
    bar.close()
    return table


# ----------------------------------------------------------------------------------------------------------------
# Models and the measuring loop

def load_model(spec, img_size, seed, unsafe=False):
    """ViT layouts via vit.load_checkpoint, else Swin via swin.load_checkpoint; the classifier head is not analysed.
    init:PATH builds PATH's architecture with this seed's initialisation (the random-init reference)."""
    path = spec.removeprefix("init:")
    try:
        sd, arch = vit.load_checkpoint(path, unsafe)
        build, resize = vit.VisionTransformer, vit.resize_state_dict
    except ValueError as e:
        if "not a ViT checkpoint" not in str(e):  # refused or unreadable: not a question of the layout
            raise
        try:
            sd, arch = swin.load_checkpoint(path, unsafe)
        except ValueError:
            raise ValueError(f"{e} (nor a Swin checkpoint of timm, Microsoft, SimMIM or LocalMIM layout)") from None
        build, resize = swin.SwinTransformer, swin.resize_state_dict
    torch.manual_seed(seed)
    model = build(**{**arch, "img_size": img_size or arch["img_size"], "num_classes": 0})
    if not spec.startswith("init:"):
        sd = resize({k: v for k, v in sd.items() if not k.startswith("head.")}, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: does not fit its architecture; missing {missing}, unexpected {unexpected}")
    return model


def representation_norms(model):
    """For each block, the LayerNorm that next reads the residual stream (RepCatcher: block i+1's norm1, the final
    norm after the last block). Swin: at a stage end, the next stage's PatchMerging norm (2x2 tokens merged)."""
    if isinstance(model, vit.VisionTransformer):
        return [b.norm1 for b in model.blocks[1:]] + [model.fc_norm if model.global_pool == "avg" else model.norm]
    norms = []
    for s, stage in enumerate(model.layers):
        norms += [b.norm1 for b in stage.blocks[1:]]
        norms.append(model.layers[s + 1].downsample.norm if s + 1 < len(model.layers) else model.norm)
    return norms


@torch.no_grad()
def measure(model, loader, device):
    """Sums over images of every per-head metric, per layer, and the summed minibatch HSICs. The model runs in
    fp32 (no autocast); the metrics and Grams are computed in float64."""
    model.eval().to(device)
    geo, norms = layer_geometry(model), representation_norms(model)
    is_vit = isinstance(model, vit.VisionTransformer)
    sums, images, hsic, batches, reps = [{} for _ in geo], 0, 0.0, 0, []
    hooks = [] if is_vit else [nrm.register_forward_hook(lambda m, i, o: reps.append(o)) for nrm in norms]
    for img, _ in tqdm(loader, desc="images", leave=False):
        img, reps[:] = img.to(device), []
        if is_vit:  # block outputs before any norm, and per-block logits (B, H, T, T); CLS row and column dropped
            _, outs, logits = model.forward_features(img, out_blocks=range(len(model.blocks)), attn=True)
            pre = model.num_prefix
            reps[:] = [nrm(x[:, pre:]) for nrm, x in zip(norms, outs)]
            logits = [a[:, None, :, pre:, pre:] for a in logits]  # (B, 1, H, N, N)
        else:  # logits (B, nW, heads, N, N); the hooks collect the representations
            _, _, logits = model.forward_features(img, attn=True)
        for a, g, acc in zip(logits, geo, sums):
            st = attention_stats(a, g["dist"].to(device))
            per_image = dict(distance=st["distance"].mean((1, 3)), entropy=st["entropy"].mean((1, 3)),
                             kl=st["kl"].mean(1), nmi=st["nmi"].mean(1))  # means over windows and queries
            for k, v in per_image.items():
                acc[k] = acc.get(k, 0.0) + v.sum(0)  # sums over images, divided by the image count at the end
        images += img.shape[0]
        if img.shape[0] == loader.batch_size:  # CKA from full minibatches only (drop_last)
            hsic, batches = hsic_batch([r.flatten(1) for r in reps]) + hsic, batches + 1
    for h in hooks:
        h.remove()
    return geo, sums, images, hsic, batches


def summarize(name, spec, model, geo, sums, images, hsic, batches, batch_size, img_size):
    layers = []
    for i, (g, s) in enumerate(zip(geo, sums)):
        avg = {k: (v / images).cpu() for k, v in s.items()}
        heads = avg["distance"].numel()
        layers.append(dict(
            layer=i + 1, stage=g["stage"], window=g["window"], shift=g["shift"], stride_px=g["stride_px"],
            tokens=g["tokens"], heads=heads, uniform_distance_px=g["uniform_distance_px"],
            max_distance_px=g["max_distance_px"], uniform_entropy=g["uniform_entropy"], uniform_nmi=g["uniform_nmi"],
            distance_px=avg["distance"], distance_frac=avg["distance"] / img_size, entropy=avg["entropy"],
            head_kl=avg["kl"].sum(-1) / (heads - 1),  # mean over the other heads g != h: one dot per head
            head_kl_pairs=avg["kl"], nmi=avg["nmi"]))
    return dict(name=name, checkpoint=spec, model="vit" if isinstance(model, vit.VisionTransformer) else "swin",
                arch=model.arch, num_images=images, cka_images=batches * batch_size, layers=layers,
                cka=cka(hsic / batches).cpu())


def mean(v):
    return sum(math.nan if x is None else x for x in v) / len(v)  # None: undefined (KL of a one-head layer)


def jsonable(x):
    if torch.is_tensor(x):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x


# ----------------------------------------------------------------------------------------------------------------
# Figures in the paper's layout: one panel per checkpoint, side by side, the same y axis

def figures(results, out, img_size):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def dots(key, ylabel, fname, ref=None, layer_mean=False):
        fig, axes = plt.subplots(1, len(results), figsize=(0.4 + 3.2 * len(results), 3.2), sharey=True, squeeze=False,
                                 layout="constrained")
        for ax, r in zip(axes[0], results):
            for layer in r["layers"]:
                v = [math.nan if x is None else x for x in layer[key]]
                ax.scatter([layer["layer"]] * len(v), v, s=9, alpha=0.6, color="C0", linewidths=0)
                if layer_mean:  # Dark Secrets' head-diversity figure: small dots per head, a big dot per layer
                    ax.scatter(layer["layer"], mean(v), s=40, color="C3")
            if ref:
                ax.plot([x["layer"] for x in r["layers"]], [x[ref] for x in r["layers"]], "k--", lw=0.8,
                        label="uniform attention")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_title(r["name"], fontsize=10)
            ax.set_xlabel("layer" if r["model"] == "vit" else "block (Swin: within windows)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, 0].set_ylabel(ylabel)
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)

    dots("distance_px", f"attention distance (px, {img_size}x{img_size} input)", "attention_distance.png",
         ref="uniform_distance_px")
    dots("entropy", "attention entropy (nats)", "entropy.png", ref="uniform_entropy")
    dots("head_kl", "KL divergence between heads (nats)", "head_kl.png", layer_mean=True)
    dots("nmi", "query-key NMI", "nmi.png", layer_mean=True)
    fig, axes = plt.subplots(1, len(results), figsize=(1.2 + 3.0 * len(results), 3.0), squeeze=False,
                             layout="constrained")
    for ax, r in zip(axes[0], results):
        n = len(r["layers"])
        im = ax.imshow([[math.nan if x is None else x for x in row] for row in r["cka"]], vmin=0, vmax=1,
                       origin="lower", cmap="magma", extent=(0.5, n + 0.5, 0.5, n + 0.5))
        ax.set_title(r["name"], fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="linear CKA", shrink=0.9)
    fig.savefig(os.path.join(out, "cka.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Main

def run_avgdist(args):
    try:
        os.makedirs(args.out, exist_ok=True)  # before the minute of work
    except OSError as e:
        sys.exit(f"error: --out {args.out}: not a writable folder ({e.strerror})")
    one = avg_dist(args.img_size, args.mask_patch_size, args.mask_ratio, args.masks, args.seed)
    print(f"AvgDist at {args.img_size} px, mask patch {args.mask_patch_size}, ratio {args.mask_ratio}: "
          + ("undefined (every cell masked)" if one is None else f"{one:.2f} px") + f" ({args.masks} masks)")
    table = avgdist_table(args.img_size, args.masks, args.seed, progress=True)
    lines = [f"| mask patch \\ ratio ({args.img_size} px) | " + " | ".join(map(str, RATIOS)) + " |",
             "|---" * (len(RATIOS) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(("n/a" if args.img_size % m else "all") if v is None else f"{v:.1f}"
                                       for v in row.values()) + " |" for m, row in table.items()]
    lines.append(f"\nPixels, {args.masks} masks per cell; n/a: the mask patch does not divide the image; all: every "
                 f"cell is masked (undefined).")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "avgdist.json"), "w") as f:
        json.dump(jsonable(dict(img_size=args.img_size, masks=args.masks, setting=dict(
            mask_patch_size=args.mask_patch_size, mask_ratio=args.mask_ratio, avgdist=one), table=table)), f, indent=1)
    with open(os.path.join(args.out, "avgdist.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args = get_args(argv)
    if args.avgdist:
        return run_avgdist(args)
    device = torch.device(args.device)
    try:  # every checkpoint is read before any is measured, so a bad one stops the run at once
        os.makedirs(args.out, exist_ok=True)  # before any work: a bad --out fails now, not after measuring
        models = [load_model(args.ckpts[0], args.img_size, args.seed, args.unsafe_load)]
        img_size = models[0].arch["img_size"]  # --img-size, or the first checkpoint's
        models += [load_model(c, img_size, args.seed, args.unsafe_load) for c in args.ckpts[1:]]
        dataset = data.build_dataset(args.data, args.split, data.eval_transform(img_size), args.data_dir, img_size,
                                     args.seed, args.num_images)
        if len(dataset) < args.batch_size:
            raise ValueError(f"--batch-size {args.batch_size}: CKA needs one full batch; --data has {len(dataset)} "
                             f"{args.split} images")
    except (ValueError, OSError) as e:  # OSError: an --out that cannot be made
        sys.exit(f"error: {e}")
    loader = data.build_loader(dataset, args.batch_size, train=False, workers=args.workers, seed=args.seed,
                               drop_last=False)
    print(f"{len(dataset)} {args.split} images of --data {args.data} at {img_size} px, device {device}")
    results = []
    for name, spec, model in zip(args.names, args.ckpts, models):
        loader.sampler.set_epoch(0)  # the same images in the same order for every checkpoint (CKA pairs them)
        r = summarize(name, spec, model, *measure(model, loader, device), args.batch_size, img_size)
        results.append(jsonable(r))
        print(f"{name} ({spec}): layer | distance px (min-max over heads) | entropy | KL between heads | NMI")
        for x in results[-1]["layers"]:
            d = x["distance_px"]
            print(f"  {x['layer']:3d} | {mean(d):6.1f} ({min(d):.1f}-{max(d):.1f}) | {mean(x['entropy']):.2f} | "
                  f"{mean(x['head_kl']):.3f} | {mean(x['nmi']):.3f}")
        model.cpu()
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(dict(data=args.data, split=args.split, num_images=len(dataset), img_size=img_size,
                       batch_size=args.batch_size, definitions=DEFINITIONS, checkpoints=results), f)
    figures(results, args.out, img_size)
    print(f"wrote {args.out}/metrics.json and attention_distance.png, entropy.png, head_kl.png, nmi.png, cka.png")


if __name__ == "__main__":
    main()
