"""Vision Transformer, hand-written, with timm's state-dict keys and numerics.

Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929. A checkpoint from timm, MAE, DeiT or DINO
loads with strict=True, and `forward_features` / the logits equal timm's `vit_*` within 1e-5 in fp32 (tests/test_vit.py).

    model = create_model("vit_base_patch16_224")                                   # ViT-B/16 at 224
    tiny = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4)         # the CPU-sized model

Beyond timm's plain ViT, the options the MIM papers use:
  pos_embed="learn" | "sincos" (MAE's fixed 2-D table) | "none";  rel_pos_bias="shared" | "block" (BEiT/SimMIM);
  init_values (LayerScale, `ls1.gamma`);  drop_path_rate;  global_pool="token" | "avg" (`norm` vs `fc_norm`);
  act="quick_gelu", pre_norm, patch_bias=False (OpenAI CLIP).
What the methods need, without any method's code living here (see `embed` and `forward_features`):
  (a) `mask` + `mask_token`: masked patch embeddings are replaced by a caller's vector (SimMIM),
  (b) `keep`: only the visible patches given per sample are encoded (MAE-style students of LocalMIM, MaskAlign),
  (c) `out_blocks` / `attn`: the outputs of chosen blocks and the attention logits (LocalMIM, MaskAlign, analyze.py).
The end of the file reads public checkpoints (OpenAI CLIP, HF ViT/CLIP, torchvision, the official SimMIM ViT) into
these keys: `load_checkpoint(path)` returns a state dict and the architecture that fits it.
"""
import argparse
import collections
import io
import math
import os
import pickle
import re
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (embed_dim, depth, num_heads, patch_size); all at img_size 224, mlp_ratio 4 (timm's configurations)
SIZES = {
    "vit_tiny_patch16_224": (192, 12, 3, 16),
    "vit_small_patch16_224": (384, 12, 6, 16),
    "vit_base_patch16_224": (768, 12, 12, 16),
    "vit_large_patch16_224": (1024, 24, 16, 16),
    "vit_huge_patch14_224": (1280, 32, 16, 14),
}


def create_model(name, **overrides):
    if name not in SIZES:
        raise ValueError(f"--model {name}: not a ViT of vit.py; choose one of {', '.join(SIZES)}")
    dim, depth, heads, patch = SIZES[name]
    kw = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=224)
    return VisionTransformer(**{**kw, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (timm names: norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma)

class QuickGELU(nn.Module):
    def forward(self, x):  # OpenAI CLIP's approximation, x * sigmoid(1.702 x)
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drop the whole residual branch, rescale the survivors."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, rel_pos_rows=0):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_rows:  # BEiT's per-block table (SimMIM fine-tuning); zero init as there
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rel_pos_rows, num_heads))

    def forward(self, x, bias=None, rel_index=None, return_attn=False, rows=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        if hasattr(self, "relative_position_bias_table"):
            own = self.relative_position_bias_table[rel_index].movedim(-1, -3)  # (H, T, T) or (B, H, T, T)
            bias = own if bias is None else bias + own
        logits = None
        if return_attn and rows:  # the logits of the first `rows` queries only (MaskAlign's cls row), fp32
            logits = (q[:, :, :rows].float() * self.scale) @ k.float().transpose(-2, -1)  # (B, H, rows, T)
            if bias is not None:
                logits = logits + bias[..., :rows, :].float()
        if return_attn and not rows:  # the explicit path, only when a caller wants the attention itself; fp32 logits
            logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)  # (B, H, T, T)
            if bias is not None:
                logits = logits + bias.float()
            x = logits.softmax(-1).to(v.dtype) @ v
        elif q.device.type == "cpu" and q.dtype != torch.float32:
            # CPU under bf16 autocast: SDPA's CPU kernels are 4-6x slower than these two matmuls at ViT-T/S sizes
            # (forward + backward, one thread); products in bf16, the softmax in fp32
            a = ((q * self.scale) @ k.transpose(-2, -1)).float()  # (B, H, T, T)
            x = (a if bias is None else a + bias.float()).softmax(-1).to(v.dtype) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, T, C)), logits


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=None, drop_path=0.0,
                 act=nn.GELU, eps=1e-6, rel_pos_rows=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos_rows)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x, bias=None, rel_index=None, return_attn=False, rows=None):
        y, logits = self.attn(self.norm1(x), bias, rel_index, return_attn, rows)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return (x, logits) if return_attn else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim, bias=True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, N, D), row-major patches


