"""MaskAlign: masked image modeling without reconstruction, in one file.

Xue et al., "Stare at What You See: Masked Image Modeling without Reconstruction", CVPR 2023, arXiv 2211.08887;
official code OpenDriveLab/maskalign @ 4cb577f (models_pretrain.py, cited as L<line>). A ViT student that sees only
the visible patches (+ cls) learns to match the multi-level features a frozen teacher computes on the whole image,
through a Dynamic Alignment module. Contrast with simmim.py: SimMIM encodes all patches with mask tokens and
regresses the raw pixels of the *masked* ones; here there is no mask token, no decoder and no loss on masked
positions — the target is the teacher's features at the *visible* positions, and the student encodes 30 % of the
tokens. The extra cost is one no-grad teacher forward per image.

    # the README recipe (ViT-B/16 student, CLIP ViT-B/16 teacher, 200 epochs, 8 x 128 images)
    torchrun --nproc_per_node=8 maskalign.py --data /path/to/imagenet --teacher ViT-B-16.pt
    python maskalign.py --data synthetic --device cpu --no-compile --model vit_tiny_patch16_224 --img-size 32 \
        --model-patch-size 4 --depth 2 --top-k 2 --teacher random --steps 20     # a smoke run, learns nothing

Cost: 65 GFLOP per image and step at ViT-B/16 (teacher forward 34, student forward + backward 32) against 102 for
simmim.py on the same backbone; 1.5x faster than simmim.py on a CPU (no GPU measurement yet).

--teacher takes any ViT file vit.load_checkpoint reads: OpenAI CLIP ViT-B-16.pt, a Hugging Face CLIP/ViT folder
(openai/clip-vit-base-patch16, facebook/dino-vitb16), DINO .pth, timm, torchvision, or an encoder.pth of this
repository. A hub name is downloaded when huggingface_hub is installed and online.

Deviations from the official code, all with the same function unless said otherwise:
- Attention-guided masking samples without replacement by Gumbel-top-k instead of torch.multinomial: the same
  distribution, but a zero (or underflowed) attention cannot crash it.
- Dynamic Alignment is the minimal exact equivalent: W (K, L) and K heads for the top-K teacher blocks instead of
  (L, L) + T heads of which T-K get zero loss weight (same loss, same gradients); `distill_heads.k` aligns with
  teacher block T-K+1+k. Hence all parameters get gradients and DDP needs no find_unused_parameters.
- Depths that differ switch to the official `fusion_type=sum` (W init 1/L); `linear` would crash or mispair levels.
- The student's final `norm` is frozen (officially computed, thrown away, never trained: the same LN(1, 0)).
- Teachers come from local files of any layout through vit.py, not from HF transformers; the teacher is in eval mode
  (officially train mode, a no-op with dropout 0). Its input is renormalised with CLIP's statistics when it is a
  CLIP tower (officially: when the name contains "clip"); any teacher whose patch grid differs from the student's
  gets teacher_patch x student_grid pixels and a bicubically resized pos_embed (officially hard-coded for CLIP-L/14).
- ckpt.pt holds no teacher weights (the official checkpoint does): --resume reloads --teacher and refuses a teacher
  whose weights' sha256 differs from the one recorded in ckpt.pt's args.
"""
import argparse
import contextlib
import hashlib
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
from tqdm import tqdm

