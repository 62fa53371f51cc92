"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., arXiv 2111.09886, CVPR 2022), on ViT and Swin.

Random 32x32 blocks of the image are hidden behind a learnable mask token; the encoder sees every token; a linear
head (1x1 conv + PixelShuffle) regresses the normalised RGB pixels; the loss is L1 on the masked pixels only.
This file follows microsoft/SimMIM (models/simmim.py, data/data_simmim.py, optimizer.py, lr_scheduler.py,
main_simmim.py and the four pretraining yamls), top to bottom in the order of the paper's approach (§3):
masking strategy (§3.2), encoder (§3.1), prediction head (§3.3), prediction target and loss (§3.4), recipe (§4.1).

    torchrun --nproc_per_node=8 simmim.py --preset vit_base_800 --batch-size 256 --data /imagenet  # ViT-B, 2048/step
    torchrun --nproc_per_node=8 simmim.py --preset swin_base_100 --accum-iter 2 --data /imagenet  # Swin-B, §4.1
    python simmim.py --preset tiny                     # CPU demo: ViT-Tiny/4 on synthetic 32-px images, ~2 min

Outputs in --out: log.jsonl (step, epoch, loss, lr, grad_norm, img_per_s, peak_mem_mb), ckpt.pt (exact --resume),
encoder.pth ({'model', 'arch'}: loads in timm / finetune.py), recon_epoch{E}.png and recon_final.png.

Deviations from the official code, each on purpose (details in the README):
- weight decay: none on 1-D tensors, biases, mask/cls tokens, pos_embed and every relative_position_bias_table; the
  official name matching misses some (Swin decays all RPB tables, ViT its mask_token and shared RPB table);
- masks drawn on the device in one batched op (same distribution as the numpy MaskGenerator; static shapes);
- bf16 autocast instead of apex O1; one clip per optimizer step (the official accumulation clips every micro-batch);
  step t runs at lr(t) (the official scheduler lags one step); TF32 matmuls on CUDA; DDP's default
  broadcast_buffers (harmless: every buffer here is a constant);
- the ViT's k bias is a slot of timm's qkv.bias instead of a fixed zero. The function is the same in exact
  arithmetic (a key bias shifts every logit of a query row equally: the softmax ignores it), but in floating point
  its gradient is ~1e-13 (fp32) or ~1e-9 (bf16), which AdamW normalises: after 50 steps at LR 1e-3 it has moved to
  ~6e-7 (fp32) or ~3e-3 (bf16), still without effect on the output beyond rounding.
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


# -----------------------------------------------------------------------------------------------------------------
# Arguments: the official configs are the defaults (config.py + yaml); --preset picks one pretraining yaml exactly