# ----------------------------------------------------------------------------------------------------------------
# Position information: MAE's fixed sin-cos table and BEiT's relative position bias

def sincos_pos_embed(dim, grid, cls_token=True):
    """MAE's 2-D sin-cos table (util/pos_embed.py): half the channels encode the column, half the row, each as
    [sin(pos * w), cos(pos * w)] with w_k = 1 / 10000^(k / (dim/4)); a zero row for the cls token."""
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    emb = []
    for pos in (cols, rows):  # MAE builds meshgrid(w, h): the first half of the channels is the column
        out = pos.reshape(-1, 1) * omega  # (N, D/4)
        emb += [out.sin(), out.cos()]
    emb = torch.cat(emb, dim=1)  # (N, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])
    return emb.float().unsqueeze(0)  # (1, [1 +] N, D)


def rel_pos_index(grid):
    """BEiT's index (T, T), T = 1 + N, into a table of (2h-1)(2w-1) + 3 rows: one row per relative offset of two
    patches, then cls->patch, patch->cls and cls->cls (SimMIM models/vision_transformer.py)."""
    h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2) offsets
    rows = (2 * h - 1) * (2 * w - 1)
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1
    index[0, :], index[:, 0], index[0, 0] = rows, rows + 1, rows + 2
    return index


class RelativePositionBias(nn.Module):
    """One table shared by all blocks (SimMIM's ViT-B pretraining config: USE_SHARED_RPB)."""

    def __init__(self, rows, num_heads):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))

    def forward(self, index):
        return self.relative_position_bias_table[index].movedim(-1, -3)  # (H, T, T) or (B, H, T, T)


# ----------------------------------------------------------------------------------------------------------------
# The model

