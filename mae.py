"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., arXiv 2111.06377, CVPR 2022), on ViT.

Three quarters of the patches are removed at random; the encoder sees only the visible quarter (plus cls); a light
decoder gets the encoded patches back in place, a shared mask token everywhere else, and predicts the pixels of
every patch; the loss is the MSE on the removed patches, against per-patch normalised pixels (norm-pix). The
baseline SimMIM, LocalMIM and MaskAlign measure themselves against. This file follows facebookresearch/mae
(models_mae.py, main_pretrain.py, engine_pretrain.py, util/lr_sched.py, util/pos_embed.py) in the order of the
paper's approach (§3): masking, encoder, decoder, reconstruction target, then the recipe (§4, PRETRAIN.md).

    python mae.py --preset tiny                                                 # CPU demo, ~2 min: loss + picture
    torchrun --nproc_per_node=8 mae.py --data /imagenet --accum-iter 8          # ViT-L/16, 800 ep, batch 4096
    torchrun --nproc_per_node=8 mae.py --preset vit_base_1600 --accum-iter 8 --data /imagenet   # the released ViT-B
    python mae.py --pretrained mae_visualize_vit_large.pth --visualize --data /imagenet         # the official demo

Outputs in --out: log.jsonl, loss.png, ckpt.pt (exact --resume), encoder.pth ({'model', 'arch', 'step'}: timm keys,
loads in timm and finetune.py), recon_epoch{E}.png and recon_final.png.

