"""LocalMIM: masked image modeling with local multi-scale reconstruction.

Wang et al., "Masked Image Modeling with Local Multi-Scale Reconstruction", CVPR 2023, arXiv 2303.05251; official code
Haoqing-Wang/LocalMIM (ViT/models_mim.py, a MAE fork; Swin/models_mim.py, a GreenMIM fork). An MAE-style encoder sees
the visible patches only; side branches after several of its layers each feed a small decoder that predicts the HOG
of the masked region at its own scale: fine cells from the lower layers, coarse ones from the top. Every layer gets
direct guidance, and pretraining converges several times faster than MAE (README: ViT-B 84.0 top-1 after 1600 ep).

    python localmim.py --data /imagenet --model vit_base_patch16_224                     # ViT-B: 1600 ep, HOG 9 bins
    torchrun --nproc_per_node=8 localmim.py --data /imagenet --model swin_base_patch4_window7_224   # 400 ep, 18 bins
    python localmim.py --device cpu --no-compile --model vit_tiny_patch16_224 --img-size 64 --model-patch-size 8 \
        --depth 4 --batch-size 32 --workers 2 --steps 300                                 # CPU quick run

Deviations from the official code (with the reason):
- ViT: the kept tokens enter the encoder in raster order, not in the order of the masking noise; the blocks are
  permutation-equivariant and the decoder unshuffles, so only the float summation order changes.
- ViT with fewer than 7 blocks (CPU models): the official ID = [1, 3, depth-3, depth-1] repeats blocks there (and
  then feeds the decoders in the wrong order), so 4 evenly spaced blocks are used instead; depth >= 7 is official.
- Swin: the encoder computes the visible tokens only, as GreenMIM, but groups them per window with padding
  (swin.window_groups: one group per window and shift region, padded to the largest) instead of GreenMIM's knapsack;
  the outputs equal those of the dense visible-only encoder (every token computed, masked keys hidden; tested),
  which is what GreenMIM's grouping computes when done right. The released code gives merged tokens raster
  coordinates while tokens and mask are in mask-unit order (Swin/models_mim.py L257-258, copied from GreenMIM's
  first release): from stage 2 on it groups windows and indexes relative positions wrongly, so its stage 2-4
  outputs differ from ours by 1.7-2.8 and its loss by 0.08-0.4 %. Each decoder puts its mask token at the masked
  positions of its grid: GreenMIM's unshuffle + raster reorder, in one step. --pretrained on an official LocalMIM
  Swin release reorders its PatchMerging weights (swin.reorder_merges: it merges children row-first, Swin
  column-first).
- Swin mask units are the encoder's stride (32 px, the official unit); an image whose units would all be masked by
  the official count int(r L) + 1 is refused.
- bf16 autocast on GPUs instead of fp16 + GradScaler; targets (HOG and pixels) in fp32 outside autocast (the
  official HOG runs under fp16 autocast; a few pixels may change bins).
- Swin-L runs with window 14 by default, as its official recipe (Swin-L HOG w14); the official 100-epoch runs use
  --warmup-epochs 10 (the 400/800/1600-epoch recipes 40).
- `--target pixel` for ViT extrapolates the Swin pixel target to cells of p/4, p/2, p, 2p (the official ViT has HOG
  only); pixel targets are always per-cell normalised (the official Swin Pixel recipe passes --norm_pix_loss).
- `--stop-grad` (not in the official code): detaches the residual stream after each supervised layer.
- The encoder's final `norm` is kept (frozen at LayerNorm(1, 0)) so encoder.pth loads into timm strictly; the
  official model has none and fine-tunes with average pooling and a fresh fc_norm.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import vit
import swin

# (epochs, blr, min_lr, nbins, hog_bias) of the official READMEs and run_pretrain.py (batch 2048; ViT-L and Swin-L
# 4096); the 100-epoch runs of the paper's ablations use --warmup-epochs 10
RECIPES = {"vit": (1600, 2e-4, 1e-6, 9, False), "vit_large": (800, 1.5e-4, 1e-6, 18, True),
           "swin": (400, 1e-4, 0.0, 18, True), "swin_large": (800, 1e-4, 0.0, 18, True)}
PRESETS = {
    # the CPU demo: ViT-Tiny/8 (4 blocks, one local layer each) on synthetic 64-px images, 2-3 min on a core
    "tiny": dict(model="vit_tiny_patch16_224", img_size=64, model_patch_size=8, depth=4, num_images=512,
                 batch_size=32, epochs=4, warmup_epochs=1, blr=1.5e-3, device="cpu", compile=False, workers=1,
                 log_every=8, vis_every=2),
    # small images (CIFAR, 32 px): ViT-Tiny/4 (6 blocks: local layers 1, 3, 4, 6), HOG cells of 1/2/4/8 px, decoders
    # 128 wide (the 256 of ViT-B cost more than the encoder here), batch 256 at LR 1.5e-3 (bench/efficacy.py)
    "cifar": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, decoder_dim=128,
                  batch_size=256, epochs=100, warmup_epochs=2, blr=1.5e-3),
}
EXAMPLES = """examples:
  python localmim.py --preset tiny                                            # CPU demo, synthetic images, ~2 min
  torchrun --nproc_per_node=8 localmim.py --data /imagenet                    # ViT-B/16, 1600 ep, HOG, 2048/step
  torchrun --nproc_per_node=8 localmim.py --model swin_base_patch4_window7_224 --data /imagenet   # Swin-B, 400 ep