import data
import vit
import swin

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI clip.py
CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")  # OpenAI clip.py
PRESETS = {
    # the CPU demo: ViT-Tiny/4 student (6 blocks, 32 px, synthetic images) and a random teacher of its shape: it
    # exercises the whole method in about 2 minutes; a real teacher comes from --teacher (see "Getting a teacher")
    "tiny": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, teacher="random",
                 num_images=1024, batch_size=32, epochs=4, warmup_epochs=1, blr=1.5e-3, device="cpu",
                 compile=False, workers=1, log_every=8),
    # small images (CIFAR, 32 px): a ViT-Tiny/4 student (6 blocks) aligned with the last 3 blocks of a teacher of its
    # size (bench/efficacy.py: the MAE encoder of the same run), batch 256 at LR 1.5e-3; pass --teacher
    "cifar": dict(model="vit_tiny_patch16_224", img_size=32, model_patch_size=4, depth=6, top_k=3, batch_size=256,
                  epochs=100, warmup_epochs=2, blr=1.5e-3),
}
EXAMPLES = """examples:
  python maskalign.py --preset tiny                                   # CPU demo (random teacher), ~2 min
  torchrun --nproc_per_node=8 maskalign.py --teacher ViT-B-16.pt --data /imagenet   # the README recipe, 1024/step
  torchrun --nproc_per_node=8 maskalign.py --model vit_large_patch16_224 --drop-path 0.2 --teacher ViT-B-16.pt \\
      --data /imagenet                                                # ViT-L student
"""
HOW_TO_GET = ("get a teacher first, e.g. `huggingface-cli download openai/clip-vit-base-patch16 --local-dir clip-b16` "
              f"or OpenAI's {CLIP_URL}, then pass --teacher PATH (--teacher random: smoke tests only)")