Deviations from the official code, each on purpose (the README's paper notes have the details):
- bf16 autocast on GPUs instead of fp16 + GradScaler (MAE is reported to NaN in long fp16 runs: EVA#12, ConvMAE#6);
- a single process reshuffles the data every epoch (the official code calls set_epoch only when distributed, so a
  one-GPU run sees one order for all epochs); DDP needs no find_unused_parameters (every parameter is used);
- a mask ratio of 0 is refused (the official loss is 0/0 = NaN); norm-pix is on by default (the recipe's flag; the
  argparse default of main_pretrain.py is off);
- the reconstruction pictures of a norm-pix model map each predicted patch back with the true patch's mean and
  variance, as the demo would need: those statistics leak into the picture, so judge the model by fine-tuning;
- at <= 64 px the crop is data.py's padded random crop instead of RandomResizedCrop(0.2, 1) (which would upsample a
  14-px crop of a 32-px image); the `cifar` preset's small decoder and LR are measured choices (README: efficacy).
Weight decay is the official rule, quirk included: 1-D tensors and biases are exempt, the 3-D cls and mask tokens
are decayed (simmim.py exempts them); the encoder keeps the kept tokens in the order of the masking noise.
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
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import vit
import swin

# -----------------------------------------------------------------------------------------------------------------
# Arguments: PRETRAIN.md's recipe is the default (ViT-L/16, 800 epochs, 64 images x 64 GPUs = 4096 per step)

PRESETS = {
    # the released mae_pretrain_vit_{base,large,huge}.pth: 1600 epochs, norm-pix (FINETUNE.md:129)
    "vit_base_1600": dict(model="vit_base_patch16_224", epochs=1600),
    "vit_large_1600": dict(model="vit_large_patch16_224", epochs=1600),
    "vit_huge_1600": dict(model="vit_huge_patch14_224", epochs=1600),
    # the CPU demo: ViT-Tiny/4 (6 blocks) on 1024 synthetic 32-px images, 6 epochs x 16 steps, 2-3 min on a core
    "tiny": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, decoder_dim=128,
                 decoder_depth=2, decoder_heads=4, num_images=1024, batch_size=64, epochs=6, warmup_epochs=1,
                 blr=1.5e-3, device="cpu", compile=False, workers=1, log_every=8, vis_every=3),
    # small images (CIFAR, 32 px): ViT-Tiny/4, 6 blocks, a 2 x 128 decoder (MAE-Lite's narrow decoder, doubled),
    # LR 1.5e-3 at batch 256; the measurements behind it are in the README (efficacy benchmark)
    "cifar": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, decoder_dim=128,
                  decoder_depth=2, decoder_heads=4, batch_size=256, epochs=100, warmup_epochs=2, blr=1.5e-3),
}
EXAMPLES = """examples:
  python mae.py --preset tiny                                          # CPU demo on synthetic images, ~2 min
  python mae.py --preset cifar --data ../shared/data/cifar10 --epochs 30  # small-image recipe, real images
  torchrun --nproc_per_node=8 mae.py --preset vit_base_1600 --accum-iter 8 --data /imagenet   # ViT-B, 4096/step
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="a named configuration (explicit flags still win); without "
                   "it: PRETRAIN.md's ViT-L recipe")
    # data and model
    p.add_argument("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | stl10 | ImageFolder root | .npz")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (downloaded)")
    p.add_argument("--num-images", type=int, default=None, help="epoch length of synthetic; a fixed subset otherwise")
    p.add_argument("--model", default="vit_large_patch16_224", help="a ViT of vit.py, spelled as in timm")
    p.add_argument("--img-size", type=int, default=224, help="input resolution")
    p.add_argument("--model-patch-size", type=int, default=None, help="ViT patch size (default: the model name's); "
                   "e.g. 4 for 32-px images")
    p.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the model name's); fewer for CPU runs")
    p.add_argument("--decoder-dim", type=int, default=512, help="decoder width")
    p.add_argument("--decoder-depth", type=int, default=8, help="decoder blocks")
    p.add_argument("--decoder-heads", type=int, default=16, help="decoder attention heads")
    p.add_argument("--pretrained", default=None, help="start from these weights: an official mae_pretrain_vit_*.pth "
                   "(encoder; the decoder starts fresh), mae_visualize_vit_*.pth (encoder + decoder), or our ckpt.pt")
    p.add_argument("--unsafe-load", action="store_true", help="let --pretrained run the code it pickles (only for "
                   "files you trust; public MAE checkpoints do not need it)")
    p.add_argument("--visualize", action="store_true", help="only write recon_final.png of the --pretrained model")
    # method (§3)
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches removed")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="targets: each patch's pixels normalised by its own mean and variance (the recipe)")
    # optimisation (main_pretrain.py, PRETRAIN.md)
    p.add_argument("--batch-size", type=int, default=64, help="per process (recipe: 64 x 64 GPUs)")
    p.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--epochs", type=int, default=800, help="PRETRAIN.md: 800 (the releases: 1600)")
    p.add_argument("--warmup-epochs", type=float, default=40, help="linear warmup from 0, then a half cosine")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base LR; absolute LR = blr * total batch / 256")
    p.add_argument("--min-lr", type=float, default=0.0, help="the floor of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = off (MAE does not clip)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0 = all epochs)")
    # runtime
    p.add_argument("--out", default="runs/mae", help="checkpoints, log.jsonl and pictures")
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
    p.add_argument("--vis-every", type=int, default=20, help="epochs between reconstruction PNGs (0 = only at the end)")
    args = parse(p, argv)
    if args.model not in vit.SIZES:
        p.error(f"--model {args.model}: MAE's encoder is a ViT; one of {', '.join(vit.SIZES)}")
    patch = args.model_patch_size or vit.SIZES[args.model][3]
    if args.img_size % patch:
        p.error(f"--img-size {args.img_size}: not divisible by the patch size {patch}")
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio {args.mask_ratio}: must be in (0, 1); the paper uses 0.75")
    if int((args.img_size // patch) ** 2 * (1 - args.mask_ratio)) < 1:
        p.error(f"--mask-ratio {args.mask_ratio}: leaves no visible patch of the {(args.img_size // patch) ** 2}")
    if args.decoder_dim % args.decoder_heads:
        p.error(f"--decoder-dim {args.decoder_dim}: not divisible by --decoder-heads {args.decoder_heads}")
    if args.visualize and not args.pretrained:
        p.error("--visualize shows the reconstructions of a --pretrained model")
    return args


# -----------------------------------------------------------------------------------------------------------------
# §3 Masking: random sampling without replacement, a fresh subset per image (models_mae.py random_masking)

def random_masking(batch, num_patches, ratio, device, noise=None):
    """Per image, argsort of uniform noise: the int(L (1 - r)) patches of smallest noise stay visible, in that order
    (49 of 196 at 0.75). -> keep (B, K) indices, restore (B, L) the inverse permutation, mask (B, L), 1 = removed."""
    keep_count = int(num_patches * (1 - ratio))  # int() truncates, as the official code
    noise = torch.rand(batch, num_patches, device=device) if noise is None else noise  # (B, L)
    shuffle = noise.argsort(dim=1)  # ascending: small noise is kept
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep_count] = 0
    return shuffle[:, :keep_count], restore, mask.gather(1, restore)  # the mask back in raster order


def patchify(img, p):
    """(B, 3, H, W) -> (B, L, p * p * 3), each row (row, col, channel) as models_mae.py's einsum nchpwq -> nhwpqc."""
    B, C, H, W = img.shape
    return img.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), -1)