"""


# -----------------------------------------------------------------------------------------------------------------
# Arguments: the official recipe is the default

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="a named configuration (explicit flags still win); without it: "
                   "the official recipe of the --model family")
    # data and model
    p.add_argument("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | stl10 | ImageFolder root | .npz")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (downloaded)")
    p.add_argument("--num-images", type=int, default=None, help="epoch length of synthetic; a fixed subset otherwise")
    p.add_argument("--model", default="vit_base_patch16_224", help="a name of vit.py or swin.py, spelled as in timm")
    p.add_argument("--img-size", type=int, default=224, help="input resolution")
    p.add_argument("--model-patch-size", type=int, default=None, help="ViT patch size (default: the model name's); "
                   "e.g. 4 for 32-px images")
    p.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the model name's); fewer for CPU runs")
    p.add_argument("--window-size", type=int, default=None, help="Swin window (default: the model name's; 14 for "
                   "Swin-L, the official LocalMIM Swin-L)")
    p.add_argument("--pretrained", default=None, help="continue pretraining from this encoder (ours, timm, an "
                   "official LocalMIM / GreenMIM release); the decoders start fresh")
    p.add_argument("--unsafe-load", action="store_true", help="let --pretrained run the code it pickles (only for "
                   "files you trust; public checkpoints do not need it)")
    # optimisation (None: the recipe of the model family, RECIPES)
    p.add_argument("--batch-size", type=int, default=256, help="per process (official: 256 x 8 GPUs)")
    p.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--epochs", type=int, default=None, help="1600 ViT-B, 800 ViT-L, 400 Swin-B, 800 Swin-L")
    p.add_argument("--warmup-epochs", type=float, default=40, help="linear warmup from 0, then a half cosine")
    p.add_argument("--blr", type=float, default=None, help="base LR; absolute LR = blr * total batch / 256 "
                   "(2e-4 ViT-B, 1.5e-4 ViT-L, 1e-4 Swin)")
    p.add_argument("--min-lr", type=float, default=None, help="1e-6 ViT, 0 Swin")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = off (the official recipe)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0 = all epochs)")
    # LocalMIM
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches (ViT) or 32-px units "
                   "(Swin) removed")
    p.add_argument("--target", choices=["hog", "pixel"], default="hog", help="pixel: per-cell normalised patches")
    p.add_argument("--nbins", type=int, default=None, help="HOG orientation bins: 9 ViT-B, 18 ViT-L and Swin")
    p.add_argument("--hog-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="the frozen random Sobel bias of ViT-L and Swin (default: the recipe's)")
    p.add_argument("--decoder-dim", type=int, default=256, help="ViT decoders' width (official 256, 8 heads; "
                   "heads = width / 32); the Swin decoders keep GreenMIM's 64/128")
    p.add_argument("--stop-grad", action="store_true", help="detach the residual stream after each supervised "
                   "layer, so each layer learns from its own local loss only")
    # runtime
    p.add_argument("--out", default="runs/localmim", help="checkpoints, log.jsonl and pictures")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt exactly where it stopped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                   help="autocast dtype (default: bf16 where the GPU or CPU runs it natively, else none)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="model.compile() (default: on for CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, masks and data order (+ rank)")
    p.add_argument("--workers", type=int, default=8, help="data loader processes (capped by the CPUs available)")
    p.add_argument("--log-every", type=int, default=50, help="optimizer steps between log lines")
    p.add_argument("--save-every", type=int, default=1, help="epochs between checkpoints (and always at the end)")
    p.add_argument("--vis-every", type=int, default=50, help="epochs between target/prediction pictures "
                   "(and always at the end)")
    args = parse(p, argv)
    is_vit = args.model in vit.SIZES
    if not is_vit and args.model not in swin.SIZES:
        p.error(f"--model {args.model}: choose one of {', '.join(list(vit.SIZES) + list(swin.SIZES))}")
    if args.target == "pixel" and (args.nbins or args.hog_bias):
        p.error("--nbins / --hog-bias: apply to --target hog only")
    recipe = RECIPES[("vit" if is_vit else "swin") + ("_large" if "large" in args.model else "")]
    if "swin_large" in args.model and args.window_size is None:
        args.window_size = 14  # Swin/README.md: the Swin-L recipe is window 14
    for k, v in zip(("epochs", "blr", "min_lr", "nbins", "hog_bias"), recipe):
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio {args.mask_ratio}: must be in (0, 1)")
    if args.nbins < 1:
        p.error(f"--nbins {args.nbins}: must be at least 1")
    for name in ("epochs", "blr", "min_lr"):  # the recipe filled them after parse() checked the flags
        if not 0 <= getattr(args, name) < math.inf:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number >= 0")
    if is_vit:
        _, depth, _, patch = vit.SIZES[args.model]
        depth, patch = args.depth or depth, args.model_patch_size or patch
        if args.window_size:
            p.error("--window-size applies to Swin models only")
        if depth < 4:
            p.error(f"--depth {depth}: LocalMIM needs 4 blocks or more, one per local layer")
        if patch % 4 or args.img_size % (2 * patch):
            p.error(f"--model-patch-size {patch} / --img-size {args.img_size}: the 4x scale needs a patch divisible "
                    f"by 4, the 1/2x scale an even token grid (e.g. patch 16 at 224, patch 4 at 32)")
    elif int(args.mask_ratio * (args.img_size // 32) ** 2) + 1 >= (args.img_size // 32) ** 2:
        p.error(f"--mask-ratio {args.mask_ratio} masks all {(args.img_size // 32) ** 2} mask units of 32 px at "
                f"--img-size {args.img_size}; use a larger image (224: 37 of 49 masked) or a smaller ratio")
    return args


# -----------------------------------------------------------------------------------------------------------------
# Masking and local layers (paper Fig. 2a; the asymmetric encoder of MAE / GreenMIM): MAE's random masking on the
# ViT token grid, one mask of 32-px units for a whole Swin batch; the layers that get a reconstruction task

def mask_to_scale(mask, size):
    """(B, m, m) 1 = masked -> (B, size * size) in raster order (recal_mask): nearest upsampling above the mask grid;
    below it the mean of each block, so a partly visible 32-px cell of the ViT 1/2x scale counts fractionally."""
    m = mask[:, None].float()  # (B, 1, m, m)
    m = F.interpolate(m, size=(size, size)) if size >= mask.shape[-1] else F.avg_pool2d(m, mask.shape[-1] // size)
    return m.flatten(1)


def local_layers(depth):
    """The blocks whose outputs are supervised, 0-indexed: the official [1, 3, depth-3, depth-1] (layers 2, 4, 10,
    12 of ViT-B); below 7 blocks those repeat, so 4 evenly spaced blocks (depth 4: all of them)."""
    return [1, 3, depth - 3, depth - 1] if depth >= 7 else [round(k * (depth - 1) / 3) for k in range(4)]


# -----------------------------------------------------------------------------------------------------------------
# Multi-scale decoders (paper Fig. 2b: Transformer blocks, then Deconvolution/Pool (optional), then an MLP)

def xavier_(module):
    """MAE's _init_weights for Linears (LayerNorms are already 1/0); convolutions keep PyTorch's default, as there."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LayerNorm2d(nn.LayerNorm):
    """The official channels-first LayerNorm (ConvNeXt's): normalises C of a (B, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ViTDecoder(nn.Module):
    """MAE_Decoder (ViT/models_mim.py L43-121): Linear to 256, mask tokens, fixed sin-cos, one block, LayerNorm, then
    the rescaling to scale x the token grid (deconvolution x4/x2, identity, 2x2 pooling) and a per-position Linear."""

    def __init__(self, dim, grid, scale, out_dim, width=256, heads=8):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(vit.sincos_pos_embed(width, grid), requires_grad=False)  # (1, 1 + N, w)
        self.blocks = nn.ModuleList([vit.Block(width, heads, eps=1e-6)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        if scale == 4:  # keys pred.0, pred.1, pred.3, pred.4 as in the official checkpoints
            up = [nn.ConvTranspose2d(width, width // 2, 2, 2), LayerNorm2d(width // 2, eps=1e-6), nn.GELU(),
                  nn.ConvTranspose2d(width // 2, width // 4, 2, 2)]
        elif scale == 2:
            up = [nn.ConvTranspose2d(width, width // 2, 2, 2)]
        else:
            up = [nn.AvgPool2d(2)] if scale == 0.5 else []
        hidden = {4: width // 4, 2: width // 2}.get(scale, width)
        self.pred = nn.Sequential(*up, nn.Conv2d(hidden, out_dim, 1))  # the "MLP": a 1x1 conv
        xavier_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x, restore):
        """x (B, 1 + K, D): cls + visible tokens of one local layer; restore (B, N) -> (B, h' w', out_dim)."""
        x = self.embed(x)  # (B, 1 + K, w)
        B, N = restore.shape
        y = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, N + 1 - x.shape[1], -1)], 1)  # (B, N, w)
        y = y.gather(1, restore[..., None].expand(-1, -1, y.shape[-1]))  # unshuffle: raster order
        x = torch.cat([x[:, :1], y], 1) + self.pos_embed  # (B, 1 + N, w)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, 1:].transpose(1, 2).unflatten(2, self.grid)  # (B, 256, h, w), cls dropped
        return self.pred(x).flatten(2).transpose(1, 2)  # (B, h' w', out_dim), raster order like the pooled targets


class SwinDecoder(nn.Module):
    """GreenMIM's ViT_Decoder (Swin/models_mim.py L769-826): no cls and no rescaling, the stage output already sits
    on the target grid. Linear(C_s -> 64 or 128), mask tokens, fixed sin-cos, one block of 4 heads, LN, Linear."""

    def __init__(self, dim, width, grid, out_dim, heads=4):
        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(vit.sincos_pos_embed(width, (grid, grid), cls_token=False), requires_grad=False)
        self.blocks = nn.ModuleList([vit.Block(width, heads, eps=1e-6)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, out_dim)
        xavier_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x, where):
        """x (B, N, C): a stage's visible tokens; where (N,): their raster positions on its g x g grid
        -> (B, g * g, out_dim). The mask token at every other position: GreenMIM's unshuffle, in one step."""
        e = self.embed(x)  # (B, N, w)
        x = self.mask_token.to(e.dtype).expand(x.shape[0], self.pos_embed.shape[1], -1).index_copy(1, where, e)
        x = x + self.pos_embed  # (B, g * g, w)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


