"""Fine-tuning, linear probing and evaluation of a (pre-trained) ViT or Swin: the downstream test of every MIM paper.

MAE's protocol ("Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377: main_finetune.py,
main_linprobe.py, util/lr_decay.py), reused by SimMIM (arXiv 2111.09886), LocalMIM (arXiv 2303.05251) and MaskAlign
(arXiv 2211.08887) with their own numbers (`--recipe`): layer-wise LR decay, average pooling + fc_norm, head std
2e-5, drop path, MixUp/CutMix + label smoothing, RandAugment + random erasing, AdamW, per-iteration warmup + cosine.
Facts and sources: ../shared/reference/finetune.md ("ft.md" below). Without --pretrained (or with init:PATH) the same
recipe trains from scratch, layer decay 1 (MAE's scratch baselines have none): the baseline every MIM claim needs.

    python simmim.py --data cifar10 --out runs/simmim ...                         # -> runs/simmim/encoder.pth
    python finetune.py --pretrained runs/simmim/encoder.pth --data cifar10 --out runs/ft  # top-1 in runs/ft/log.jsonl
    torchrun --nproc_per_node=8 finetune.py --recipe mae --pretrained mae_pretrain_vit_base.pth --data /imagenet \
        --batch-size 32 --accum-iter 4                                            # MAE ViT-B: 83.6 (paper)
    python finetune.py --eval --pretrained simmim_finetune__swin_base__img224_window7__800ep.pth --data /imagenet
    python finetune.py --linear-probe --pretrained encoder.pth --data /imagenet   # MAE's linear probe (LARS, BN head)

Deviations from the official code, and why:
- torchvision v2 augmentation (data.py): RandAugment without timm's magnitude noise (mstd0.5) and 'inc' ops;
  v2.MixUp / v2.CutMix in a RandomChoice (timm: switch 0.5, per batch, lam corrected for clipped boxes, as here);
  label smoothing on the mixed targets, which equals timm's smoothing before mixing (both are linear).
- img_size <= 96 (CIFAR, STL-10, Tiny-ImageNet): MixUp, CutMix and random erasing default to off. They are tuned for
  100-epoch ImageNet runs; short small-image runs underfit. RandAugment m9 and label smoothing stay (the
  omihub777/ViT-CIFAR recipe: 91 % from scratch, ft.md section 10). Flags given explicitly win.
- No weight decay on 1-D tensors, biases, pos_embed, cls_token and relative-position tables, for every recipe
  (timm's beit rule); SimMIM's own ViT fine-tuning decays its per-block tables (ft.md section 3).
- Head trunc-normal std 2e-5, zero bias, for every backbone (MAE); SimMIM keeps 0.02 for Swin.
- classifier.pth is the model of the last evaluation; best_top1 (SimMIM's "Max accuracy") is only logged:
  picking weights by the held-out split would be selection on the test set.
- bf16 autocast on GPUs where the papers use fp16 / apex O1; fp32 on CPU.
"""
import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2
from tqdm import tqdm

import data
import swin
import vit

# -----------------------------------------------------------------------------------------------------------------
# Recipes (ft.md 6.1-6.2, 7). A pair is (ViT, Swin). A recipe fills only the flags the user left unset.

COMMON = dict(  # shared by the four papers: ft.md table 6.1 (timm create_transform + Mixup, MAE FINETUNE.md)
    weight_decay=0.05, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, randaug=9, batch_size=128)