class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token", pos_embed="learn",
                 rel_pos_bias="none", init_values=None, drop_path_rate=0.0, norm_eps=1e-6, act="gelu", pre_norm=False,
                 patch_bias=True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"--img-size {img_size} is not divisible by the patch size {patch_size}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs the class token")
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token,
                         global_pool=global_pool, pos_embed=pos_embed, rel_pos_bias=rel_pos_bias,
                         init_values=init_values, norm_eps=norm_eps, act=act, pre_norm=pre_norm, patch_bias=patch_bias)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_size, self.embed_dim, self.global_pool = patch_size, embed_dim, global_pool
        self.num_prefix = int(class_token)
        num_patches = self.grid[0] * self.grid[1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + num_patches, embed_dim))
        elif pos_embed == "sincos":  # frozen, but a parameter so that it is saved under timm's key
            table = sincos_pos_embed(embed_dim, self.grid, class_token)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        elif pos_embed == "none":
            self.pos_embed = None
        else:
            raise ValueError(f"pos_embed={pos_embed!r}: use 'learn', 'sincos' or 'none'")
        if rel_pos_bias not in ("none", "shared", "block"):
            raise ValueError(f"rel_pos_bias={rel_pos_bias!r}: use 'none', 'shared' or 'block'")
        rows = (2 * self.grid[0] - 1) * (2 * self.grid[1] - 1) + 3
        if rel_pos_bias != "none":
            if not class_token:
                raise ValueError("the BEiT relative position bias has rows for the class token; keep class_token")
            self.register_buffer("rel_index", rel_pos_index(self.grid), persistent=False)
        self.rel_pos_bias = RelativePositionBias(rows, num_heads) if rel_pos_bias == "shared" else None
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()

        act_layer = {"gelu": nn.GELU, "quick_gelu": QuickGELU}[act]
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, dpr[i], act_layer, norm_eps,
                  rows if rel_pos_bias == "block" else 0)
            for i in range(depth)])
        use_fc_norm = global_pool == "avg"  # timm's rule: average pooling moves the final norm after the pooling
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self, mode="timm"):
        """timm: trunc-normal(0.02) Linears and pos_embed, cls token N(0, 1e-6), conv left at PyTorch's default.
        mae: MAE's models_mae.py — xavier-uniform Linears and patch-embed (as a Linear), cls token N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02) if mode == "timm" else nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        if mode == "mae":
            nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.embed_dim, -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6 if mode == "timm" else 0.02)
        if self.pos_embed is not None and self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ---- embedding: patches, position, and the two ways methods hide patches ----
    def embed(self, img, mask=None, mask_token=None, keep=None):
        """img (B, 3, H, W) -> tokens (B, [1 +] N', D).
        mask (B, h, w) or (B, N) bool, True = masked: those patch embeddings become `mask_token` (1, 1, D), as
          SimMIM does on the raw patch embedding before the cls token and position are added.
        keep (B, K) long: only these patches are encoded (MAE's random_masking); cls goes in front."""
        x = self.patch_embed(img)  # (B, N, D)
        if mask is not None:
            w = mask.flatten(1).unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, self.num_prefix:]
        if keep is not None:
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        if self.cls_token is not None:
            cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm_pre(x)

    def rel_positions(self, keep=None):
        """The relative-position index for the tokens actually present: (T, T), or (B, T, T) with `keep`."""
        if not hasattr(self, "rel_index"):
            return None
        if keep is None:
            return self.rel_index
        pos = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)  # (B, 1 + K): cls is row 0
        return self.rel_index[pos.unsqueeze(-1), pos.unsqueeze(1)]

    def forward_features(self, img, mask=None, mask_token=None, keep=None, out_blocks=None, attn=False, attn_rows=None):
        """Returns the tokens after the final `norm`, (B, T, D). With `out_blocks` (block indices) or `attn` (True for
        every block, or block indices), returns (tokens, [outputs of those blocks, before any norm], [attention logits
        (B, H, T, T) of those blocks]): softmax(-1) of a logit map is that block's attention. attn_rows=k: only the
        logits of the first k queries, (B, H, k, T) (the cls row: k = 1), while the blocks keep the fused kernel."""
        x = self.embed(img, mask, mask_token, keep)
        index = self.rel_positions(keep)
        shared = self.rel_pos_bias(index) if self.rel_pos_bias is not None else None
        depth = len(self.blocks)
        outs_at = {i % depth for i in out_blocks} if out_blocks is not None else set()
        attn_at = set(range(depth)) if attn is True else {i % depth for i in attn or ()}
        outs, logits = [], []
        for i, blk in enumerate(self.blocks):
            if i in attn_at:
                x, a = blk(x, shared, index, return_attn=True, rows=attn_rows)
                logits.append(a)
            else:
                x = blk(x, shared, index)
            if i in outs_at:
                outs.append(x)
        x = self.norm(x)
        return x if out_blocks is None and not attn else (x, outs, logits)

    def forward_head(self, x, pre_logits=False):
        x = x[:, self.num_prefix:].mean(1) if self.global_pool == "avg" else x[:, 0]  # avg excludes the cls token
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, img):
        return self.forward_head(self.forward_features(img))


# ----------------------------------------------------------------------------------------------------------------
# Changing resolution: position embeddings and relative-position tables

def resize_pos_embed(pos, grid, num_prefix=1):
    """MAE's interpolate_pos_embed: bicubic on the patch part, prefix (cls) rows kept. pos (1, P + n*n, D)."""
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    old = int(math.isqrt(patches.shape[1]))
    if (old, old) == tuple(grid):
        return pos
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], dim=1)