PRESETS = {  # all of them: warmup 10 epochs, mask 32 px / 0.6, AdamW wd 0.05, clip 5, 128 images per GPU x 16 GPUs
    # configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml (MIN_LR: config.py's 5e-6, unused)
    "vit_base_800": dict(model="vit_base_patch16_224", img_size=224, epochs=800, blr=1e-4, warmup_lr=5e-7,
                         min_lr=5e-6, schedule="multistep", milestones=[700], drop_path=0.1),
    # configs/swin_base__100ep/simmim_pretrain__swin_base__img192_window6__100ep.yaml (the paper's §4.1 ablations)
    "swin_base_100": dict(model="swin_base_patch4_window6_192", img_size=192, epochs=100, blr=2e-4, warmup_lr=1e-6,
                          min_lr=1e-5, schedule="cosine", drop_path=0.0),
    # configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml
    "swin_base_800": dict(model="swin_base_patch4_window6_192", img_size=192, epochs=800, blr=1e-4, warmup_lr=5e-7,
                          min_lr=5e-6, schedule="multistep", milestones=[700], drop_path=0.0),
    # configs/swin_large__800ep/simmim_pretrain__swin_large__img192_window12__800ep.yaml
    "swin_large_800": dict(model="swin_large_patch4_window12_192", img_size=192, epochs=800, blr=1e-4,
                           warmup_lr=5e-7, min_lr=5e-6, schedule="multistep", milestones=[700], drop_path=0.0),
    # the CPU demo: ViT-Tiny/4 (6 blocks) on 512 synthetic 32-px images, 4-px mask blocks, 2-3 min on a core
    "tiny": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, mask_patch_size=4,
                 num_images=512, batch_size=32, epochs=6, warmup_epochs=1, blr=1.6e-2, device="cpu",
                 compile=False, workers=1, log_every=8, vis_every=3),
    # small images (CIFAR, 32 px): ViT-Tiny/4 (6 blocks), timm's plain ViT, so that every method of the efficacy
    # benchmark (bench/efficacy.py) fine-tunes the same architecture. Mask blocks of 2 x 2 tokens (8 px), as the
    # official ViT-B config (32-px blocks, 16-px patches), and batch 64 at LR 2.5e-4 (4x the steps of batch 256):
    # of 5 settings, 6 epochs each, this one fine-tuned best on the benchmark's validation split (10 % labels,
    # LR 1e-3): 33.35 % against 28.35 (4-px blocks, batch 256), 31.15 (8 px), 30.4 (4 px + --norm-target 7),
    # 31.7 (8 px + --norm-target 7); scratch 33.5. It still does not beat scratch there (README, Results)
    "cifar": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, mask_patch_size=8,
                  vit_variant="plain", batch_size=64, epochs=100, warmup_epochs=2, blr=2e-3),
}
EXAMPLES = """examples:
  python simmim.py --preset tiny                                              # CPU demo, synthetic images, ~2 min
  torchrun --nproc_per_node=8 simmim.py --preset vit_base_800 --batch-size 256 --data /imagenet   # ViT-B, 2048/step
  torchrun --nproc_per_node=8 simmim.py --mask-ratio 0.6 --patch 32 --data /imagenet  # the 100-epoch recipe, §4.1
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="one official pretraining config (explicit flags still win); "
                   "without it: the §4.1 recipe (100 ep, cosine) on --model")
    # data and model
    p.add_argument("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | stl10 | ImageFolder root | .npz")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (downloaded)")
    p.add_argument("--num-images", type=int, default=None, help="epoch length of synthetic; a fixed subset otherwise")
    p.add_argument("--model", default="vit_base_patch16_224", help="a name of vit.py or swin.py, spelled as in timm")
    p.add_argument("--img-size", type=int, default=None, help="default: the model name's (224; 192 for *_192)")
    p.add_argument("--model-patch-size", type=int, default=None, help="ViT patch size (default: the model name's); "
                   "e.g. 4 for 32-px images")
    p.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the model name's); fewer for CPU runs")
    p.add_argument("--window-size", type=int, default=None, help="Swin window (default: the model name's)")
    p.add_argument("--vit-variant", choices=["simmim", "plain"], default="simmim",
                   help="simmim: the paper's ViT-B (shared relative position bias, LayerScale 0.1, no absolute "
                        "position embedding); plain: timm's vit_* (learned position embedding)")
    p.add_argument("--drop-path", type=float, default=None, help="default: 0.1 for ViT, 0.0 for Swin (the yamls)")
    # masking (data/data_simmim.py) and target (§3.4)
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of the mask blocks hidden (ceil)")
    p.add_argument("--mask-patch-size", "--patch", type=int, default=32, help="side of a mask block in pixels")
    p.add_argument("--norm-target", action="store_true", help="standardise each target pixel by its neighbourhood "
                   "(microsoft/Swin-Transformer's SimMIM; the paper does not)")
    p.add_argument("--norm-target-patch-size", type=int, default=47, help="odd side of that neighbourhood")
    # optimisation (config.py + yamls)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--epochs", type=int, default=100, help="§4.1: 100 (the 800-epoch presets)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup from --warmup-lr")
    p.add_argument("--blr", type=float, default=2e-4, help="BASE_LR; absolute LR = blr * total batch / 512")
    p.add_argument("--warmup-lr", type=float, default=1e-6, help="WARMUP_LR, scaled like --blr")
    p.add_argument("--min-lr", type=float, default=1e-5, help="MIN_LR, scaled like --blr (cosine only)")
    p.add_argument("--schedule", choices=["cosine", "multistep"], default="cosine", help="after the warmup")
    p.add_argument("--milestones", type=int, nargs="+", default=[700], help="multistep: epochs where the LR x0.1")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--clip-grad", type=float, default=5.0, help="max grad norm; 0 = off")
    p.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0 = all epochs)")
    # runtime
    p.add_argument("--out", default="runs/simmim", help="checkpoints, log.jsonl and pictures")
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
    p.add_argument("--vis-every", type=int, default=10, help="epochs between reconstruction PNGs (0 = only at the end)")
    args = parse(p, argv)

    if args.model in vit.SIZES:
        patch = args.model_patch_size or vit.SIZES[args.model][3]
        args.img_size = args.img_size or 224
        if args.window_size:
            p.error("--window-size applies to Swin models only")
    elif args.model in swin.SIZES:
        patch = 4  # Swin's patch embedding; the encoder's output stride is 32
        args.img_size = args.img_size or swin.SIZES[args.model][4]
    else:
        p.error(f"--model {args.model}: choose one of {', '.join(list(vit.SIZES) + list(swin.SIZES))}")
    m = args.mask_patch_size
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio {args.mask_ratio}: must be in (0, 1); the paper uses 0.6")
    if m <= 0 or m % patch:
        p.error(f"--mask-patch-size {m}: must be a multiple of the model's patch size {patch}")
    if args.img_size % m:
        p.error(f"--img-size {args.img_size}: must be divisible by --mask-patch-size {m}")
    blocks = (args.img_size // m) ** 2
    if mask_count(blocks, args.mask_ratio) >= blocks:
        p.error(f"--mask-ratio {args.mask_ratio} with {blocks} mask block(s) of {m} px hides the whole image; "
                f"use a smaller --mask-patch-size (e.g. {max(patch, args.img_size // 4)}) or ratio")
    if args.norm_target_patch_size < 3 or args.norm_target_patch_size % 2 == 0:
        p.error(f"--norm-target-patch-size {args.norm_target_patch_size}: must be odd and >= 3 (default 47)")
    if args.schedule == "multistep" and min(args.milestones) < args.warmup_epochs:
        p.error(f"--milestones {args.milestones}: must not fall inside the {args.warmup_epochs} warmup epochs")
    if args.drop_path is None:
        args.drop_path = 0.1 if args.model in vit.SIZES else 0.0
    return args


# -----------------------------------------------------------------------------------------------------------------
# §3.2 Masking strategy: random masking of m x m pixel blocks (m = 32), a fixed number per image

def mask_count(blocks, ratio):
    """data_simmim.py L35, int(np.ceil(token_count * mask_ratio)), in that order of the product: 0.6 of 49 -> 30.
    (ratio * blocks rounds differently in 33 cases of ratios 0.01-0.99 and grids 1-32, e.g. 0.55 of 100: 56 here.)"""
    return math.ceil(blocks * ratio)


def block_masks(batch, grid, ratio, device, generator=None):
    """(B, grid, grid) bool, True = masked: exactly mask_count(grid^2, ratio) blocks per image, drawn independently
    and uniformly (data_simmim.py's MaskGenerator: the first mask_count entries of a random permutation)."""
    count = mask_count(grid * grid, ratio)
    perm = torch.rand(batch, grid * grid, device=device, generator=generator).argsort(1)  # a permutation per image
    return (perm < count).view(batch, grid, grid)  # the blocks that draw one of the first `count` ranks


def upsample(mask, k):
    """(B, h, w) -> (B, h*k, w*k) nearest: blocks -> model tokens (k = m / patch), tokens -> pixels (k = patch)."""
    return mask.repeat_interleave(k, 1).repeat_interleave(k, 2)


def pixel_dist(visible, m):
    """visible (n, r, r) bool blocks of m px -> (n, S, S) Euclidean distance from every pixel centre to the nearest
    visible pixel centre (0 on visible pixels; what scipy's distance_transform_edt gives). Exact and separable: a
    block is a rectangle, so the distance to it is the hypot of the per-axis gaps; first the nearest visible block
    along x within each row of blocks, then the nearest row of blocks along y."""
    S = visible.shape[-1] * m
    px, lo = torch.arange(S)[:, None], torch.arange(visible.shape[-1])[None] * m  # pixels, first pixel of each block
    gap = ((lo - px).clamp(min=0) + (px - lo - m + 1).clamp(min=0)).float() ** 2  # (S, r) squared gap, pixel->block
    row = torch.where(visible[:, :, None, :], gap[None, None], math.inf).amin(-1)  # (n, r, S): row of blocks j, x
    return (gap[None, :, :, None] + row[:, None]).amin(2).sqrt()  # (n, S, r, S) -> (n, S, S): [y, x]


def avg_dist(img_size, mask_patch_size, ratio, n=256, seed=0):
    """The paper's AvgDist (its masking study, Fig. 3): the mean distance in pixels from a masked pixel to the
    nearest visible one, over n masks of this file's generator. 224 px / 32 / 0.6 -> 15.1; 192 / 32 / 0.6 -> 15.4."""
    m, r = mask_patch_size, img_size // mask_patch_size
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, 2 ** 24 // (img_size * img_size * r))  # bounds the (chunk, S, r, S) intermediate to 64 MB
    total, count = 0.0, 0
    for i in range(0, n, chunk):
        visible = ~block_masks(min(chunk, n - i), r, ratio, "cpu", g)
        masked = ~upsample(visible, m)
        total += pixel_dist(visible, m)[masked].sum().item()
        count += masked.sum().item()
    return total / count


# -----------------------------------------------------------------------------------------------------------------
# §3.1 Encoder architecture: ViT or Swin on all tokens, masked ones replaced by one learnable mask token;
# §3.3 Prediction head: one linear layer per output feature, i.e. a 1x1 conv to stride^2 * 3 channels + PixelShuffle

class SimMIM(nn.Module):
    def __init__(self, encoder, norm_target=0):
        super().__init__()
        self.encoder = encoder
        self.vit = isinstance(encoder, vit.VisionTransformer)
        if self.vit:  # ViT-B/16: 768 channels, tokens of 16 px, features of 16 px
            dim = out_dim = encoder.embed_dim
            self.patch = self.stride = encoder.patch_size
        else:  # Swin-B: 128 channels at 4 px in, 1024 channels at 32 px out
            dim, out_dim = encoder.arch["embed_dim"], encoder.num_features
            self.patch, self.stride = encoder.arch["patch_size"], encoder.stride
        self.norm_target = norm_target  # 0 = off, else the odd neighbourhood size of local_norm
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # the head keeps PyTorch's default init (the official code never re-initialises it); keys decoder.0.*
        self.decoder = nn.Sequential(nn.Conv2d(out_dim, self.stride ** 2 * 3, kernel_size=1),
                                     nn.PixelShuffle(self.stride))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """As the official encoders. Swin: swin.py's init is the official one already; the mask token is
        trunc_normal(0.02) (its +-2 bound is absolute, so untruncated in effect). ViT (VisionTransformerForSimMIM):
        its `_trunc_normal_` override truncates at +-1 std, so every Linear/Conv weight and the tokens get
        std ~0.0108 (max 0.02); then fix_init_weight divides block i's attn.proj and mlp.fc2 by sqrt(2 i), 1-based.
        Relative position tables stay zero, LayerScale at 0.1."""
        if not self.vit:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            return
        enc = self.encoder
        for m in enc.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        for t in (enc.cls_token, enc.pos_embed, self.mask_token):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)
        for i, blk in enumerate(enc.blocks, 1):
            blk.attn.proj.weight.div_(math.sqrt(2 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2 * i))

    def reconstruct(self, img, mask):
        """img (B, 3, H, W), mask (B, H/p, W/p) bool at token resolution -> prediction (B, 3, H, W)."""
        if self.vit:  # the mask token replaces raw patch embeddings, before the cls token is prepended
            x = self.encoder.forward_features(img, mask=mask, mask_token=self.mask_token)  # (B, 1 + N, D)
            x = x[:, self.encoder.num_prefix:]  # the cls output is not used
            z = x.transpose(1, 2).unflatten(2, self.encoder.grid)  # (B, D, H/16, W/16)
        else:  # Swin: after the patch-embed LayerNorm; all 4 stages and the final norm
            z = self.encoder.forward_features(img, mask=mask, mask_token=self.mask_token)  # (B, H/32, W/32, C)
            z = z.permute(0, 3, 1, 2)  # (B, C, H/32, W/32)
        return self.decoder(z)  # (B, s*s*3, h, w) -> (B, 3, H, W): every feature predicts its s x s x 3 pixels

    def forward(self, img, mask):
        pred = self.reconstruct(img, mask)
        pixels = upsample(mask, self.patch).unsqueeze(1)  # (B, 1, H, W), 1 = masked
        return simmim_loss(img, pred, pixels, self.norm_target)