RECIPES = {
    # SimMIM configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml (ViT-B: layer decay 0.65) and
    # configs/swin_base__100ep/simmim_finetune__swin_base__img224_window7__100ep.yaml (Swin-B: 0.9); BASE_LR,
    # WARMUP_LR, MIN_LR per 512 images (main_finetune.py L321-334), CLIP_GRAD 5.0, DROP_PATH 0.1, 100 / 20 epochs
    "simmim": dict(epochs=100, warmup_epochs=20, blr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7, layer_decay=(0.65, 0.9),
                   drop_path=0.1, clip_grad=5.0),
    # MAE FINETUNE.md, ViT-B: blr 5e-4 per 256, layer decay 0.65, drop path 0.1, 100 epochs, warmup 5, min_lr 1e-6
    # (main_finetune.py defaults), no clipping. MAE has no Swin: 0.9 as SimMIM / LocalMIM Swin-B
    "mae": dict(epochs=100, warmup_epochs=5, blr=5e-4, min_lr=1e-6, layer_decay=(0.65, 0.9), drop_path=0.1,
                clip_grad=0.0),
    # MaskAlign README, ViT-B: blr 3e-4, layer decay 0.55, drop path 0.2; warmup 5, min_lr 1e-6 (main_finetune.py)
    "maskalign": dict(epochs=100, warmup_epochs=5, blr=3e-4, min_lr=1e-6, layer_decay=(0.55, 0.9), drop_path=0.2,
                      clip_grad=0.0),
    # LocalMIM ViT/README.md (ViT-B 1600-ep: absolute lr 2e-3 at batch 1024, min_lr 1e-5, decay 0.65) and
    # Swin/README.md (Swin-B 400-ep pixel: 4e-3, min_lr 2.5e-7, decay 0.9); 100 / 20 epochs, drop path 0.1
    "localmim": dict(epochs=100, warmup_epochs=20, lr=(2e-3, 4e-3), min_lr=(1e-5, 2.5e-7), layer_decay=(0.65, 0.9),
                     drop_path=0.1, clip_grad=0.0),
}
# MAE LINPROBE.md / main_linprobe.py: LARS, blr 0.1 per 256 (batch 16384), wd 0, 90 epochs, warmup 10, no drop path,
# plain cross-entropy, crop + flip only (MaskAlign: blr 0.025)
LINPROBE = dict(epochs=90, warmup_epochs=10, blr=0.1, min_lr=0.0, weight_decay=0.0, batch_size=512, mixup=0.0,
                cutmix=0.0, smoothing=0.0, reprob=0.0, randaug=0, layer_decay=1.0, drop_path=0.0, clip_grad=0.0)