# -----------------------------------------------------------------------------------------------------------------
# Arguments: the README recipe (not the argparse defaults of main_pretrain.py, which differ on nearly every knob)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="a named configuration (explicit flags still win); without it: "
                   "the README recipe")
    # data and model
    p.add_argument("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | stl10 | ImageFolder root | .npz")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (downloaded)")
    p.add_argument("--num-images", type=int, default=None, help="epoch length of synthetic; a fixed subset otherwise")
    p.add_argument("--model", default="vit_base_patch16_224", help="the student: a ViT of vit.py, spelled as in timm")
    p.add_argument("--img-size", type=int, default=224, help="input resolution")
    p.add_argument("--model-patch-size", type=int, default=None, help="ViT patch size (default: the model name's); "
                   "e.g. 4 for 32-px images")
    p.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the model name's); fewer for CPU runs")
    p.add_argument("--drop-path", type=float, default=0.1, help="student stochastic depth (README: 0.1 B, 0.2 L)")
    # method
    p.add_argument("--teacher", default="openai/clip-vit-base-patch16",
                   help="a ViT checkpoint file/folder of any layout vit.py reads, a Hugging Face hub name "
                        "(downloaded when online), or `random` (smoke tests and benchmarks only)")
    p.add_argument("--unsafe-load", action="store_true", help="let --teacher run the code it pickles (only for "
                   "files you trust; public teachers do not need it)")
    p.add_argument("--teacher-norm", choices=["clip", "imagenet"], default=None,
                   help="mean/std of the teacher's input (default: clip for a CLIP tower, else imagenet)")
    p.add_argument("--mask-type", choices=["attention", "random"], default="attention", help="README: attention")
    p.add_argument("--mask-ratio", type=float, default=0.7, help="README: 0.7 (58 of 196 patches stay visible)")
    p.add_argument("--top-k", type=int, default=5, help="align with the teacher's last K blocks (--loss_weights top5)")
    # optimisation (README, main_pretrain.py, util/lr_sched.py)
    p.add_argument("--batch-size", type=int, default=128, help="per process (README: 128 x 8 GPUs)")
    p.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--epochs", type=int, default=200, help="README: 200")
    p.add_argument("--warmup-epochs", type=float, default=20, help="linear warmup from 0, then a half cosine")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base LR; absolute LR = blr * total batch / 256")
    p.add_argument("--min-lr", type=float, default=1e-5, help="the floor of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = off (MaskAlign does not clip)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0 = all epochs)")
    # runtime
    p.add_argument("--out", default="runs/maskalign", help="checkpoints and log.jsonl")
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
    args = parse(p, argv)
    if args.model not in vit.SIZES:
        p.error(f"--model {args.model}: the student is a ViT fed its visible patches; one of {', '.join(vit.SIZES)}")
    patch = args.model_patch_size or vit.SIZES[args.model][3]
    if args.img_size % patch:
        p.error(f"--img-size {args.img_size}: not divisible by the patch size {patch}")
    if not 0 <= args.mask_ratio < 1:
        p.error(f"--mask-ratio {args.mask_ratio}: must be in [0, 1) (the paper ablates 0 to 0.9; the recipe is 0.7)")
    if int((args.img_size // patch) ** 2 * (1 - args.mask_ratio)) < 1:
        p.error(f"--mask-ratio {args.mask_ratio}: leaves no visible patch of the {(args.img_size // patch) ** 2}")
    return args


# -----------------------------------------------------------------------------------------------------------------
# Masking (paper: "stare at what you see"; L191-244). The student keeps len_keep = int(N (1 - r)) patches: 58 of 196.

def random_keep(batch, num_patches, len_keep, device):
    """MAE's random_masking: a uniform random subset per image. -> (B, len_keep) indices of the visible patches."""
    return torch.rand(batch, num_patches, device=device).argsort(dim=1)[:, :len_keep]


def attention_keep(importance, len_keep):
    """Attention-guided masking: sample patches without replacement with probability proportional to the teacher's
    cls attention; the first len_keep drawn stay visible, so salient patches are seen more often (the opposite of
    AttMask, which hides them). The official torch.multinomial(importance, N, replacement=False) throws on a row
    that underflowed to zeros (and, in older torch, on any row with fewer than N non-zeros); Gumbel-top-k, the top-k
    of log p + Gumbel noise, is the same distribution, in the same order, and takes zeros (drawn last, uniformly).
    importance (B, N) -> (B, len_keep)."""
    gumbel = -torch.empty_like(importance, dtype=torch.float32).exponential_().log()  # (B, N) Gumbel(0, 1)
    score = (importance.float() + torch.finfo(torch.float32).tiny).log() + gumbel
    return score.topk(len_keep, dim=1).indices


# -----------------------------------------------------------------------------------------------------------------
# Teacher (L110-122, L273-299): frozen, on the whole image, the same augmented crop as the student

def fetch_teacher(name):
    """--teacher as a local path; a hub name like the official openai/clip-vit-base-patch16 is downloaded."""
    if os.path.exists(name):
        return name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"--teacher {name}: no such file or folder; {HOW_TO_GET}")
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(name, allow_patterns=["config.json", "*.safetensors"])
        if not os.path.exists(os.path.join(folder, "model.safetensors")):  # a repository that ships the .bin only
            folder = snapshot_download(name, allow_patterns=["config.json", "pytorch_model.bin"])  # read safely
        return folder
    except (ImportError, OSError, ValueError) as e:  # not installed, offline, or no such repository
        raise FileNotFoundError(f"--teacher {name}: not a local path, and no download from the Hugging Face hub "
                                f"({type(e).__name__}); {HOW_TO_GET}") from None


class Teacher(nn.Module):
    """A frozen vit.py ViT in eval mode. forward(img) -> (outputs of its last K blocks (K, B, 1+N, Dt), before any
    norm as HF's hidden_states[T-K+1..T]; and with attention=True the last block's cls->patch attention (B, N))."""

    def __init__(self, model, mean, std, top_k):
        super().__init__()
        self.vit, self.top_k = model.eval().requires_grad_(False), top_k
        self.size = model.grid[0] * model.patch_size
        # the student's batch is ImageNet-normalised; de-normalise and renormalise (L151-161) in one affine map
        m_in, s_in, m, s = (torch.tensor(v).view(1, 3, 1, 1)
                            for v in (data.IMAGENET_MEAN, data.IMAGENET_STD, mean, std))
        self.register_buffer("scale", s_in / s, persistent=False)
        self.register_buffer("shift", (m_in - m) / s, persistent=False)
        self.eval()

    def train(self, mode=True):  # eval for good: a model.train() reaching it changes nothing (no drop path, ...)
        return super().train(False)

    @torch.no_grad()
    def forward(self, img, attention=False):
        x = img * self.scale + self.shift  # (B, 3, H, W)
        if x.shape[-1] != self.size:  # another patch size: the student's grid (CLIP-L/14 at 196 px, L275)
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        depth = len(self.vit.blocks)
        # the outputs of the last K blocks, and the attention of the last block only when masking needs it (L254-256)
        # the cls query's logits alone (q_cls . K^T: B x H x 1 x T, not the full T x T), the blocks on SDPA
        _, feats, logits = self.vit.forward_features(x, out_blocks=range(depth - self.top_k, depth),
                                                     attn=[-1] if attention else False, attn_rows=1)
        importance = logits[0].float().softmax(-1)[:, :, 0, 1:].mean(1) if attention else None  # (B, N): cls row
        return torch.stack(feats), importance


def build_teacher(args, student):
    """(Teacher on the student's patch grid, its sha256, a description). The weights are never trained or saved."""
    if args.teacher == "random":  # the student's shape, the same on every rank and every resume
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = vit.VisionTransformer(**student.arch, num_classes=0)
        sd, arch, path = model.state_dict(), model.arch, "random"
    else:
        path = fetch_teacher(args.teacher)
        sd, arch = vit.load_checkpoint(path, args.unsafe_load)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # a classifier or CLIP's projection: unused
    if not arch.get("class_token", True):
        raise ValueError(f"--teacher {args.teacher}: has no class token; MaskAlign's targets and mask need one")
    if args.top_k > arch["depth"]:
        raise ValueError(f"--top-k {args.top_k}: the teacher has only {arch['depth']} blocks")
    sha = hashlib.sha256()
    for k in sorted(sd):
        sha.update(k.encode() + sd[k].detach().cpu().contiguous().numpy().tobytes())
    # a teacher of another patch size sees teacher_patch x student_grid pixels, so that its tokens are the student's
    model = vit.VisionTransformer(**dict(arch, img_size=arch["patch_size"] * student.grid[0]), num_classes=0)
    missing, unexpected = model.load_state_dict(vit.resize_state_dict(sd, model), strict=False)
    if missing or unexpected:
        raise ValueError(f"--teacher {args.teacher}: does not fit its architecture; missing {missing}, "
                         f"unexpected {unexpected}")
    norm = args.teacher_norm or ("clip" if arch.get("pre_norm") or arch.get("act") == "quick_gelu" else "imagenet")
    mean, std = (CLIP_MEAN, CLIP_STD) if norm == "clip" else (data.IMAGENET_MEAN, data.IMAGENET_STD)
    teacher = Teacher(model, mean, std, args.top_k)
    T = len(model.blocks)
    desc = (f"teacher {path}: {T} blocks x {model.embed_dim}, patch {model.patch_size} at {teacher.size} px, "
            f"{norm} mean/std, targets = blocks {T - args.top_k + 1}..{T}, sha256 {sha.hexdigest()[:12]}")
    return teacher, sha.hexdigest(), desc


def whitened_targets(feats, keep):
    """Targets (L313-327): the teacher's tokens at cls + the student's visible patches, each token whitened by a
    LayerNorm without affine (eps 1e-5, `--target_norm whiten`). Gathering first is exact (the norm is per token) and
    3x cheaper. feats (K, B, 1+N, Dt), keep (B, n) -> (K, B, 1+n, Dt) in fp32."""
    K, B, _, D = feats.shape
    index = torch.cat([keep.new_zeros(B, 1), keep + 1], dim=1)  # (B, 1+n): token 0 is cls
    y = feats.gather(2, index[None, :, :, None].expand(K, -1, -1, D))  # (K, B, 1+n, Dt)
    return F.layer_norm(y.float(), (D,), eps=1e-5)


# -----------------------------------------------------------------------------------------------------------------
# Student + Dynamic Alignment (L79-106, L246-271, L302-311) and the loss (L329-360)

class MaskAlign(nn.Module):
    """The student ViT (fixed sin-cos positions, MAE init) encodes cls + visible patches; every block's output
    (before the final norm) feeds a learnable mixing fused[k] = sum_l W[k, l] h_l, one per aligned teacher level,
    then a linear adapter D -> Dt per level. No softmax on W and no weight decay: it is free to weigh any layer."""

    def __init__(self, encoder, teacher_dim, teacher_depth, top_k):
        super().__init__()
        self.encoder = encoder
        encoder.norm.requires_grad_(False)  # officially computed and thrown away, so it stays LN(1, 0)
        L = len(encoder.blocks)
        if L == teacher_depth:  # `fusion_type linear`: I + 0.01, the rows of the aligned teacher blocks
            w = (torch.eye(L) + 0.01)[L - top_k:]
        else:  # `fusion_type sum`, the official form for depths that differ: uniform 1 / L
            w = torch.full((top_k, L), 1.0 / L)
        self.distill_weights = nn.Parameter(w)  # (K, L)
        self.distill_heads = nn.ModuleList(nn.Linear(encoder.embed_dim, teacher_dim) for _ in range(top_k))
        for head in self.distill_heads:  # MAE's _init_weights
            nn.init.xavier_uniform_(head.weight), nn.init.zeros_(head.bias)

    def forward(self, img, keep, targets):
        L = len(self.encoder.blocks)
        _, hs, _ = self.encoder.forward_features(img, keep=keep, out_blocks=range(L))  # L x (B, 1+n, D)
        fused = torch.einsum("kl,lbtd->kbtd", self.distill_weights, torch.stack(hs))  # (K, B, 1+n, D)
        preds = [head(x) for head, x in zip(self.distill_heads, fused)]  # K x (B, 1+n, Dt)
        return align_loss(preds, targets)


def align_loss(preds, targets):
    """2 * SmoothL1 (beta 1, mean over tokens and channels) per level, averaged over the K levels (`smoothl1`,
    `top5`): d^2 for |d| < 1, 2|d| - 1 beyond. Only cls + visible tokens: nothing is reconstructed. -> (loss, (K,))"""
    levels = torch.stack([2 * F.smooth_l1_loss(p.float(), y, beta=1.0) for p, y in zip(preds, targets)])
    return levels.mean(), levels


def maskalign_loss(model, teacher, img, mask_type, len_keep):
    """One forward in the order of the method: teacher on the whole image -> mask -> student -> DA -> loss."""
    feats, importance = teacher(img, attention=mask_type == "attention")  # (K, B, 1+N, Dt), (B, N) or None
    if mask_type == "attention":
        keep = attention_keep(importance, len_keep)  # (B, n)
    else:
        keep = random_keep(img.shape[0], feats.shape[2] - 1, len_keep, img.device)
    return model(img, keep, whitened_targets(feats, keep))


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

    encoder = build_encoder(args, pos_embed="sincos", drop_path_rate=args.drop_path)
    encoder.init_weights("mae")
    try:  # user errors in data or checkpoints end with one line, not a traceback
        dataset = data.build_dataset(args.data, "train", data.pretrain_transform(args.img_size, scale=(0.2, 1.0),
                                     interpolation="bicubic"), args.data_dir, args.img_size, num_images=args.num_images)
        loader = data.build_loader(dataset, args.batch_size, train=True, workers=args.workers, seed=args.seed,
                                   device=device)  # in-memory images: batched on the device
        teacher, args.teacher_sha256, teacher_desc = build_teacher(args, encoder)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    L = encoder.grid[0] * encoder.grid[1]
    need, free = check_memory(blocks_of(encoder.arch, 1 + int(L * (1 - args.mask_ratio))), args, device, world,
                              frozen=blocks_of(teacher.vit.arch))
    teacher_depth = len(teacher.vit.blocks)
    model = MaskAlign(encoder, teacher.vit.embed_dim, teacher_depth, args.top_k)
    model.to(device)
    teacher.to(device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, skip=["distill_weights"]), lr=0.0,
                            betas=(0.9, 0.95), fused=True)  # one kernel per step, CPU too (3.6x foreach there)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # loss scaling only for fp16
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                         enabled=args.amp != "none")  # the teacher runs under it too (engine_pretrain.py L47)
    batch = args.batch_size * args.accum_iter * world
    lr = args.blr * batch / 256  # MAE's linear scaling rule
    if not math.isfinite(lr):
        sys.exit(f"error: --blr {args.blr}: gives an LR of {lr} at batch {batch}")
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        sys.exit(f"error: --accum-iter {args.accum_iter}: more than the {len(loader)} batches of an epoch")
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    last = min(args.steps, total) if args.steps else total
    num_patches = encoder.grid[0] * encoder.grid[1]
    len_keep = int(num_patches * (1 - args.mask_ratio))  # int() as MAE: 58 of 196 at 0.7

    step = 0
    if args.resume:
        try:
            stored = torch.load(ckpt_path, map_location="cpu", weights_only=True)["args"]
        except Exception:  # unreadable: resume_from says so
            stored = {}
        if stored.get("teacher_sha256", args.teacher_sha256) != args.teacher_sha256:
            sys.exit(f"error: --resume: {ckpt_path} was trained against --teacher {stored.get('teacher')}; "
                     f"--teacher {args.teacher} has other weights; resume with the same teacher")
        step = resume_from(ckpt_path, args, model, opt, scaler, master)["step"]
    raw = model  # what is saved: never the compiled or DDP wrapper (no `_orig_mod.` / `module.` prefixes)
    if args.compile:
        model.compile()  # in place, so state-dict keys stay clean
        teacher.compile()
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if master:
        print(f"args: {json.dumps(vars(args))}")
        print(f"device {device} x {world} | amp {args.amp} | compile {args.compile} | batch {batch} | lr {lr:.3e}"
              f" | {steps_per_epoch} steps/epoch | {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params")
        print(f"{teacher_desc}\nstudent: {len(encoder.blocks)} blocks x {encoder.embed_dim} on cls + {len_keep} of "
              f"{num_patches} patches ({args.mask_type} masking) | Dynamic Alignment "
              f"{'I + 0.01' if len(encoder.blocks) == teacher_depth else 'uniform 1/L (depths differ)'}"
              f" {tuple(raw.distill_weights.shape)} + {args.top_k} heads")
        print(f"memory: about {need:.0f} MB needed of {free:.0f} MB free per process (check_memory)")
        if args.teacher == "random":
            print("=" * 100 + "\nWARNING: --teacher random: the teacher is a frozen RANDOM network. This run only "
                  "exercises the pipeline\nWARNING: (smoke tests, benchmarks) and learns nothing useful. For a real "
                  "run, " + HOW_TO_GET + "\n" + "=" * 100, file=sys.stderr)
        if args.compile:
            print("compiling... (the first steps are slow)")

    def save():
        save_files({os.path.join(args.out, "encoder.pth"): {"model": raw.encoder.state_dict(),
                                                             "arch": raw.encoder.arch, "step": step},
                    ckpt_path: {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                "epoch": step // steps_per_epoch, "step": step, "args": vars(args)}}, step, ckpt_path)

    model.train()
    log_loss = torch.zeros((), device=device)  # summed on the device; read at log steps only (a host sync)
    log_levels = torch.zeros(args.top_k, device=device)  # the loss of each aligned teacher block
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
                    loss, levels = maskalign_loss(model, teacher, img, args.mask_type, len_keep)
                scaler.scale(loss / args.accum_iter).backward()  # outside autocast, as PyTorch recommends
            bad += ~torch.isfinite(loss.detach())  # checked at log steps and before saving: no per-step host sync
            log_loss += loss.detach() / args.accum_iter
            log_levels += levels.detach() / args.accum_iter
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
                    dist.all_reduce(log_loss), dist.all_reduce(log_levels), dist.all_reduce(bad)
                if bad.item() > 0:
                    sys.exit(f"error: the loss is not finite at step {step}; stopped without saving "
                             f"({last_good(ckpt_path)})")
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": log_loss.item() / logged / world,
                       "lr": opt.param_groups[0]["lr"], "img_per_s": round(seen / (time.time() - t0), 1),
                       "peak_mem_mb": round(peak_memory_mb(device))}
                first = teacher_depth - args.top_k + 1  # per aligned teacher block, 1-based as in the paper
                rec.update({f"loss_t{first + k}": v / logged / world for k, v in enumerate(log_levels.tolist())})
                if master:
                    if logged == step - step0 and step < last:  # the first log step since the start (or resume)
                        bar.write(time_left(bar))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_s']:.0f}")
                    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                log_loss.zero_(), log_levels.zero_()
                logged, t0, seen = 0, time.time(), 0
            done = step // steps_per_epoch  # completed epochs
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
        data.plot_log(args.out)
    minutes = (time.time() - t_start) / 60
    finish(world, master, f"done: {step - step0} steps in {minutes:.1f} min; {args.out}/ holds ckpt.pt, encoder.pth, "
                          f"log.jsonl, loss.png\nfine-tune: python finetune.py --recipe maskalign --pretrained "
                          f"{args.out}/encoder.pth --data {args.data}")


if __name__ == "__main__":
    catch_signals()
    main(get_args())