def _spline_matrix(x, xq):
    """(len(xq), len(x)) matrix that evaluates the not-a-knot cubic spline through (x, y) at xq, so that
    spline(xq) = M @ y. This is the interpolant of scipy's interp2d(kind='cubic') (FITPACK with s=0), applied per
    axis; like FITPACK, query points outside [x0, xn] are clamped to the ends."""
    n, h = len(x), x[1:] - x[:-1]
    A = torch.zeros(n, n, dtype=torch.float64)  # A @ second_derivatives = B @ y
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):  # continuity of the first derivative at the interior nodes
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        B[i, i - 1], B[i, i], B[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    A[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])  # not-a-knot: one cubic across the first two intervals
    A[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])  # ... and across the last two
    M = torch.linalg.solve(A, B)  # (n, n): second derivatives as a linear map of y
    xq = xq.clamp(x[0], x[-1])
    i = (torch.searchsorted(x, xq, right=True) - 1).clamp(0, n - 2)
    a, b, hi = x[i + 1] - xq, xq - x[i], h[i]
    eye = torch.eye(n, dtype=torch.float64)
    return ((a ** 3 / (6 * hi) - a * hi / 6)[:, None] * M[i] + (b ** 3 / (6 * hi) - b * hi / 6)[:, None] * M[i + 1]
            + (a / hi)[:, None] * eye[i] + (b / hi)[:, None] * eye[i + 1])


def resize_rel_pos_table(table, size, extra=0):
    """BEiT/SimMIM's geometric resize of a relative-position table (utils.py remap_pretrained_keys_*), e.g. Swin
    window 6 -> 7 (11x11 -> 13x13 offsets) or a ViT grid change. table ((2s-1)^2 + extra, H) -> ((2t-1)^2 + extra, H)
    where `size` = 2t-1. The old offsets are spread geometrically (1, 1+q, 1+q+q^2, ...) so that the old extent
    reaches the new one; a cubic spline per head carries the values over. `extra` trailing rows (ViT's 3 cls rows)
    are kept as they are."""
    grid_rows = table.shape[0] - extra
    src = math.isqrt(grid_rows)
    if src * src != grid_rows:
        raise ValueError(f"relative position table with {grid_rows} rows is not square")
    if src == size:
        return table
    lo, hi = 1.01, 1.5  # binary search of q: 1 + q + ... + q^(src//2 - 1) = size//2
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** (src // 2)) / (1 - q) > size // 2 else (q, hi)
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = torch.tensor([-d for d in reversed(dis)] + [0.0] + dis, dtype=torch.float64)
    t = size // 2
    xq = torch.arange(-t, t + 0.1, 1.0, dtype=torch.float64)
    S = _spline_matrix(x, xq)  # (size, src)
    grid = table[:grid_rows].double().T.reshape(-1, src, src)  # (H, src, src)
    new = (S @ grid @ S.T).reshape(table.shape[1], -1).T  # (size*size, H)
    return torch.cat([new.to(table.dtype), table[grid_rows:]])


def resize_state_dict(sd, model):
    """Adapt a checkpoint in our keys to `model`'s resolution: bicubic pos_embed, geometric relative-position
    tables. Returns a new dict; keys are not touched."""
    sd = dict(sd)
    if "pos_embed" in sd and model.pos_embed is not None and sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.grid, model.num_prefix)
    size = 2 * model.grid[0] - 1
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") and v.shape[0] != size * size + 3:
            sd[k] = resize_rel_pos_table(v, size, extra=3)
    return sd


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints of other layouts (checkpoints.md). Each converter maps a state dict onto our (timm) keys.

# No code from a checkpoint ever runs (CONVENTIONS.md): pickles are read by torch's weights_only unpickler, which
# builds tensors and plain containers only. Public releases pickle a few harmless classes beside their weights; those
# are allowed by name, and the ones that cannot be imported here become inert dicts. Anything else is refused.