SMALL_IMAGES = dict(mixup=0.0, cutmix=0.0, reprob=0.0)  # img_size <= 96: see the docstring
NO_DECAY = ("pos_embed", "cls_token", "relative_position_bias_table")
PRESETS = {
    # the CPU demo: ViT-Tiny/4 (6 blocks) from scratch (or --pretrained, e.g. the encoder of `mae.py --preset tiny`)
    # on 1024 synthetic 32-px images of 10 shapes, 3 epochs, about 3 min on a fp32 core: the pipeline end to end (in
    # so few steps the top-1 stays near chance on these shapes among dead leaves; see the README)
    "tiny": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, num_images=1024,
                 batch_size=64, epochs=3, warmup_epochs=1, blr=2e-3, device="cpu", compile=False, workers=1,
                 log_every=8),
    # small images (CIFAR, 32 px): the fine-tuning of the efficacy benchmark (bench/efficacy.py) at full length. MAE's
    # recipe with the LR and layer decay its sweep picked for scratch and for MAE, LocalMIM and MaskAlign alike (2e-3
    # at batch 64, 0.75; validation split), crop + flip only (RandAugment m9 cost 10+ points in short runs)
    "cifar": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, recipe="mae", batch_size=64,
                  lr=2e-3, layer_decay=0.75, epochs=100, warmup_epochs=10, randaug=0, smoothing=0.1, drop_path=0.1),
}
EXAMPLES = """examples:
  python finetune.py --preset tiny                                    # CPU demo: from scratch on synthetic shapes
  python finetune.py --preset tiny --pretrained runs/mae/encoder.pth   # the same from `python mae.py --preset tiny`
  python finetune.py --preset cifar --pretrained runs/mae/encoder.pth --data ../shared/data/cifar10   # 32 px
  torchrun --nproc_per_node=8 finetune.py --recipe mae --pretrained mae_pretrain_vit_base.pth --batch-size 32 \\
      --accum-iter 4 --data /imagenet                                 # MAE ViT-B: 83.6
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="a named configuration (explicit flags still win; with "
                   "--pretrained the checkpoint's architecture)")
    # what to train
    p.add_argument("--pretrained", default=None, help="any checkpoint vit.py / swin.py read (ours, timm, MAE, DeiT, "
                   "DINO, SimMIM, LocalMIM, MaskAlign, torchvision, CLIP); init:PATH = PATH's architecture from "
                   "scratch (the baseline of exactly that model); none = --model from scratch")
    p.add_argument("--unsafe-load", action="store_true", help="let --pretrained run the code it pickles (only for "
                   "files you trust; public checkpoints do not need it)")
    p.add_argument("--recipe", choices=list(RECIPES), default="simmim", help="whose fine-tuning defaults to use")
    p.add_argument("--linear-probe", action="store_true", help="frozen encoder, BatchNorm + linear head, LARS (MAE)")
    p.add_argument("--probe-block", type=int, default=None, help="linear probe on the average patch token of this "
                   "block (1-based; SimMIM probes ViT-B's 8th), instead of the encoder's output")
    p.add_argument("--eval", action="store_true", help="top-1/top-5 of the --pretrained classifier, then exit")
    p.add_argument("--global-pool", choices=["avg", "token"], default=None,
                   help="ViT pooling (default: avg + fc_norm; token for the linear probe, as MAE)")
    # data and model
    p.add_argument("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | stl10 | ImageFolder root | .npz")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (downloaded)")
    p.add_argument("--num-images", type=int, default=None, help="training images: the epoch length of synthetic, "
                   "a fixed subset otherwise")
    p.add_argument("--model", default=None, help="a name of vit.py or swin.py (default vit_base_patch16_224); with "
                   "--pretrained the checkpoint sets the architecture")
    p.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's, else 224")
    p.add_argument("--model-patch-size", type=int, default=None, help="ViT patch size from scratch (e.g. 4 at 32 px)")
    p.add_argument("--depth", type=int, default=None, help="ViT blocks from scratch; fewer for CPU runs")
    p.add_argument("--window-size", type=int, default=None, help="Swin window (default: the checkpoint's or the "
                   "name's); SimMIM fine-tunes its 192-px w6 pretraining at 224 px with window 7")
    # optimisation: None = the recipe's value
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (100)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="default: the recipe's share of --epochs")
    p.add_argument("--blr", type=float, default=None, help="base LR per 256 images (SimMIM: per 512)")
    p.add_argument("--lr", type=float, default=None, help="absolute LR; overrides --blr (LocalMIM)")
    p.add_argument("--warmup-lr", type=float, default=None, help="SimMIM's WARMUP_LR (per 512 images)")
    p.add_argument("--min-lr", type=float, default=None, help="the floor of the cosine")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (0.05)")
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay (1 = off)")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth of the encoder")
    p.add_argument("--clip-grad", type=float, default=None, help="max grad norm; 0 = off")
    p.add_argument("--mixup", type=float, default=None, help="MixUp alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=None, help="CutMix alpha (0 = off)")
    p.add_argument("--smoothing", type=float, default=None, help="label smoothing")
    p.add_argument("--reprob", type=float, default=None, help="random erasing probability")
    p.add_argument("--randaug", type=int, default=None, help="RandAugment magnitude (timm's m, 1-10; 0 = off)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0 = all epochs)")
    # runtime
    p.add_argument("--out", default="runs/finetune", help="ckpt.pt, classifier.pth and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt exactly where it stopped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                   help="autocast dtype (default: bf16 where the GPU or CPU runs it natively, else none)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="model.compile() (default: on for CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seeds the head, augmentation and data order (+ rank)")
    p.add_argument("--workers", type=int, default=8, help="data loader processes (capped by the CPUs available)")
    p.add_argument("--log-every", type=int, default=50, help="optimizer steps between log lines")
    p.add_argument("--save-every", type=int, default=1, help="epochs between checkpoints (and always at the end)")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (and always at the end)")
    args = parse(p, argv)
    if args.preset and args.pretrained:  # the checkpoint decides the architecture, not the preset
        args.model = args.model if args.model != PRESETS[args.preset].get("model") else None
        for name in ("depth", "model_patch_size"):
            if getattr(args, name) == PRESETS[args.preset].get(name):
                setattr(args, name, None)
    if args.eval and (not args.pretrained or args.pretrained.startswith("init:") or args.linear_probe or args.resume):
        p.error("--eval needs --pretrained CLASSIFIER and takes neither --linear-probe nor --resume")
    if args.probe_block is not None and (not args.linear_probe or args.probe_block < 1):
        p.error(f"--probe-block {args.probe_block}: a block number >= 1, with --linear-probe")
    if args.pretrained and (args.depth or args.model_patch_size):
        p.error("--depth / --model-patch-size shape a model from scratch; with --pretrained the checkpoint does")
    for name, lo, hi in (("layer_decay", 0, 1), ("drop_path", 0, 0.99), ("reprob", 0, 1), ("smoothing", 0, 0.99),
                         ("mixup", 0, 1e9), ("cutmix", 0, 1e9), ("randaug", 0, 10), ("clip_grad", 0, 1e9)):
        v = getattr(args, name)
        if v is not None and not lo <= v <= hi:
            p.error(f"--{name.replace('_', '-')} {v}: must be in [{lo}, {hi:g}]")
    for name in ("blr", "lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    return args


def resolve(args, family, arch, scratch):
    """Fill the unset flags: LINPROBE with --linear-probe, else COMMON + RECIPES[--recipe] (+ SMALL_IMAGES at
    img_size <= 96); from scratch the layer decay is 1. A shortened --epochs keeps the recipe's warmup share."""
    rec = dict(LINPROBE) if args.linear_probe else {**COMMON, **RECIPES[args.recipe]}
    if args.img_size <= 96 and not args.linear_probe:
        rec.update(SMALL_IMAGES)
    if scratch:
        rec["layer_decay"] = 1.0
    if args.epochs is not None and args.warmup_epochs is None:
        rec["warmup_epochs"] = rec["warmup_epochs"] * args.epochs / rec["epochs"]
    for k, v in rec.items():
        if getattr(args, k) is None:
            setattr(args, k, v[family == "swin"] if isinstance(v, tuple) else v)
    if args.global_pool is None:  # MAE: average + fc_norm to fine-tune, the class token to probe; --eval: the file's
        probe_token = args.linear_probe and not args.probe_block
        args.global_pool = arch.get("global_pool", "avg") if args.eval else "token" if probe_token else "avg"
    if family == "swin" and (args.global_pool == "token" or args.probe_block):
        raise ValueError("--global-pool token and --probe-block are for ViT models; a Swin averages its last stage")
    if args.probe_block and args.probe_block > arch["depth"]:
        raise ValueError(f"--probe-block {args.probe_block}: the encoder has {arch['depth']} blocks")
    if args.warmup_epochs >= args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs:g} must be below --epochs {args.epochs}")