def unpatchify(x, p, size):
    """Inverse of patchify: (B, L, p * p * 3) -> (B, 3, size, size)."""
    n = size // p
    return x.view(-1, n, n, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, size, size)


# -----------------------------------------------------------------------------------------------------------------
# §3 Encoder: a plain ViT on the visible patches + cls only (vit.py's keep=), fixed 2-D sin-cos positions added
# before the masking. Decoder: the encoded patches back in place, a shared mask token elsewhere, its own sin-cos
# positions, a few narrow blocks, a linear layer to the p * p * 3 pixels of each patch. Keys as models_mae.py's.

class MAE(nn.Module):
    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True):
        super().__init__()
        self.encoder, self.norm_pix_loss = encoder, norm_pix_loss
        p, D = encoder.patch_size, encoder.embed_dim
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(vit.sincos_pos_embed(decoder_dim, encoder.grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(vit.Block(decoder_dim, decoder_heads, eps=1e-6)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * 3)
        # initialize_weights: xavier-uniform Linears (qkv as one matrix), the patch embedding as a Linear (its bias
        # keeps the conv default), cls and mask token N(0, 0.02), LayerNorm (1, 0)
        encoder.init_weights("mae")
        for m in self.modules():
            if isinstance(m, nn.Linear) and not any(m is e for e in encoder.modules()):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, latent, restore):
        """latent (B, 1 + K, D): cls + the visible patches, encoded; restore (B, L) -> prediction (B, L, p * p * 3)."""
        x = self.decoder_embed(latent)  # (B, 1 + K, d)
        B, L = restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)], 1)  # (B, L, d)
        tokens = tokens.gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))  # unshuffle: raster order
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed  # (B, 1 + L, d), cls goes through too
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # cls dropped

    def forward(self, img, ratio, noise=None):
        """-> loss, prediction (B, L, p * p * 3), mask (B, L) with 1 = removed."""
        L = self.encoder.grid[0] * self.encoder.grid[1]
        keep, restore, mask = random_masking(img.shape[0], L, ratio, img.device, noise)
        latent = self.encoder.forward_features(img, keep=keep)  # (B, 1 + K, D), after the encoder's norm
        pred = self.forward_decoder(latent, restore)
        return mae_loss(patchify(img, self.encoder.patch_size), pred, mask, self.norm_pix_loss), pred, mask


# -----------------------------------------------------------------------------------------------------------------
# §3 Reconstruction target (forward_loss): the pixels of each patch, normalised by the patch's own mean and unbiased
# variance with norm-pix (eps on the variance); MSE per patch, averaged over the removed patches only. In fp32.