UNSAFE_FLAG = "--unsafe-load"  # the one way around the allow-list, spelled the same in every script


class Refused(ValueError):
    """A file that pickles more than tensors, containers and the benign classes below."""


class Inert:
    """Stands in for a class a checkpoint names (yacs' CfgNode in SimMIM/Swin files, the modules of a TorchScript
    archive): the object comes back as an OrderedDict of its items, its attributes in __dict__; nothing is called."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


def _benign_globals(names):
    """The classes public checkpoints pickle: argparse.Namespace (MAE, DeiT, DINO, BEiT, LocalMIM, MaskAlign `args`),
    numpy scalars, arrays and dtypes (their `args` and metrics), yacs' CfgNode (SimMIM and Swin `config`), and in a
    TorchScript archive (OpenAI CLIP) its module classes and list helpers; `names` are the globals of one file."""
    import numpy as np
    import torch.jit._pickle as jit_pickle
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [argparse.Namespace, np.ndarray, np.dtype, *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGO"},
               jit_pickle.build_intlist, jit_pickle.build_doublelist, jit_pickle.build_boollist,
               jit_pickle.build_tensorlist, jit_pickle.restore_type_tag, (Inert, "yacs.config.CfgNode")]
    for mod in ("numpy.core", "numpy._core"):  # files pickled by numpy 1.x and 2.x name the same functions
        allowed += [(core.scalar, f"{mod}.multiarray.scalar"), (core._reconstruct, f"{mod}.multiarray._reconstruct")]
    return allowed + [(Inert, n) for n in names if n.startswith("__torch__.")]


def torch_load(path, unsafe=False):
    """torch.load of a file a user named, on the CPU. Only tensors, containers and the benign classes above are
    built; a file that pickles anything else (which could run code while loading) is refused with a ValueError
    naming it, unless unsafe=True (--unsafe-load): then plain pickle, for files the user trusts. A TorchScript
    archive is read the same way, as data: its tensors, never its code."""
    try:
        zipped = zipfile.is_zipfile(path)
        if zipped and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            return _torchscript_tensors(path, unsafe)
        if unsafe:
            warnings.warn(f"{UNSAFE_FLAG}: {path} is unpickled without restriction: any code it holds runs now")
            return torch.load(path, map_location="cpu", weights_only=False)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipped else []  # read, not run
    except Exception as e:  # truncated, text, not torch's: whatever the parser raises, the user gets one line
        if isinstance(e, (Refused, FileNotFoundError)):
            raise
        raise _unreadable(path, e) from None
    _refuse(path, names)
    try:
        with torch.serialization.safe_globals(_benign_globals(names)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a legacy (not zipped) pickle names a refused global only in the error
        if isinstance(e, pickle.UnpicklingError):
            _refuse(path, re.findall(r"GLOBAL (\S+)", str(e)))
        raise _unreadable(path, e) from None


def _unreadable(path, e):
    return ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:100]})")


def _refuse(path, names):
    """ValueError naming the globals of a pickle that the allow-list does not cover, and the flag."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _benign_globals(names)}
    blocked = [n for n in names if n not in allowed]
    if blocked:
        raise Refused(f"{path}: refused: it pickles {', '.join(blocked)}, which could run code while loading; "
                         f"if you trust the file, pass {UNSAFE_FLAG}")


def _torchscript_tensors(path, unsafe):
    """The tensors of a TorchScript archive by their attribute path (what .state_dict() gives), read from its
    data.pkl with the module classes as Inert stand-ins; its code/ and constants are never loaded."""
    if unsafe:
        with warnings.catch_warnings():  # jit is deprecated, not gone
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").state_dict()
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w") as dst:  # a plain torch.save archive of the data
        for name in src.namelist():
            rest = name.partition("/")[2]
            if rest in ("data.pkl", "version", "byteorder") or rest.startswith("data/"):
                dst.writestr("archive/" + rest, src.read(name))
    buf.seek(0)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(buf)
    _refuse(path, names)
    buf.seek(0)
    with torch.serialization.safe_globals(_benign_globals(names)):
        root = torch.load(buf, map_location="cpu", weights_only=True)
    if not isinstance(root, collections.OrderedDict):
        raise ValueError(f"{path}: a TorchScript archive whose root is not a module")
    out = {}

    def walk(obj, prefix):
        for k, v in vars(obj).items():
            if torch.is_tensor(v):
                out[prefix + k] = v
            elif isinstance(v, collections.OrderedDict):  # a submodule
                walk(v, f"{prefix}{k}.")
    walk(root, "")
    return out