# -----------------------------------------------------------------------------------------------------------------
# Multi-scale targets (paper Fig. 2a: the input divided at each scale, a feature descriptor per cell): HOG of every
# colour plane, or normalised pixels

class HOG(nn.Module):
    """HOGLayer (ViT/models_mim.py L124-156) for all scales at once: one full-resolution Sobel map (reflect padding),
    orientation atan2(left - right, top - bottom) in that argument order (not a bin permutation of the usual
    atan2(gy, gx)), hard unsigned binning, the gradient magnitude averaged over each cell, L2-normalised per cell and
    colour plane. Not an image pyramid: every scale pools the same map. No Gaussian window, no block normalisation."""

    def __init__(self, nbins, cells, bias=False):
        super().__init__()
        self.nbins, self.cells = nbins, cells
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("sobel", torch.stack([sobel, sobel.T])[:, None], persistent=False)  # (2, 1, 3, 3)
        # --hog-bias: PyTorch's default conv bias U(+-1/sqrt(9)), one draw per scale, frozen; a buffer, so DDP copies
        # rank 0's draw and the checkpoint keeps it for resume (flat cells become one-hot instead of zero)
        self.register_buffer("bias", torch.empty(len(cells), 2).uniform_(-1 / 3, 1 / 3) if bias else None)

    def forward(self, img):
        """img (B, 3, H, W), ImageNet-normalised -> per cell size c: (B, (H/c)(W/c), 3 nbins), [R | G | B bins]."""
        B, C, H, W = img.shape
        g = F.conv2d(F.pad(img.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="reflect"), self.sobel)  # (3B, 2, H, W)
        planes = torch.arange(B * C, device=img.device).view(-1, 1, 1) * self.nbins
        out = []
        for k, c in enumerate(self.cells):
            if k == 0 or self.bias is not None:  # without a bias all scales pool the same map
                gk = g if self.bias is None else g + self.bias[k].view(1, 2, 1, 1)
                phase = torch.atan2(gk[:, 0], gk[:, 1])  # (3B, H, W) in (-pi, pi]
                bins = (phase / math.pi * self.nbins).floor().long() % self.nbins  # opposite directions: one bin
                magnitude = torch.hypot(gk[:, 0], gk[:, 1])  # (3B, H, W)
            h, w = H // c, W // c  # as avg_pool2d, a remainder of rows or columns is left out
            rows, cols = torch.arange(h * c, device=img.device) // c, torch.arange(w * c, device=img.device) // c
            # every pixel's magnitude added into its (plane, bin, cell): the average pooling of the one-hot
            # (3B, nbins, H, W) map without building it (2-4x faster at 224 px, the same sums; on a GPU the
            # atomic adds may order them differently from run to run, a last-bit difference)
            slot = ((planes + bins[:, :h * c, :w * c]) * h + rows[:, None]) * w + cols  # (3B, hc, wc)
            hist = img.new_zeros(B * C * self.nbins * h * w).index_add_(
                0, slot.flatten(), magnitude[:, :h * c, :w * c].flatten()) / (c * c)
            cell = F.normalize(hist.view(B * C, self.nbins, h, w), dim=1)  # (3B, nbins, h, w)
            out.append(cell.view(B, C * self.nbins, h * w).transpose(1, 2))
        return out