# -----------------------------------------------------------------------------------------------------------------
# Loading: any checkpoint layout -> our (timm) keys, resized to this run's grid/window, audited key by key

def read_arch(args):
    """(family, arch, state dict or None) of --pretrained (any layout vit.py or swin.py reads; ViT layouts are
    tried first) or, from scratch, of --model or init:PATH; then the recipe fills the flags left unset."""
    if args.pretrained:
        path = args.pretrained.removeprefix("init:")
        try:
            family, (sd, arch) = "vit", vit.load_checkpoint(path, args.unsafe_load)
        except ValueError as e:
            if "not a ViT checkpoint" not in str(e):  # refused, unreadable: reading it as a Swin would not help
                raise
            try:
                family, (sd, arch) = "swin", swin.load_checkpoint(path, args.unsafe_load)
            except ValueError:
                raise ValueError(f"{e}; not a Swin checkpoint either") from None
        sd = None if args.pretrained.startswith("init:") else sd
        if args.model and args.model not in (vit.SIZES if family == "vit" else swin.SIZES):
            raise ValueError(f"--model {args.model}: {args.pretrained} holds a {family}")
        args.img_size = args.img_size or arch["img_size"]
    else:
        args.model = args.model or "vit_base_patch16_224"
        args.img_size = args.img_size or (swin.SIZES[args.model][4] if args.model in swin.SIZES else 224)
        kw = {"window_size": args.window_size} if args.window_size and args.model in swin.SIZES else {}
        sd, arch = None, build_encoder(args, **kw).arch
        family = "swin" if "depths" in arch else "vit"
    if args.window_size and family == "vit":
        raise ValueError("--window-size applies to Swin models only")
    resolve(args, family, arch, scratch=sd is None)
    return family, arch, sd