def read_state_dict(path, unsafe=False):
    """(state dict, arch or None) from a file: a pickle (.pth/.pt/.bin), a TorchScript archive (OpenAI CLIP's .pt),
    .safetensors, or a Hugging Face folder (config.json beside the weights). Unwraps 'model' / 'state_dict' / DINO's
    'teacher', strips DDP/compile/DINO prefixes, casts half precision to float32. `arch` is what this repository
    saves beside the weights of an encoder.pth (the constructor arguments of the model)."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name), unsafe)
        raise FileNotFoundError(f"{path}: folder without model.safetensors or pytorch_model.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
        try:
            obj = load_file(path)
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise ValueError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None
    else:
        obj = torch_load(path, unsafe)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    arch = obj.get("arch") if isinstance(obj.get("arch"), dict) else None
    sd = next((obj[k] for k in ("model", "state_dict", "teacher", "module") if isinstance(obj.get(k), dict)), obj)
    out = {}
    for k, v in sd.items():
        if torch.is_tensor(v):
            k = re.sub(r"^(module\.|_orig_mod\.|backbone\.)+", "", k)
            out[k] = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    return out, arch


def _split_qkv(sd, prefix, names):
    """HF keeps q, k, v as three Linears; timm's qkv is their concatenation (rows in q, k, v order)."""
    w = torch.cat([sd[f"{prefix}.{n}.weight"] for n in names])
    b = torch.cat([sd[f"{prefix}.{n}.bias"] for n in names])
    return w, b


def convert_openai_clip(sd):
    """OpenAI CLIP visual tower (clip/model.py) -> ours. The text tower is dropped; `proj` becomes a bias-free head."""
    sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")} or sd
    out = {"patch_embed.proj.weight": sd["conv1.weight"], "cls_token": sd["class_embedding"].view(1, 1, -1),
           "pos_embed": sd["positional_embedding"].unsqueeze(0),
           "norm_pre.weight": sd["ln_pre.weight"], "norm_pre.bias": sd["ln_pre.bias"],
           "norm.weight": sd["ln_post.weight"], "norm.bias": sd["ln_post.bias"]}
    if "proj" in sd:
        out["head.weight"], out["head.bias"] = sd["proj"].T, torch.zeros(sd["proj"].shape[1])
    names = {"ln_1": "norm1", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
             "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for k, v in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if m:
            rest = m.group(2)
            for a, b in names.items():
                if rest.startswith(a):
                    out[f"blocks.{m.group(1)}.{b}{rest[len(a):]}"] = v
    return out


def convert_hf_clip(sd):
    """Hugging Face CLIPVisionModel / CLIPModel -> ours (the text tower and projections are dropped)."""
    if any("vision_model." in k for k in sd):
        sd = {k.split("vision_model.", 1)[1]: v for k, v in sd.items() if "vision_model." in k}
    out = {"patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
           "cls_token": sd["embeddings.class_embedding"].view(1, 1, -1),
           "pos_embed": sd["embeddings.position_embedding.weight"].unsqueeze(0),
           "norm_pre.weight": sd["pre_layrnorm.weight"], "norm_pre.bias": sd["pre_layrnorm.bias"],
           "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"]}
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    for i in range(depth):
        p, o = f"encoder.layers.{i}", f"blocks.{i}"
        out[f"{o}.attn.qkv.weight"], out[f"{o}.attn.qkv.bias"] = _split_qkv(sd, f"{p}.self_attn",
                                                                            ("q_proj", "k_proj", "v_proj"))
        for a, b in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[f"{o}.{b}.weight"], out[f"{o}.{b}.bias"] = sd[f"{p}.{a}.weight"], sd[f"{p}.{a}.bias"]
    return out