def patchify(img, p):
    """(B, 3, H, W) -> (B, L, p * p * 3), each row (row, col, channel) as MAE's einsum nchpwq -> nhwpqc."""
    B, C, H, W = img.shape
    return img.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), -1)


def unpatchify(x, p, size):
    """Inverse of patchify: (B, L, p * p * 3) -> (B, 3, size, size)."""
    n = size // p
    return x.view(-1, n, n, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, size, size)


def norm_patches(img, p):
    """Swin's Pixel target with --norm_pix_loss: each cell standardised by its mean and unbiased variance."""
    x = patchify(img, p)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


# -----------------------------------------------------------------------------------------------------------------
# The model and its loss (forward_loss): MSE on masked cells, each scale over its batch mask sum, scales summed

def local_loss(pred, target, mask):
    """forward_loss: sum over batch and positions of mean_feature (pred - target)^2 * M, / sum of M (batch-global)."""
    return (((pred.float() - target) ** 2).mean(-1) * mask).sum() / mask.sum()


class LocalMIM(nn.Module):
    def __init__(self, encoder, target="hog", nbins=9, hog_bias=False, mask_ratio=0.75, stop_grad=False,
                 decoder_dim=256):
        super().__init__()
        self.encoder, self.mask_ratio, self.stop_grad = encoder, mask_ratio, stop_grad
        self.is_vit = isinstance(encoder, vit.VisionTransformer)
        encoder.norm.requires_grad_(False)  # unused: each local layer has its own norm on a side branch
        img = encoder.arch["img_size"]
        if self.is_vit:
            encoder.init_weights("mae")
            h, D = encoder.grid[0], encoder.embed_dim
            self.ids = local_layers(len(encoder.blocks))
            self.grids, self.mask_grid, dims = [4 * h, 2 * h, h, h // 2], h, [D] * 4  # 4, 2, 1, 1/2 x the token grid
        else:
            if len(encoder.layers) != 4:
                raise ValueError(f"a Swin of {len(encoder.layers)} stages: LocalMIM supervises the outputs of 4")
            xavier_(encoder)  # the official Swin encoder is initialised the MAE way, patch embedding as a Linear
            C, r = encoder.arch["embed_dim"], encoder.grid[0]
            nn.init.xavier_uniform_(encoder.patch_embed.proj.weight.view(C, -1))
            self.grids, self.mask_grid = [r // 2, r // 4, r // 8, r // 8], img // encoder.stride  # 28/14/7/7, 7
            dims = [2 * C, 4 * C, 8 * C, 8 * C]  # stage outputs after PatchMerging
        self.cells = [img // g for g in self.grids]  # ViT 4/8/16/32 px, Swin 8/16/32/32 px at 224
        out = [3 * nbins if target == "hog" else 3 * c * c for c in self.cells]
        self.decoder = nn.ModuleList(
            [ViTDecoder(D, encoder.grid, s, o, decoder_dim, max(1, decoder_dim // 32)) for s, o in
             zip((4, 2, 1, 0.5), out)] if self.is_vit else
            [SwinDecoder(d, w, g, o) for d, w, g, o in zip(dims, (64, 128, 128, 128), self.grids, out)])
        self.norm = nn.ModuleList([nn.LayerNorm(d, eps=1e-6) for d in dims])  # norm.0..3 as the official
        self.hog = HOG(nbins, self.cells, hog_bias) if target == "hog" else None
        # weight decay as the official code: ViT decays cls_token and the mask tokens (timm add_weight_decay without
        # a skip list, MAE's quirk); Swin skips every name containing 'position_bias' or 'token'
        self.no_decay = () if self.is_vit else ("position_bias", "token")

    def random_mask(self, B, device):
        """(B, m, m), 1 = masked. ViT: per sample, argsort of uniform noise keeps int(N (1 - r)) tokens (49 of 196).
        Swin: randperm(L) <= int(r L) on the grid of 32-px units, one draw for the batch (37 of 49)."""
        m = self.mask_grid
        if self.is_vit:
            keep = torch.rand(B, m * m, device=device).argsort(1)[:, :int(m * m * (1 - self.mask_ratio))]
            return torch.ones(B, m * m, device=device).scatter_(1, keep, 0.0).view(B, m, m)
        mask = torch.randperm(m * m, device=device) <= int(self.mask_ratio * m * m)  # (m * m,)
        return mask.float().view(1, m, m).expand(B, m, m)

    def tap(self, x, latents, where=None):
        """A local layer: its own LayerNorm on a side branch; the residual stream goes on un-normalised. Swin: with
        the raster positions of its visible tokens on the stage's grid."""
        z = self.norm[len(latents)](x)
        latents.append(z if where is None else (z, where))
        return x.detach() if self.stop_grad else x

    def encode(self, img, mask):
        """img (B, 3, H, W), mask (B, m, m) -> the 4 local features, finest scale first."""
        enc, latents = self.encoder, []
        if self.is_vit:  # MAE encoder: cls + the visible patches only
            keep = mask.flatten(1).argsort(dim=1, stable=True)[:, :int(mask[0].numel() * (1 - self.mask_ratio))]
            x = enc.embed(img, keep=keep)  # (B, 1 + K, D)
            for i, blk in enumerate(enc.blocks):
                x = blk(x)
                if i in self.ids:
                    x = self.tap(x, latents)
            return latents
        # Swin: the visible tokens alone (GreenMIM's gathering; the mask is one for the batch), windows grouped per
        # block (swin.window_groups); latents are taken after PatchMerging (the official layout)
        H = enc.grid[0]
        coords = (mask_to_scale(mask[:1], H).view(H, H) == 0).nonzero()  # (N, 2): 8 x 8 tokens per visible unit
        x = enc.embed(img)[:, coords[:, 0], coords[:, 1]]  # (B, N, C)
        for s, stage in enumerate(enc.layers):
            res = H >> s
            if s > 0:
                coords, children = swin.merge_children(coords, 2 * res)
                x = self.tap(stage.downsample.forward_visible(x, children), latents, coords[:, 0] * res + coords[:, 1])
            x = stage.forward_visible(x, coords, res)
        self.tap(x, latents, coords[:, 0] * res + coords[:, 1])
        return latents  # Swin-B, 75 %: 192 x 2C on 28 x 28, 48 x 4C on 14 x 14, 12 x 8C on 7 x 7, twice

    @torch.no_grad()
    def targets(self, img):
        with torch.autocast(img.device.type, enabled=False):  # fp32 whatever the training precision
            img = img.float()
            return self.hog(img) if self.hog is not None else [norm_patches(img, c) for c in self.cells]

    def forward(self, img, mask=None):
        """-> loss, per-scale losses (4,), predictions, targets and masks per scale (finest first)."""
        mask = self.random_mask(img.shape[0], img.device) if mask is None else mask  # (B, m, m)
        masks = [mask_to_scale(mask, g) for g in self.grids]  # (B, g * g) each
        latents = self.encode(img, mask)
        if self.is_vit:
            restore = mask.flatten(1).argsort(dim=1, stable=True).argsort(1)  # (B, N)
            preds = [dec(z, restore) for dec, z in zip(self.decoder, latents)]
        else:
            preds = [dec(z, where) for dec, (z, where) in zip(self.decoder, latents)]
        targets = self.targets(img)
        terms = torch.stack([local_loss(p, t, m) for p, t, m in zip(preds, targets, masks)])  # weights all 1
        return terms.sum(), terms, preds, targets, masks


def load_pretrained(model, path, unsafe):
    """--pretrained into the encoder (strict but for its final norm, which LocalMIM keeps frozen at LN(1, 0)). An
    official LocalMIM Swin release has its PatchMerging children reordered (swin.load_checkpoint, pretraining)."""
    sd, _ = vit.load_checkpoint(path, unsafe) if model.is_vit else swin.load_checkpoint(path, unsafe, pretraining=True)
    sd, own = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}, model.encoder.state_dict()
    bad = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if not bad:
        missing, unexpected = model.encoder.load_state_dict(sd, strict=False)
        bad = [f"missing {k}" for k in missing if not k.startswith("norm.")] + [f"unexpected {k}" for k in unexpected]
    if bad:
        raise ValueError(f"--pretrained {path}: does not fit this encoder ({', '.join(bad[:6])})")


# -----------------------------------------------------------------------------------------------------------------
# Pictures: what each scale is asked to predict, and what it predicts

def hog_colors(h, nbins):
    """(n, L, 3 nbins) -> (n, 3, g, g): hue = the cell's orientation (doubled-angle mean of the bins, R+G+B summed),
    brightness = how concentrated the histogram is (1: one orientation; 0: flat or uniform cells)."""
    n, L, _ = h.shape
    h = h.float().view(n, L, 3, nbins).sum(2).clamp(min=0)  # (n, L, nbins)
    a = (torch.arange(nbins, device=h.device) + 0.5) * (2 * math.pi / nbins)  # doubled bin-centre angles
    c, s = h @ a.cos(), h @ a.sin()  # (n, L)
    hue, val = torch.atan2(s, c) / (2 * math.pi) % 1, (c * c + s * s).sqrt() / (h.sum(-1) + 1e-6)
    k = (torch.tensor([5.0, 3.0, 1.0], device=h.device) + 6 * hue[..., None]) % 6  # HSV -> RGB with S = 1
    rgb = val[..., None] * (1 - torch.minimum(k, 4 - k).clamp(0, 1))  # (n, L, 3)
    return rgb.transpose(1, 2).reshape(n, 3, math.isqrt(L), math.isqrt(L))


@torch.no_grad()
def picture(model, img, mask, path):
    """One column per image; rows: the masked input, then per scale (finest first) the target and the prediction.
    A prediction panel shows the prediction on the masked cells (the only ones trained) and the target on the
    visible ones. HOG cells are coloured by orientation; pixel targets are drawn with the true cell's statistics."""
    was_training = model.training
    model.eval()
    _, _, preds, targets, masks = model(img, mask)
    model.train(was_training)
    size = img.shape[-1]
    up = lambda x: F.interpolate(x.float(), size=(size, size))  # noqa: E731 (nearest): every panel at image size
    hidden = mask_to_scale(mask, size).view(-1, 1, size, size)
    rows, labels = [data.denormalize(img) * (1 - hidden) + 0.5 * hidden], ["masked"]
    for p, t, m, c in zip(preds, targets, masks, model.cells):
        p = torch.where(m[..., None] > 0, p.float(), t)
        for x, what in ((t, "target"), (p, "pred.")):
            if model.hog is not None:
                rows.append(up(hog_colors(x, model.hog.nbins)))
            else:
                cells = patchify(img, c)
                x = x * (cells.var(-1, keepdim=True) + 1e-6).sqrt() + cells.mean(-1, keepdim=True)
                rows.append(up(data.denormalize(unpatchify(x, c, size))))
            labels.append(f"{what} {c} px")
    data.save_grid(rows, labels, path, min_size=128)


# -----------------------------------------------------------------------------------------------------------------
# Run machinery (SHARED: identical in every method file so each file stands alone; tests/test_common.py holds them)

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every default shown, and the examples kept as written."""


def parse(p, argv):
    """argparse with --preset (its values become the defaults, so explicit flags still win), then every number in
    range: one line naming the flag, exit code 2. --workers is capped by the CPUs this process may use."""
    args = p.parse_args(argv)
    if getattr(args, "preset", None):
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    for name, v in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            p.error(f"{flag} {v}: must be a finite number")
        if name in AT_LEAST_ONE and v < 1:
            p.error(f"{flag} {v}: must be at least 1")
        if name in NON_NEGATIVE and v < 0:
            p.error(f"{flag} {v}: must not be negative")
        if name == "drop_path" and not 0 <= v < 1:
            p.error(f"{flag} {v}: must be in [0, 1)")
    cpus = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if getattr(args, "workers", 0) > max(cpus - 1, 0):
        if os.environ.get("RANK", "0") == "0":
            print(f"note: --workers {args.workers} capped at {max(cpus - 1, 0)}: {cpus} CPU(s) per process, one "
                  f"of them training")
        args.workers = max(cpus - 1, 0)
    if getattr(args, "amp", "") is None:  # bf16 where the device has it natively: a GPU, or a CPU with AVX512-BF16/AMX
        try:
            with open("/proc/cpuinfo") as f:
                cpu_bf16 = "_bf16" in f.read()
        except OSError:  # not Linux: fp32
            cpu_bf16 = False
        cuda = args.device.startswith("cuda")
        args.amp = "bf16" if (cuda and torch.cuda.is_bf16_supported()) or (not cuda and cpu_bf16) else "none"
    if getattr(args, "compile", "") is None:
        args.compile = args.device.startswith("cuda")
    return args


AT_LEAST_ONE = {"batch_size", "accum_iter", "epochs", "log_every", "save_every", "eval_every", "img_size",
                "model_patch_size", "depth", "window_size", "num_images", "mask_patch_size", "decoder_dim",
                "decoder_depth", "decoder_heads", "nbins", "top_k"}
NON_NEGATIVE = {"blr", "lr", "min_lr", "warmup_lr", "weight_decay", "warmup_epochs", "clip_grad", "steps", "workers",
                "vis_every", "seed"}
# what --resume may change: where and how fast the run goes, never what it computes (maskalign.py checks its
# teacher by the sha256 of the weights, not by the path)
FREE_FLAGS = {"resume", "out", "steps", "workers", "log_every", "save_every", "eval_every", "vis_every", "device",
              "compile", "data_dir", "unsafe_load", "teacher"}


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs a single process. NCCL on GPUs (gloo for the
    small CPU tensors of the stop signal), gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("cuda:nccl,cpu:gloo", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def build_encoder(args, **kw):
    """A vit.py or swin.py encoder by its timm name, at --img-size; --model-patch-size / --depth shrink a ViT."""
    if args.model in vit.SIZES:
        shrink = {k: v for k, v in (("patch_size", args.model_patch_size), ("depth", args.depth)) if v}
        return vit.create_model(args.model, img_size=args.img_size, num_classes=0, **shrink, **kw)
    if args.model not in swin.SIZES:
        raise ValueError(f"--model {args.model}: choose one of {', '.join(list(vit.SIZES) + list(swin.SIZES))}")
    if args.model_patch_size or args.depth:
        raise ValueError("--model-patch-size and --depth apply to ViT models only")
    return swin.create_model(args.model, img_size=args.img_size, num_classes=0, **kw)


def prepare_out(args, master, checkpoints=True):
    """--out is a writable folder; one that holds a checkpoint is continued only with --resume (checkpoints=False:
    a run that writes none); the .tmp files of a save that was killed go. -> the path of ckpt.pt"""
    ckpt = os.path.join(args.out, "ckpt.pt")
    try:
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        sys.exit(f"error: --out {args.out}: not a writable folder ({e.strerror})")
    if args.resume and not os.path.exists(ckpt):
        sys.exit(f"error: --resume: no checkpoint at {ckpt}")
    if checkpoints and not args.resume and os.path.exists(ckpt):
        sys.exit(f"error: --out {args.out} holds the checkpoint of an earlier run: continue it with --resume, or "
                 f"choose another --out")
    for name in os.listdir(args.out) if master else ():
        if name.endswith(".tmp"):
            os.remove(os.path.join(args.out, name))
    return ckpt


def resume_from(path, args, model, opt, scaler, master):
    """ckpt.pt into the model, optimizer and scaler. Refused in one line: an unreadable file, another architecture,
    or other flags than the run was started with (only FREE_FLAGS may change). Trims log.jsonl to its step."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        stored = ckpt["args"]
    except Exception as e:  # truncated, text, another program's file
        sys.exit(f"error: --resume: {path} is not a checkpoint of this script ({type(e).__name__})")
    changed = [f"--{k.replace('_', '-')} {v} (the checkpoint's: {stored[k]})" for k, v in vars(args).items()
               if k not in FREE_FLAGS and k in stored and stored[k] != v]
    if changed:
        sys.exit(f"error: --resume: {path} was trained with other flags: {'; '.join(changed)}; only "
                 f"{', '.join('--' + f.replace('_', '-') for f in sorted(FREE_FLAGS))} may change")
    try:
        model.load_state_dict(ckpt["model"])  # strict
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        sys.exit(f"error: --resume: {path} does not fit this model ({str(e).strip().splitlines()[-1][:200]})")
    if master:
        trim_log(os.path.join(args.out, "log.jsonl"), ckpt["step"])
    return ckpt


def trim_log(path, step):
    """--resume: drop the log records written after the checkpoint (a crash between two saves), which the resumed
    run writes again, so that log.jsonl holds each step once; and a last line the crash cut short (no newline)."""
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def save_files(files, step, ckpt_path):
    """{path: {'model': state dict, ...}}, written together: every file to .tmp first, then the renames, so a crash
    never breaks the last good checkpoint and ckpt.pt and the exports hold the same step. Weights that are not
    finite are never written: the run stops, naming the last good checkpoint."""
    for obj in files.values():
        if not all(v.isfinite().all() for v in obj["model"].values() if v.is_floating_point()):
            sys.exit(f"error: the weights are not finite at step {step}; nothing saved ({last_good(ckpt_path)})")
    for path, obj in files.items():
        torch.save(obj, path + ".tmp")
    for path in files:
        os.replace(path + ".tmp", path)


def last_good(ckpt_path):
    return f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "there is no checkpoint yet"


STOP = []  # signals received: the loop ends after the current optimizer step


def catch_signals():
    """Ctrl-C (SIGINT) or SIGTERM: finish the optimizer step, save, end with one line. A second Ctrl-C quits at once,
    without saving; not under torchrun, which passes the terminal's Ctrl-C on once more and escalates by itself.
    Installed by `python x.py` only, not by in-process tests."""
    def handler(signum, frame):
        if STOP and "LOCAL_RANK" not in os.environ:
            os._exit(130)
        STOP.append(signum)
        print("\nstopping after this step (Ctrl-C again: quit now, without saving)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_requested(world):
    """True on every rank once any rank got a signal, so that all stop at the same step (a tiny gloo all-reduce)."""
    flag = torch.tensor([float(len(STOP) > 0)])
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def finish(world, master, message, code=0):
    """The run's last line (rank 0) once the process group is gone; code 130 = interrupted."""
    if world > 1:
        dist.destroy_process_group()
    if master:
        print(message, file=sys.stderr if code else sys.stdout, flush=True)
    if code:
        sys.exit(code)


def blocks_of(arch, tokens=None):
    """(tokens, width, heads, keys) of every block of a vit.py or swin.py encoder of this arch, for one image; a ViT
    on `tokens` tokens (its visible ones), a Swin dense on all of them with its windows' keys."""
    if "depths" in arch:
        side, out = arch["img_size"] // arch["patch_size"], []
        for s, (depth, heads) in enumerate(zip(arch["depths"], arch["num_heads"])):
            out += [((side >> s) ** 2, arch["embed_dim"] << s, heads, min(arch["window_size"], side >> s) ** 2)] * depth
        return out
    t = tokens or (arch["img_size"] // arch["patch_size"]) ** 2 + int(arch["class_token"])
    return [(t, arch["embed_dim"], arch["num_heads"], t)] * arch["depth"]


def check_memory(blocks, args, device, world, frozen=()):
    """Stop before the first step when the run cannot fit. The estimate: the runtime (~800 MB of a CPU process),
    16 bytes per trained weight (weights, gradients, AdamW's two moments; + 2 for bf16 copies), 4 per frozen one,
    200 MB per loader worker, and what autograd keeps per image: 36 bytes (bf16) or 110 (fp32) per token x channel
    of every block, and per attention entry too where the attention is explicit (a CPU under bf16); frozen
    blocks run without a graph. blocks/frozen: blocks_of(). Within 15 % of the measured peak on CPU (README)."""
    bf16, cpu = args.amp != "none", device.type == "cpu"
    units = sum(t * (d + h * s * (cpu and bf16)) for t, d, h, s in blocks)  # per image
    params = sum(12 * d * d for _, d, _, _ in blocks) * (16 + 2 * bf16) + sum(12 * d * d for _, d, _, _ in frozen) * 4
    act = args.batch_size * (units * (36 if bf16 else 110) + sum(t * d * 8 for t, d, _, _ in frozen))
    need = (act + params) / 2 ** 20 + (800 + 200 * args.workers) * cpu
    if cpu and os.path.exists("/proc/meminfo"):  # the RAM the OS can give, shared by this node's processes
        with open("/proc/meminfo") as f:
            free = int(next(x.split()[1] for x in f if x.startswith("MemAvailable"))) / 1024
        free /= int(os.environ.get("LOCAL_WORLD_SIZE", world))
    elif cpu:  # not Linux: no check
        free = math.inf
    else:
        free = torch.cuda.mem_get_info(device)[0] / 2 ** 20
    if need > free:
        sys.exit(f"error: this run needs about {need / 1024:.1f} GB ({act / 2 ** 30:.1f} GB of activations at "
                 f"--batch-size {args.batch_size}) and {device} has {free / 1024:.1f} GB free per process; use "
                 f"--preset tiny, or a smaller --batch-size with --accum-iter")
    return need, free


def peak_memory_mb(device):
    """Peak memory of this process: allocated CUDA memory on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_left(bar):
    """Printed once, at the first log step: the pace so far and the expected time of the rest of the run (the first
    steps include the warm-up, so this errs long)."""
    d = bar.format_dict
    done, left = d["n"] - d["initial"], d["total"] - d["n"]
    return (f"{done} steps in {d['elapsed']:.0f} s: about {left * d['elapsed'] / max(done, 1) / 60:.1f} min for "
            f"the {left} steps left")


def param_groups(model, weight_decay, skip=()):
    """AdamW groups: no weight decay on 1-D tensors (norms, biases, gains) and on names containing a `skip` entry."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mae_lr(step, total, warmup, lr, min_lr):
    """Linear warmup from 0, then a half-cycle cosine to min_lr; per optimizer step (MAE util/lr_sched.py)."""
    if step < warmup:
        return lr * step / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -----------------------------------------------------------------------------------------------------------------
# Training loop

def main(args):
    rank, world, device = setup_distributed(args)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = prepare_out(args, master)

    try:  # user errors in data, model or checkpoints end with one line, not a traceback
        dataset = data.build_dataset(args.data, "train", data.pretrain_transform(args.img_size, scale=(0.2, 1.0),
                                     interpolation="bicubic"), args.data_dir, args.img_size, num_images=args.num_images)
        loader = data.build_loader(dataset, args.batch_size, train=True, workers=args.workers, seed=args.seed,
                                   device=device)  # in-memory images: batched on the device
        shown = data.build_dataset(args.data, "train", data.eval_transform(args.img_size), args.data_dir,
                                   args.img_size, num_images=args.num_images)
        is_vit = args.model in vit.SIZES  # MAE's fixed sin-cos positions; the official Swin uses LayerNorm eps 1e-6
        kw = {"pos_embed": "sincos"} if is_vit else {"norm_eps": 1e-6, "window_size": args.window_size}
        encoder = build_encoder(args, **{k: v for k, v in kw.items() if v is not None})
        model = LocalMIM(encoder, args.target, args.nbins, args.hog_bias, args.mask_ratio, args.stop_grad,
                         args.decoder_dim)
        if args.pretrained:
            load_pretrained(model, args.pretrained, args.unsafe_load)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    L = encoder.grid[0] * encoder.grid[1]  # the decoders see every token (ViT: 1 + L; Swin: their stage grid)
    decoders = [(1 + L, args.decoder_dim, args.decoder_dim // 32, 1 + L)] * 4 if is_vit else []
    visible = 1 + int(L * (1 - args.mask_ratio)) if is_vit else None
    need, free = check_memory(blocks_of(encoder.arch, visible) + decoders, args, device, world)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, model.no_decay), lr=0.0, betas=(0.9, 0.95),
                            fused=True)  # one kernel per step, CPU too (3.6x foreach there)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # loss scaling only for fp16
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "none")
    batch = args.batch_size * args.accum_iter * world
    lr = args.blr * batch / 256  # MAE's rule (main_pretrain.py)
    if not math.isfinite(lr):
        sys.exit(f"error: --blr {args.blr}: gives an LR of {lr} at batch {batch}")
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        sys.exit(f"error: --accum-iter {args.accum_iter}: more than the {len(loader)} batches of an epoch")
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    last = min(args.steps, total) if args.steps else total

    step = 0
    if args.resume:
        step = resume_from(ckpt_path, args, model, opt, scaler, master)["step"]
    raw = model  # what is saved: never the compiled or DDP wrapper (no `_orig_mod.` / `module.` prefixes)
    # a few fixed images (one per class where there are classes, un-augmented) and one fixed mask for the pictures
    pic_img = torch.stack([shown[i][0] for i in data.spread(shown.labels, 4)]).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        pic_mask = raw.random_mask(len(pic_img), "cpu").to(device)
    if args.compile:
        model.compile()  # in place, so state-dict keys stay clean
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if master:
        print(f"args: {json.dumps(vars(args))}")
        print(f"device {device} x {world} | amp {args.amp} | compile {args.compile} | batch {batch} | lr {lr:.3e}"
              f" | {steps_per_epoch} steps/epoch | {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params")
        m = raw.mask_grid ** 2
        seen_by = f"blocks {raw.ids}" if is_vit else "stages 1-4 (after PatchMerging)"
        print(f"local layers: {seen_by} -> grids {'/'.join(map(str, raw.grids))}, {args.target} cells "
              f"{'/'.join(map(str, raw.cells))} px | visible {int(m - pic_mask[0].sum())} of {m} "
              f"{'patches' if is_vit else 'mask units of 32 px'} | decoders "
              f"{'/'.join(f'{sum(p.numel() for p in d.parameters()) / 1e6:.3f}' for d in raw.decoder)}M")
        print(f"memory: about {need:.0f} MB needed of {free:.0f} MB free per process (check_memory)")
        if args.compile:
            print("compiling... (the first steps are slow)")

    def save():
        save_files({os.path.join(args.out, "encoder.pth"): {"model": raw.encoder.state_dict(),
                                                             "arch": raw.encoder.arch, "step": step},
                    ckpt_path: {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                "epoch": step // steps_per_epoch, "step": step, "args": vars(args)}}, step, ckpt_path)

    model.train()
    log_loss = torch.zeros((), device=device)  # summed on the device; read at log steps only (a host sync)
    log_terms = torch.zeros(4, device=device)  # the loss of each scale, finest first
    bad = torch.zeros((), device=device)  # > 0 once a loss was not finite
    logged, t0, seen, t_start, step0 = 0, time.time(), 0, time.time(), step
    bar = tqdm(total=last, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    while step < last:
        epoch, skip = divmod(step, steps_per_epoch)
        bar.set_description(f"epoch {epoch + 1}/{args.epochs}")
        loader.sampler.set_epoch(epoch, skip_batches=skip * args.accum_iter)
        for i, (img, _) in enumerate(loader):
            if i >= (steps_per_epoch - skip) * args.accum_iter:  # a last partial accumulation is not a step
                break
            micro = step * args.accum_iter + i % args.accum_iter
            # the randomness of each micro-batch (masks, drop path) is a function of (seed, micro-batch, rank),
            # so --resume continues exactly, on any number of processes
            torch.manual_seed(args.seed + 7919 * (micro * world + rank))
            img = img.to(device, non_blocking=True)
            for g in opt.param_groups:  # per-iteration schedule
                g["lr"] = mae_lr(step, total, warmup, lr, args.min_lr) * g.get("lr_scale", 1.0)
            sync = (i + 1) % args.accum_iter == 0
            with model.no_sync() if world > 1 and not sync else contextlib.nullcontext():
                with amp:
                    loss, terms = model(img)[:2]
                scaler.scale(loss / args.accum_iter).backward()  # outside autocast, as PyTorch recommends
            bad += ~torch.isfinite(loss.detach())  # checked at log steps and before saving: no per-step host sync
            log_loss += loss.detach() / args.accum_iter
            log_terms += terms.detach() / args.accum_iter
            if not sync:
                continue
            if args.clip_grad > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step, logged, seen = step + 1, logged + 1, seen + img.shape[0] * args.accum_iter * world
            bar.update()
            end_of_epoch = step % steps_per_epoch == 0
            if step % args.log_every == 0 or step >= last or end_of_epoch:
                if world > 1:
                    dist.all_reduce(log_loss), dist.all_reduce(log_terms), dist.all_reduce(bad)
                if bad.item() > 0:
                    sys.exit(f"error: the loss is not finite at step {step}; stopped without saving "
                             f"({last_good(ckpt_path)})")
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": log_loss.item() / logged / world,
                       "lr": opt.param_groups[0]["lr"], "img_per_s": round(seen / (time.time() - t0), 1),
                       "peak_mem_mb": round(peak_memory_mb(device)),
                       "loss_scales": [round(v / logged / world, 5) for v in log_terms.tolist()]}
                if master:
                    if logged == step - step0 and step < last:  # the first log step since the start (or resume)
                        bar.write(time_left(bar))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_s']:.0f}")
                    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                log_loss.zero_(), log_terms.zero_()
                logged, t0, seen = 0, time.time(), 0
            done = step // steps_per_epoch  # completed epochs, 1-based in the file names
            if master and end_of_epoch and args.vis_every and done % args.vis_every == 0:
                picture(raw, pic_img, pic_mask, os.path.join(args.out, f"{args.target}_epoch{done}.png"))
            stopping = stop_requested(world)
            if master and (stopping or step >= last or (end_of_epoch and done % args.save_every == 0)):
                save()
            if stopping:
                bar.close()
                return finish(world, master, f"interrupted at step {step}; continue with --resume", code=130)
            if step >= last:
                break
    bar.close()
    if master:
        picture(raw, pic_img, pic_mask, os.path.join(args.out, f"{args.target}_final.png"))
        data.plot_log(args.out)
    minutes = (time.time() - t_start) / 60
    finish(world, master, f"done: {step - step0} steps in {minutes:.1f} min; {args.out}/ holds ckpt.pt, encoder.pth, "
                          f"log.jsonl, loss.png, {args.target}_*.png\nfine-tune: python finetune.py --recipe localmim "
                          f"--pretrained {args.out}/encoder.pth --data {args.data}")


if __name__ == "__main__":
    catch_signals()
    main(get_args())