def norm_pix(target):
    return (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5


def mae_loss(target, pred, mask, norm_pix_loss):
    """target, pred (B, L, p * p * 3); mask (B, L), 1 = removed."""
    target = norm_pix(target.float()) if norm_pix_loss else target.float()
    loss = ((pred.float() - target) ** 2).mean(-1)  # (B, L) per-patch MSE
    return (loss * mask).sum() / mask.sum()


def from_official(sd):
    """models_mae.py keys (the encoder at the top level) -> ours (encoder.*); ours and timm's pass through."""
    if any(k.startswith("encoder.") for k in sd):
        return sd
    enc = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
    return {("encoder." + k if k.startswith(enc) else k): v for k, v in sd.items()}


def load_pretrained(model, path, unsafe):
    """--pretrained into the full model: a file with a decoder loads strictly, an encoder-only file (the released
    mae_pretrain_*, timm, our encoder.pth) loads strictly into the encoder and leaves the decoder fresh."""
    sd, _ = vit.read_state_dict(path, unsafe)
    sd = from_official({k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))})
    full = "decoder_embed.weight" in sd
    target = model if full else model.encoder
    sd = sd if full else {k.removeprefix("encoder."): v for k, v in sd.items()}
    try:
        target.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"--pretrained {path}: does not fit this model ({' '.join(str(e).split())[:200]})") from None
    return "encoder + decoder" if full else "encoder only (the decoder starts fresh)"


@torch.no_grad()
def save_reconstruction(model, img, noise, ratio, path):
    """The official demo's rows: input, masked input, prediction (visible patches too: they carry no loss),
    prediction pasted into the visible patches. Norm-pix predictions use each true patch's mean and variance."""
    was_training = model.training
    model.eval()
    _, pred, mask = model(img, ratio, noise)
    model.train(was_training)
    p, size = model.encoder.patch_size, img.shape[-1]
    target = patchify(img, p)
    if model.norm_pix_loss:
        pred = pred.float() * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    pred = unpatchify(pred.float(), p, size)  # (n, 3, H, W)
    hidden = unpatchify(mask[..., None].expand(-1, -1, p * p * 3), p, size)  # (n, 3, H, W), 1 = removed
    shown = data.denormalize(img)
    rows = [shown, shown * (1 - hidden) + 0.5 * hidden, data.denormalize(pred),
            shown * (1 - hidden) + data.denormalize(pred) * hidden]
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


def mae_lr(step, total, warmup, lr, min_lr):
    """Linear warmup from 0, then a half-cycle cosine to min_lr; per optimizer step (MAE util/lr_sched.py)."""
    if step < warmup:
        return lr * step / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -----------------------------------------------------------------------------------------------------------------
# Training loop (main_pretrain.py, engine_pretrain.py)