def build_model(args, family, arch, sd, num_classes):
    """The classifier: the checkpoint's (or --model's) architecture with this run's classes, pooling, drop path.
    Returns (model, missing keys, unexpected keys), the lists None from scratch."""
    kw = dict(arch, img_size=args.img_size, num_classes=num_classes, drop_path_rate=args.drop_path)
    probe = args.linear_probe or (sd is not None and any(re.match(r"head\.(fc\.)?0\.running_mean", k) for k in sd))
    if family == "vit":
        kw["global_pool"] = args.global_pool
        kw["depth"] = args.probe_block or kw["depth"]  # SimMIM's probe: the blocks after it are never run
        if kw["pos_embed"] == "sincos":
            kw["pos_embed"] = "learn"  # MAE/LocalMIM fine-tuning: the pretrained sin-cos table becomes learnable
        if kw["rel_pos_bias"] == "shared":
            kw["rel_pos_bias"] = "block"  # SimMIM remap_pretrained_keys_vit: the shared table goes to every block
        model = vit.VisionTransformer(**kw)
    else:
        kw["window_size"] = args.window_size or kw["window_size"]  # tables resized below (SimMIM: w6 -> w7)
        model = swin.SwinTransformer(**kw)
    fc = model.head.fc if family == "swin" else model.head
    nn.init.trunc_normal_(fc.weight, std=0.01 if probe else 2e-5)  # MoCo v3 probe; MAE main_finetune.py L256-257
    nn.init.zeros_(fc.bias)
    if probe:  # MAE main_linprobe.py L217-227: BatchNorm without affine before the head (head.0 / head.fc.0)
        bn_fc = nn.Sequential(nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6), fc)
        setattr(*((model.head, "fc") if family == "swin" else (model, "head")), bn_fc)
    if sd is None:
        return model, None, None
    if not args.eval:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # MAE re-initialises the head anyway
    if family == "vit":
        if "rel_pos_bias.relative_position_bias_table" in sd:
            table = sd.pop("rel_pos_bias.relative_position_bias_table")
            sd.update({f"blocks.{i}.attn.relative_position_bias_table": table.clone() for i in range(arch["depth"])})
        sd = {k: v for k, v in sd.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < kw["depth"]}
        sd = vit.resize_state_dict(sd, model)  # pos_embed: bicubic; tables: SimMIM's geometric scheme (ft.md 4.2-4.3)
    else:
        sd = swin.resize_state_dict(sd, model)
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"{args.pretrained}: tensors of another architecture: {', '.join(shapes[:6])}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # MAE main_finetune.py L248-254 asserts the missing keys; we audit both sides. Fresh: the head, ViT's fc_norm
    # (average pooling), a Swin's final norm (LocalMIM starts it fresh). Dropped: the pre-training `norm` of a ViT
    # that pools by average (MAE deletes it; SimMIM's ViT makes it Identity). --eval takes no mismatch at all.
    ok_missing = None if args.eval else r"head\.|fc_norm\." if family == "vit" else r"head\.|norm\."
    ok_unexpected = r"norm\." if family == "vit" and args.global_pool == "avg" and not args.eval else None
    bad = ([f"missing {k}" for k in missing if not (ok_missing and re.match(ok_missing, k))]
           + [f"unexpected {k}" for k in unexpected if not (ok_unexpected and re.match(ok_unexpected, k))])
    if bad:
        raise ValueError(f"{args.pretrained}: does not fit the {family} classifier: {', '.join(bad[:8])}"
                         f"{f' (+{len(bad) - 8} more)' if len(bad) > 8 else ''}")
    return model, missing, unexpected