# -----------------------------------------------------------------------------------------------------------------
# §3.4 Prediction target: the raw (ImageNet-normalised) pixels, L1 on the masked pixels only

def local_norm(x, k):
    """microsoft/Swin-Transformer models/simmim.py norm_targets: each pixel standardised by the mean and unbiased
    variance of its k x k neighbourhood (cut at the borders). Returns (normalised x, mean, std)."""
    pool = lambda t: F.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)  # noqa: E731
    mean = pool(x)
    n = F.avg_pool2d(torch.ones_like(x), k, stride=1, padding=k // 2, count_include_pad=True) * k * k  # valid pixels
    std = (((pool(x * x) - mean ** 2) * n / (n - 1)).clamp(min=0) + 1e-6) ** 0.5
    return (x - mean) / std, mean, std


def simmim_loss(img, pred, mask, norm_target=0):
    """§3.4: L = |y_M - x_M|_1 / Omega(x_M). img, pred (B, 3, H, W); mask (B, 1, H, W), 1 = masked. Exactly the
    official normalisation: sum over masked pixels and channels / (masked pixels + 1e-5) / 3. In fp32."""
    target = local_norm(img.float(), norm_target)[0] if norm_target else img.float()
    l1 = (target - pred.float()).abs()  # (B, 3, H, W)
    return (l1 * mask).sum() / (mask.sum() + 1e-5) / 3


@torch.no_grad()
def save_reconstruction(model, img, mask, path):
    """A PNG grid, one column per image: input, masked input, prediction, prediction pasted into the visible
    pixels; de-normalised. With --norm-target the prediction is mapped back with the input's local statistics."""
    model.eval()
    pred = model.reconstruct(img, mask).float()  # (n, 3, H, W)
    model.train()
    if model.norm_target:
        _, mean, std = local_norm(img, model.norm_target)
        pred = pred * std + mean
    pixels = upsample(mask, model.patch).unsqueeze(1).float()  # (n, 1, H, W)
    shown, pred = data.denormalize(img), data.denormalize(pred)
    rows = [shown, shown * (1 - pixels) + 0.5 * pixels, pred, shown * (1 - pixels) + pred * pixels]  # masked: grey
    data.save_grid(rows, ["input", "masked", "prediction", "pred. + visible"], path)


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



# §4.1 / lr_scheduler.py: per-iteration schedule; the cosine is measured from step 0 (timm CosineLRScheduler with
# warmup_prefix=False), not from the end of the warmup as in MAE
NO_DECAY = ("mask_token", "cls_token", "pos_embed", "relative_position_bias_table")


def simmim_lr(step, total, warmup, lr, warmup_lr, min_lr, milestones=None):
    """Linear warmup warmup_lr -> lr over `warmup` steps; then cosine lr -> min_lr over [0, total), or, with
    milestones (steps), lr * 0.1^(number of milestones <= step)."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    if milestones is not None:
        return lr * 0.1 ** sum(step >= m for m in milestones)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total))


# -----------------------------------------------------------------------------------------------------------------
# Training loop (main_simmim.py)

def main(args):
    rank, world, device = setup_distributed(args)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = prepare_out(args, master)

    try:  # user errors in the model, data or checkpoints end with one line, not a traceback
        kw = dict(drop_path_rate=args.drop_path)
        if args.model in vit.SIZES and args.vit_variant == "simmim":  # the official ViT-B pretraining config
            kw.update(pos_embed="none", rel_pos_bias="shared", init_values=0.1)
        if args.window_size:
            kw.update(window_size=args.window_size)
        encoder = build_encoder(args, **kw)
        dataset = data.build_dataset(args.data, "train", data.pretrain_transform(args.img_size), args.data_dir,
                                     args.img_size, num_images=args.num_images)
        loader = data.build_loader(dataset, args.batch_size, train=True, workers=args.workers, seed=args.seed,
                                   device=device)  # in-memory images: batched on the device
        shown = data.build_dataset(args.data, "train", data.eval_transform(args.img_size), args.data_dir,
                                   args.img_size, num_images=args.num_images)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    need, free = check_memory(blocks_of(encoder.arch), args, device, world)
    model = SimMIM(encoder, args.norm_target_patch_size if args.norm_target else 0)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, NO_DECAY), lr=0.0, betas=(0.9, 0.999),
                            fused=True)  # one kernel per step, CPU too (3.6x foreach there)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # loss scaling only for fp16
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "none")
    batch = args.batch_size * args.accum_iter * world
    lr, warmup_lr, min_lr = (x * batch / 512 for x in (args.blr, args.warmup_lr, args.min_lr))  # main_simmim.py
    if not math.isfinite(lr):
        sys.exit(f"error: --blr {args.blr}: gives an LR of {lr} at batch {batch}")
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        sys.exit(f"error: --accum-iter {args.accum_iter}: more than the {len(loader)} batches of an epoch")
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    last = min(args.steps, total) if args.steps else total
    milestones = [m * steps_per_epoch for m in args.milestones] if args.schedule == "multistep" else None
    grid = args.img_size // args.mask_patch_size  # mask blocks per side
    scale = args.mask_patch_size // model.patch  # model tokens per mask block side

    step = 0
    if args.resume:
        step = resume_from(ckpt_path, args, model, opt, scaler, master)["step"]
    raw = model  # what is saved: never the compiled or DDP wrapper (no `_orig_mod.` / `module.` prefixes)
    if args.compile:
        model.compile()  # in place, so state-dict keys stay clean
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if master:
        print(f"args: {json.dumps(vars(args))}")
        print(f"device {device} x {world} | amp {args.amp} | compile {args.compile} | batch {batch} | lr {lr:.3e}"
              f" (warmup {warmup_lr:.2e}, min {min_lr:.2e}, {args.schedule}) | {steps_per_epoch} steps/epoch"
              f" | {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params")
        s = args.img_size
        print(f"mask: {mask_count(grid * grid, args.mask_ratio)} of {grid}x{grid} blocks of {args.mask_patch_size} px"
              f" | AvgDist {avg_dist(s, args.mask_patch_size, args.mask_ratio):.1f} px (paper: best at 10-20 px on"
              f" 192-px images; ~{10 * s / 192:.1f}-{20 * s / 192:.1f} px at {s} px)")
        print(f"memory: about {need:.0f} MB needed of {free:.0f} MB free per process (check_memory)")
        if args.compile:
            print("compiling... (the first steps are slow)")
    # the pictures always show the same images (one per class where there are classes, un-augmented), same masks
    vis_img = torch.stack([shown[i][0] for i in data.spread(shown.labels, 8)]).to(device)
    g = torch.Generator().manual_seed(args.seed)
    vis_mask = upsample(block_masks(len(vis_img), grid, args.mask_ratio, "cpu", g), scale).to(device)

    def save():
        save_files({os.path.join(args.out, "encoder.pth"): {"model": raw.encoder.state_dict(),
                                                             "arch": raw.encoder.arch, "step": step},
                    ckpt_path: {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                "epoch": step // steps_per_epoch, "step": step, "args": vars(args)}}, step, ckpt_path)

    model.train()
    log_loss = torch.zeros((), device=device)  # summed on the device; read at log steps only (a host sync)
    log_norm = torch.zeros((), device=device)  # gradient norm before clipping, as the official logs print it
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
            mask = upsample(block_masks(img.shape[0], grid, args.mask_ratio, device), scale)  # (B, H/p, W/p)
            for group in opt.param_groups:  # per-iteration schedule
                group["lr"] = simmim_lr(step, total, warmup, lr, warmup_lr, min_lr, milestones)
            sync = (i + 1) % args.accum_iter == 0
            with model.no_sync() if world > 1 and not sync else contextlib.nullcontext():
                with amp:
                    loss = model(img, mask)
                scaler.scale(loss / args.accum_iter).backward()  # outside autocast, as PyTorch recommends
            bad += ~torch.isfinite(loss.detach())  # checked at log steps and before saving: no per-step host sync
            log_loss += loss.detach() / args.accum_iter
            if not sync:
                continue
            scaler.unscale_(opt)
            log_norm += nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad if args.clip_grad > 0 else math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step, logged, seen = step + 1, logged + 1, seen + img.shape[0] * args.accum_iter * world
            bar.update()
            end_of_epoch = step % steps_per_epoch == 0
            if step % args.log_every == 0 or step >= last or end_of_epoch:
                if world > 1:
                    dist.all_reduce(log_loss), dist.all_reduce(bad)
                if bad.item() > 0:
                    sys.exit(f"error: the loss is not finite at step {step}; stopped without saving "
                             f"({last_good(ckpt_path)})")
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": log_loss.item() / logged / world,
                       "lr": opt.param_groups[0]["lr"], "grad_norm": log_norm.item() / logged,
                       "img_per_s": round(seen / (time.time() - t0), 1), "peak_mem_mb": round(peak_memory_mb(device))}
                if master:
                    if logged == step - step0 and step < last:  # the first log step since the start (or resume)
                        bar.write(time_left(bar))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_s']:.0f}")
                    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                log_loss.zero_(), log_norm.zero_()
                logged, t0, seen = 0, time.time(), 0
            done = step // steps_per_epoch  # completed epochs, 1-based in the file names
            if master and end_of_epoch and args.vis_every and done % args.vis_every == 0:
                save_reconstruction(raw, vis_img, vis_mask, os.path.join(args.out, f"recon_epoch{done}.png"))
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
        save_reconstruction(raw, vis_img, vis_mask, os.path.join(args.out, "recon_final.png"))
        data.plot_log(args.out)
    minutes = (time.time() - t_start) / 60
    finish(world, master, f"done: {step - step0} steps in {minutes:.1f} min; {args.out}/ holds ckpt.pt, encoder.pth, "
                          f"log.jsonl, loss.png, recon_*.png\nfine-tune: python finetune.py --recipe simmim "
                          f"--pretrained {args.out}/encoder.pth --data {args.data}")


if __name__ == "__main__":
    catch_signals()
    main(get_args())