def main(args):
    rank, world, device = setup_distributed(args)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = prepare_out(args, master)

    try:  # user errors in the data or checkpoints end with one line, not a traceback
        encoder = build_encoder(args, pos_embed="sincos")
        model = MAE(encoder, args.decoder_dim, args.decoder_depth, args.decoder_heads, args.norm_pix_loss)
        loaded = load_pretrained(model, args.pretrained, args.unsafe_load) if args.pretrained else None
        dataset = data.build_dataset(args.data, "train", data.pretrain_transform(args.img_size, scale=(0.2, 1.0),
                                     interpolation="bicubic"), args.data_dir, args.img_size, num_images=args.num_images)
        loader = data.build_loader(dataset, args.batch_size, train=True, workers=args.workers, seed=args.seed,
                                   device=device)  # in-memory images: batched on the device
        shown = data.build_dataset(args.data, "train", data.eval_transform(args.img_size), args.data_dir,
                                   args.img_size, num_images=args.num_images)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    L = encoder.grid[0] * encoder.grid[1]
    need, free = check_memory(blocks_of(encoder.arch, 1 + int(L * (1 - args.mask_ratio))) +
                              [(1 + L, args.decoder_dim, args.decoder_heads, 1 + L)] * args.decoder_depth,
                              args, device, world)
    model.to(device)
    # the pictures: the same images (one per class where there are classes, un-augmented) and masks every time
    vis_img = torch.stack([shown[i][0] for i in data.spread(shown.labels, 8)]).to(device)
    vis_noise = torch.rand(len(vis_img), L, generator=torch.Generator().manual_seed(args.seed)).to(device)
    if args.visualize:
        if master:
            save_reconstruction(model, vis_img, vis_noise, args.mask_ratio, os.path.join(args.out, "recon_final.png"))
        return finish(world, master, f"{args.pretrained} ({loaded}): wrote {args.out}/recon_final.png")

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=0.0, betas=(0.9, 0.95),
                            fused=True)  # one kernel per step, CPU too (3.6x foreach there)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # loss scaling only for fp16
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "none")
    batch = args.batch_size * args.accum_iter * world
    lr = args.blr * batch / 256  # main_pretrain.py: the linear scaling rule
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
    if args.compile:
        model.compile()  # in place, so state-dict keys stay clean
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if master:
        print(f"args: {json.dumps(vars(args))}")
        print(f"device {device} x {world} | amp {args.amp} | compile {args.compile} | batch {batch} | lr {lr:.3e}"
              f" | {steps_per_epoch} steps/epoch | {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params")
        print(f"mask: {L - int(L * (1 - args.mask_ratio))} of {L} patches removed | encoder: {len(encoder.blocks)} "
              f"blocks x {encoder.embed_dim} on cls + {int(L * (1 - args.mask_ratio))} | decoder: "
              f"{args.decoder_depth} x {args.decoder_dim} on cls + {L} | target: "
              f"{'norm-pix' if args.norm_pix_loss else 'pixels'}" + (f" | from {args.pretrained} ({loaded})"
                                                                      if loaded else ""))
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
            # the randomness of each micro-batch (masks) is a function of (seed, micro-batch, rank), so --resume
            # continues exactly, on any number of processes
            torch.manual_seed(args.seed + 7919 * (micro * world + rank))
            img = img.to(device, non_blocking=True)
            for g in opt.param_groups:  # per-iteration schedule (util/lr_sched.py)
                g["lr"] = mae_lr(step, total, warmup, lr, args.min_lr)
            sync = (i + 1) % args.accum_iter == 0
            with model.no_sync() if world > 1 and not sync else contextlib.nullcontext():
                with amp:
                    loss = model(img, args.mask_ratio)[0]
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
                       "lr": opt.param_groups[0]["lr"], "img_per_s": round(seen / (time.time() - t0), 1),
                       "peak_mem_mb": round(peak_memory_mb(device))}
                if master:
                    if logged == step - step0 and step < last:  # the first log step since the start (or resume)
                        bar.write(time_left(bar))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_s']:.0f}")
                    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                log_loss.zero_()
                logged, t0, seen = 0, time.time(), 0
            done = step // steps_per_epoch  # completed epochs, 1-based in the file names
            if master and end_of_epoch and args.vis_every and done % args.vis_every == 0:
                save_reconstruction(raw, vis_img, vis_noise, args.mask_ratio,
                                    os.path.join(args.out, f"recon_epoch{done}.png"))
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
        save_reconstruction(raw, vis_img, vis_noise, args.mask_ratio, os.path.join(args.out, "recon_final.png"))
        data.plot_log(args.out)
    minutes = (time.time() - t_start) / 60
    finish(world, master, f"done: {step - step0} steps in {minutes:.1f} min; {args.out}/ holds ckpt.pt, encoder.pth, "
                          f"log.jsonl, loss.png, recon_*.png\nfine-tune: python finetune.py --recipe mae --pretrained "
                          f"{args.out}/encoder.pth --data {args.data}")


if __name__ == "__main__":
    catch_signals()
    main(get_args())