# -----------------------------------------------------------------------------------------------------------------
# Recipe: layer-wise LR decay (ft.md 2.1-2.2), schedules (ft.md 5), LARS (ft.md 7). simmim_lr is simmim.py's
# (SimMIM lr_scheduler.py: timm's cosine with warmup_prefix=False, measured from step 0; the multistep branch is
# its pretraining schedule): per group, the warmup start and the floor are absolute, shared by all groups

def layer_id(name, arch):
    """MAE util/lr_decay.py get_layer_id_for_vit and SimMIM optimizer.py get_vit_layer / get_swin_layer."""
    if "depths" in arch:  # Swin: ids 0 .. N+1 over its N = sum(depths) blocks
        m = re.match(r"layers\.(\d+)\.(?:blocks\.(\d+)|downsample)\.", name)
        if name.startswith("patch_embed."):
            return 0
        if not m:
            return sum(arch["depths"]) + 1  # final norm, head
        before = sum(arch["depths"][:int(m.group(1))])
        # timm's PatchMerging opens stage s; the official one closes stage s-1 and shares its last block's id
        return before + int(m.group(2)) + 1 if m.group(2) else before
    if re.match(r"(cls_token|pos_embed|patch_embed\.|norm_pre\.)", name):  # CLIP's ln_pre goes with its embedding
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else arch["depth"] + 1  # fc_norm, norm, head


def param_groups_lrd(model, weight_decay, layer_decay, skip=NO_DECAY):
    """AdamW groups per (layer id, decay?): lr_scale = layer_decay ** (N + 1 - id), weight decay as param_groups."""
    top = (sum(model.arch["depths"]) if "depths" in model.arch else model.arch["depth"]) + 1
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            i, no_wd = layer_id(name, model.arch), p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip)
            g = groups.setdefault((i, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                               "lr_scale": layer_decay ** (top - i)})
            g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def simmim_lr(step, total, warmup, lr, warmup_lr, min_lr, milestones=None):
    """Linear warmup warmup_lr -> lr over `warmup` steps; then cosine lr -> min_lr over [0, total), or, with
    milestones (steps), lr * 0.1^(number of milestones <= step)."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    if milestones is not None:
        return lr * 0.1 ** sum(step >= m for m in milestones)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total))


class LARS(torch.optim.Optimizer):
    """MAE util/lars.py (You et al. 2017): SGD with momentum where a weight matrix's update (gradient + weight decay)
    is rescaled to trust_coefficient * |w| / |update|; 1-D tensors take neither weight decay nor the rescaling."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    d = d * torch.where((w_norm > 0) & (d_norm > 0), g["trust"] * w_norm / d_norm, 1.0)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                p.add_(mu.mul_(g["momentum"]).add_(d), alpha=-g["lr"])


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
# Evaluation: top-1 / top-5 on the held-out split (MAE engine_finetune.evaluate, SimMIM validate)