def convert_hf_vit(sd):
    """Hugging Face ViTModel (e.g. facebook/dino-vitb16, what MaskAlign loads) -> ours; the pooler is dropped."""
    sd = {re.sub(r"^(vit|dino_model)\.", "", k): v for k, v in sd.items()}
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    for i in range(depth):
        p, o = f"encoder.layer.{i}", f"blocks.{i}"
        out[f"{o}.attn.qkv.weight"], out[f"{o}.attn.qkv.bias"] = _split_qkv(sd, f"{p}.attention.attention",
                                                                            ("query", "key", "value"))
        for a, b in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                     ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
            out[f"{o}.{b}.weight"], out[f"{o}.{b}.bias"] = sd[f"{p}.{a}.weight"], sd[f"{p}.{a}.bias"]
    return out


def convert_torchvision(sd):
    """torchvision vit_b_16 & co. -> ours (eps 1e-6 and exact GELU, as timm)."""
    out = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"],
           "patch_embed.proj.weight": sd["conv_proj.weight"], "patch_embed.proj.bias": sd["conv_proj.bias"],
           "norm.weight": sd["encoder.ln.weight"], "norm.bias": sd["encoder.ln.bias"]}
    names = {"ln_1": "norm1", "self_attention.in_proj_": "attn.qkv.", "self_attention.out_proj": "attn.proj",
             "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2", "mlp.linear_1": "mlp.fc1",
             "mlp.linear_2": "mlp.fc2"}
    for k, v in sd.items():
        m = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)", k)
        if m:
            for a, b in names.items():
                if m.group(2).startswith(a):
                    out[f"blocks.{m.group(1)}.{b}{m.group(2)[len(a):]}"] = v
        elif k.startswith("heads.head."):
            out["head." + k.split(".")[-1]] = v
    return out


def convert_beit(sd):
    """Official SimMIM ViT (BEiT-style; also timm beit_*) -> ours. qkv.bias = [q_bias, 0, v_bias]: the k bias is a
    fixed zero there, and since a bias on the keys adds the same q.b_k to every logit of a query row, the softmax
    ignores it: the same function (in training its gradient is zero up to rounding, so AdamW moves it a little:
    ~6e-7 in 50 fp32 steps, ~3e-3 under bf16, without effect on the output). gamma_1/2 -> ls1/ls2.gamma; the relative
    position tables keep their names. A SimMIM pretraining checkpoint drops `decoder.*` and `mask_token`."""
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    out = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index") or k == "mask_token" or k.endswith("attn.k_bias"):
            continue
        if k.endswith("attn.q_bias"):
            p = k[: -len("q_bias")]
            out[p + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), sd[p + "v_bias"]])
        elif not k.endswith("attn.v_bias"):
            out[re.sub(r"gamma_(\d)$", r"ls\1.gamma", k)] = v
    return out


def convert(sd):
    """Detect the layout of a ViT state dict from its keys (checkpoints.md section 11) and map it onto ours.
    Returns (state dict, layout name)."""
    if any(k.startswith("encoder.blocks.") for k in sd):  # a method's full model (ours, SimMIM's): keep the encoder
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if "blocks.0.attn.qkv.weight" in sd and "blocks.0.attn.q_bias" not in sd:
        return sd, "timm"  # timm, MAE, DeiT, DINO, LocalMIM, MaskAlign's student, ours
    if "blocks.0.attn.q_bias" in sd:
        return convert_beit(sd), "beit"
    if "visual.class_embedding" in sd or "class_embedding" in sd:
        return convert_openai_clip(sd), "openai_clip"
    if any(k.endswith("embeddings.class_embedding") for k in sd):
        return convert_hf_clip(sd), "hf_clip"
    if "class_token" in sd:
        return convert_torchvision(sd), "torchvision"
    if any(k.endswith("embeddings.cls_token") for k in sd):
        return convert_hf_vit(sd), "hf_vit"
    raise ValueError(f"not a ViT checkpoint of a known layout (timm/MAE/DINO, SimMIM/BEiT, OpenAI or HF CLIP, "
                     f"HF ViT, torchvision); first keys: {', '.join(list(sd)[:4])}")


HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # timm's ViT sizes; CLIP uses width / 64


def load_checkpoint(path, unsafe=False):
    """Read a ViT checkpoint of any layout above. Returns (state dict in our keys, arch) such that
    `VisionTransformer(**arch, num_classes=0)` has the checkpoint's architecture (classifier keys stay in the dict).
    Our own encoder.pth carries its arch; for other files it is inferred from the tensors. unsafe: torch_load's."""
    raw, arch = read_state_dict(path, unsafe)
    try:
        sd, layout = convert(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    # DINO's projection head, LocalMIM's side-branch norms and HOG layers, MaskAlign's alignment module and teacher
    drop = r"^(head\.(mlp|last_layer)|norm\.\d|distill_|decoder|hog_enc|clip_model\.|dino_model\.|mask_token)"
    sd = {k: v for k, v in sd.items() if not re.match(drop, k)}
    return sd, arch or _infer_arch(sd, layout, path)


def _infer_arch(sd, layout, path):
    dim, _, p, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    arch = dict(embed_dim=dim, depth=depth, patch_size=p, num_heads=HEADS.get(dim, max(1, dim // 64)),
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                class_token="cls_token" in sd, patch_bias="patch_embed.proj.bias" in sd, pre_norm="norm_pre.weight" in sd,
                global_pool="avg" if "fc_norm.weight" in sd else "token",
                init_values=1.0 if "blocks.0.ls1.gamma" in sd else None)
    if "pos_embed" in sd:
        arch["pos_embed"], n = "learn", sd["pos_embed"].shape[1] - arch["class_token"]
    else:
        arch["pos_embed"] = "none"
        table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
        n = ((math.isqrt(table.shape[0] - 3) + 1) // 2) ** 2 if table is not None else 196
    for k, v in sd.items():  # a relative-position table has one column per head
        if k.endswith("relative_position_bias_table"):
            arch["num_heads"] = v.shape[1]
    arch["img_size"] = math.isqrt(n) * p
    arch["rel_pos_bias"] = ("shared" if "rel_pos_bias.relative_position_bias_table" in sd else
                            "block" if "blocks.0.attn.relative_position_bias_table" in sd else "none")
    if layout in ("openai_clip", "hf_clip"):  # CLIP: QuickGELU, LayerNorm eps 1e-5, 64-dim heads
        arch.update(act="quick_gelu", norm_eps=1e-5, num_heads=dim // 64)
    elif arch["pre_norm"]:  # a CLIP tower in timm's layout (ln_pre): CLIP's eps; its activation cannot be read
        arch["norm_eps"] = 1e-5
    if layout == "hf_vit":
        arch["norm_eps"] = 1e-12  # HF ViTConfig's default
    config = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if layout.startswith("hf") and os.path.exists(config):
        import json
        c = json.load(open(config))
        c = c.get("vision_config", c)
        arch.update(num_heads=c.get("num_attention_heads", arch["num_heads"]),
                    norm_eps=c.get("layer_norm_eps", arch.get("norm_eps", 1e-6)),
                    act="quick_gelu" if c.get("hidden_act") == "quick_gelu" else "gelu")
    elif dim not in HEADS and arch["rel_pos_bias"] == "none" and not layout.endswith("clip"):
        warnings.warn(f"{path}: width {dim} is none of timm's ViT sizes; assuming {arch['num_heads']} head(s) of "
                      f"64 channels")
    return arch