@torch.no_grad()
def evaluate(model, loader, device, amp, world):
    """Percent top-1 / top-5. The loader shards rank-strided without padding; counts are summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for img, y in loader:
        img, y = img.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp:
            logits = model(img)  # (B, K)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]  # (B, 5)
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)])
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return round(100 * counts[0].item() / counts[2].item(), 4), round(100 * counts[1].item() / counts[2].item(), 4)


# -----------------------------------------------------------------------------------------------------------------
# Training loop

def main(args):
    rank, world, device = setup_distributed(args)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = prepare_out(args, master, checkpoints=not args.eval)

    try:  # user errors in data or checkpoints end with one line, not a traceback
        family, arch, sd = read_arch(args)
        if args.linear_probe:  # MAE main_linprobe.py: RandomResizedCrop (bicubic) + flip only
            train_tf = data.pretrain_transform(args.img_size, scale=(0.08, 1.0), interpolation="bicubic")
        else:
            train_tf = data.finetune_transform(args.img_size, args.randaug, args.reprob)
        val = data.build_dataset(args.data, "val", data.eval_transform(args.img_size), args.data_dir, args.img_size)
        model, missing, unexpected = build_model(args, family, arch, sd, val.num_classes)
        if not args.eval:
            train = data.build_dataset(args.data, "train", train_tf, args.data_dir, args.img_size,
                                       num_images=args.num_images)
            loader = data.build_loader(train, args.batch_size, train=True, workers=args.workers, seed=args.seed,
                                       device=device)  # in-memory images without RandAugment: batched on the device
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    val_loader = data.build_loader(val, args.batch_size, train=False, workers=args.workers, seed=args.seed)
    need, free = check_memory(blocks_of(model.arch), args, device, world)
    model.to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "none")
    log_path = os.path.join(args.out, "log.jsonl")
    if master and missing is not None:
        print(f"loaded {args.pretrained} ({family}): missing {missing}, unexpected {unexpected}")
    if args.eval:
        top1, top5 = evaluate(model, val_loader, device, amp, world)
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps({"eval": args.pretrained, "top1": top1, "top5": top5, "images": len(val)}) + "\n")
        return finish(world, master, f"{args.pretrained}: top-1 {top1:.2f} top-5 {top5:.2f} on {len(val)} images")

    if args.linear_probe:  # only the head learns; the encoder has no drop path (built with 0)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
        opt = LARS(param_groups(model, args.weight_decay), weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(param_groups_lrd(model, args.weight_decay, args.layer_decay), lr=0.0,
                                betas=(0.9, 0.999), fused=True)  # one kernel per step, CPU too (3.6x foreach there)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # loss scaling only for fp16
    batch = args.batch_size * args.accum_iter * world
    simmim = args.recipe == "simmim" and not args.linear_probe
    lr = args.lr or args.blr * batch / (512 if simmim else 256)  # SimMIM: per 512 images, MAE family: per 256
    min_lr, warmup_lr = (args.min_lr * batch / 512, args.warmup_lr * batch / 512) if simmim else (args.min_lr, 0.0)
    if not math.isfinite(lr):
        sys.exit(f"error: --blr {args.blr}: gives an LR of {lr} at batch {batch}")
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        sys.exit(f"error: --accum-iter {args.accum_iter}: more than the {len(loader)} batches of an epoch")
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    last = min(args.steps, total) if args.steps else total
    mix = [m(alpha=a, num_classes=val.num_classes) for a, m in ((args.mixup, v2.MixUp), (args.cutmix, v2.CutMix)) if a]
    mix = v2.RandomChoice(mix) if mix else None  # MixUp or CutMix per batch, each with probability 1/2

    step, best = 0, 0.0
    if args.resume:
        ckpt = resume_from(ckpt_path, args, model, opt, scaler, master)
        step, best = ckpt["step"], ckpt["best_top1"]
    raw = model  # what is saved: never the compiled or DDP wrapper (no `_orig_mod.` / `module.` prefixes)
    if args.compile:
        model.compile()  # in place, so state-dict keys stay clean
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if master:
        print(f"args: {json.dumps(vars(args))}")
        print(f"device {device} x {world} | amp {args.amp} | compile {args.compile} | batch {batch} | lr {lr:.3e}"
              f" | {steps_per_epoch} steps/epoch | {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params")
        print(f"{'linear probe' if args.linear_probe else f'recipe {args.recipe}'}: {args.epochs} epochs, warmup "
              f"{args.warmup_epochs:g}, min lr {min_lr:.2e}, layer decay {args.layer_decay}, drop path "
              f"{args.drop_path}, mixup {args.mixup} / cutmix {args.cutmix}, smoothing {args.smoothing}, "
              f"randaug m{args.randaug}, erasing {args.reprob}, clip {args.clip_grad}, pool {args.global_pool}")
        print(f"memory: about {need:.0f} MB needed of {free:.0f} MB free per process (check_memory)")
        if args.compile:
            print("compiling... (the first steps are slow)")

    def save():
        save_files({os.path.join(args.out, "classifier.pth"): {"model": raw.state_dict(), "arch": raw.arch,
                                                                "step": step, "num_classes": val.num_classes},
                    ckpt_path: {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                "epoch": step // steps_per_epoch, "step": step, "args": vars(args), "best_top1": best}},
                   step, ckpt_path)  # classifier.pth: timm layout; vit/swin.load_checkpoint read it

    model.train()
    log_loss = torch.zeros((), device=device)  # summed on the device; read at log steps only (a host sync)
    bad = torch.zeros((), device=device)  # > 0 once a loss was not finite
    logged, t0, seen, t_start, step0 = 0, time.time(), 0, time.time(), step
    bar = tqdm(total=last, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    while step < last:
        epoch, skip = divmod(step, steps_per_epoch)
        bar.set_description(f"epoch {epoch + 1}/{args.epochs}")
        loader.sampler.set_epoch(epoch, skip_batches=skip * args.accum_iter)
        for i, (img, y) in enumerate(loader):
            if i >= (steps_per_epoch - skip) * args.accum_iter:  # a last partial accumulation is not a step
                break
            micro = step * args.accum_iter + i % args.accum_iter
            # the randomness of each micro-batch (mixup, drop path) is a function of (seed, micro-batch, rank),
            # so --resume continues exactly, on any number of processes
            torch.manual_seed(args.seed + 7919 * (micro * world + rank))
            img, y = img.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mix is not None:
                img, y = mix(img, y)  # y: (B, K) mixed one-hot targets
            for g in opt.param_groups:  # per-iteration schedule; SimMIM's warmup and floor are shared by all groups
                g["lr"] = (simmim_lr(step, total, warmup, lr * g.get("lr_scale", 1.0), warmup_lr, min_lr) if simmim
                           else mae_lr(step, total, warmup, lr, min_lr) * g.get("lr_scale", 1.0))
            sync = (i + 1) % args.accum_iter == 0
            with model.no_sync() if world > 1 and not sync else contextlib.nullcontext():
                with amp:  # soft-target cross-entropy; smoothing on the mixed targets = timm's smoothing before mixing
                    loss = F.cross_entropy(model(img).float(), y, label_smoothing=args.smoothing)
                scaler.scale(loss / args.accum_iter).backward()  # outside autocast, as PyTorch recommends
            bad += ~torch.isfinite(loss.detach())  # checked at log steps and before saving: no per-step host sync
            log_loss += loss.detach() / args.accum_iter
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
                    dist.all_reduce(log_loss), dist.all_reduce(bad)
                if bad.item() > 0:
                    sys.exit(f"error: the loss is not finite at step {step}; stopped without saving "
                             f"({last_good(ckpt_path)})")
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": log_loss.item() / logged / world,
                       "lr": max(g["lr"] for g in opt.param_groups), "img_per_s": round(seen / (time.time() - t0), 1),
                       "peak_mem_mb": round(peak_memory_mb(device))}
                # evaluate every --eval-every epochs and at the end
                if step >= last or (end_of_epoch and (step // steps_per_epoch) % args.eval_every == 0):
                    rec["top1"], rec["top5"] = evaluate(raw, val_loader, device, amp, world)
                    best = rec["best_top1"] = max(best, rec["top1"])
                if master:
                    if logged == step - step0 and step < last:  # the first log step since the start (or resume)
                        bar.write(time_left(bar))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", top1=rec.get("top1", "-"))
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                log_loss.zero_()
                logged, t0, seen = 0, time.time(), 0
            stopping, done = stop_requested(world), step // steps_per_epoch
            if master and (stopping or step >= last or (end_of_epoch and done % args.save_every == 0)):
                save()
            if stopping:
                bar.close()
                return finish(world, master, f"interrupted at step {step}; continue with --resume", code=130)
            if step >= last:
                break
    bar.close()
    if master:
        data.plot_log(args.out, keys=("loss", "top1"))
    minutes = (time.time() - t_start) / 60
    top1 = next((r["top1"] for r in reversed([json.loads(x) for x in open(log_path)]) if "top1" in r), None) \
        if master else None
    finish(world, master, f"done: {step - step0} steps in {minutes:.1f} min; final top-1 {top1} (best {best}); "
                          f"{args.out}/ holds classifier.pth (the last model), ckpt.pt, log.jsonl, loss.png")


if __name__ == "__main__":
    catch_signals()
    main(get_args())
