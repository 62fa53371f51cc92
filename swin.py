"""Swin Transformer, hand-written, with timm's state-dict keys and numerics.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", arXiv 2103.14030. A timm
`swin_*` checkpoint loads with strict=True, and `forward_features` / the logits equal timm's within 1e-5 in fp32
(tests/test_swin.py). The official Microsoft, SimMIM and LocalMIM (GreenMIM) checkpoints convert to these keys.
Window attention goes through F.scaled_dot_product_attention with the relative position bias and the shift mask as
`attn_mask` (in CPU training through the same math written out, which is faster there: see WindowAttention).

    model = create_model("swin_base_patch4_window7_224")                           # Swin-B at 224
    pre = create_model("swin_base_patch4_window6_192")                             # SimMIM's pretraining geometry
    tiny = create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                        window_size=4)                                             # the CPU-sized model

The backbone of SimMIM (Swin-B/L at 192 px) and of LocalMIM's Swin variant. What the methods need, without any
method's code living here (see `embed` and `forward_features`):
  (a) `mask` + `mask_token`: SimMIM's entry, x * (1 - w) + mask_token * w after the patch-embed LayerNorm,
  (b) `out_stages` / `attn`: the output of every stage and the attention logits (LocalMIM, analyze.py),
  (c) LocalMIM's encoder on the visible tokens: `forward_visible` of the stages, blocks and PatchMerging takes the
      visible tokens alone (B, N, C) with their coordinates, and every block attends within groups of one window
      (window_groups); `visible_only` is the same computation dense: inside every window a visible query gets -inf
      on the keys of masked tokens, and PatchMerging marks a merged token visible iff its 2x2 children all are. Both
      are exact for the visible tokens (their outputs never depend on a masked token; LocalMIM's 32-px mask units
      stay whole); the visible-token path computes a quarter of the tokens at 75 % masking. They equal
      GreenMIM's grouping with true token coordinates; the released LocalMIM Swin code (Swin/models_mim.py L257-258,
      from GreenMIM's first release) gives merged tokens raster coordinates while tokens and mask are in mask-unit
      order, so from stage 2 on it groups windows and indexes relative positions wrongly: its stage 2-4 outputs
      differ from these by 1.7-2.8, its loss by 0.08-0.4 %, while with that bug fixed it equals ours within 3e-6
      (a side-by-side review with the official code). A LocalMIM Swin release also merges the 2x2 children of PatchMerging row-first where Swin takes
      them column-first: reorder_merges() maps its weights to this model for continued pretraining.
The end of the file reads the official checkpoints (downsample at the end of a stage, `head.*`) into timm's layout,
and resizes relative-position tables when the window changes (SimMIM fine-tuning: 6 -> 7, 12 -> 14).
"""
import math
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import DropPath, Mlp, read_state_dict, rel_pos_index, resize_rel_pos_table

# name: (embed_dim, depths, num_heads, window_size, img_size); patch 4, mlp_ratio 4 (timm's configurations, and
# SimMIM's 192-px pretraining ones: configs/swin_base__100ep, configs/swin_large__800ep)
SIZES = {
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_large_patch4_window7_224": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_large_patch4_window12_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
    "swin_base_patch4_window6_192": (128, (2, 2, 18, 2), (4, 8, 16, 32), 6, 192),
    "swin_large_patch4_window12_192": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 192),
}


def create_model(name, **overrides):
    if name not in SIZES:
        raise ValueError(f"--model {name}: not a Swin of swin.py; choose one of {', '.join(SIZES)}")
    dim, depths, heads, window, img = SIZES[name]
    kw = dict(embed_dim=dim, depths=depths, num_heads=heads, window_size=window, img_size=img)
    return SwinTransformer(**{**kw, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Windows (paper section 3.2): attention inside w x w windows, shifted by w/2 in every second block

def window_partition(x, w):
    B, H, W, C = x.shape  # windows in row-major order, tokens row-major inside each window
    return x.view(B, H // w, w, W // w, w, C).transpose(2, 3).reshape(B, -1, w * w, C)  # (B, nW, w*w, C)


def window_reverse(x, w, H, W):
    B, _, _, C = x.shape
    return x.view(B, H // w, W // w, w, w, C).transpose(2, 3).reshape(B, H, W, C)  # (B, nW, w*w, C) -> (B, H, W, C)


def shift_mask(res, w, s):
    """The official SW-MSA mask (1, nW, N, N): after the cyclic shift by s, a window may hold tokens of up to 3x3
    regions that are not neighbours in the image; pairs from different regions get -100 (as the official code,
    not -inf)."""
    region = torch.bucketize(torch.arange(res), torch.tensor([res - w, res - s]), right=True)  # (res,) in {0, 1, 2}
    ids = window_partition((region[:, None] * 3 + region[None, :])[None, :, :, None], w)[..., 0]  # (1, nW, N)
    return (ids[..., :, None] != ids[..., None, :]).float() * -100.0


def merge_visible(visible):
    """(B, H, W) -> (B, H/2, W/2): a merged token is visible iff all 4 of its children are."""
    B, H, W = visible.shape
    return visible.view(B, H // 2, 2, W // 2, 2).all(4).all(2)


# The visible tokens alone (LocalMIM: one mask for the batch, of whole 32-px units): tokens (B, N, C) at coordinates
# (N, 2), raster order. Every block groups them by window (and, shifted, by the region of the cyclic shift) into
# padded groups; a query attends to the visible keys of its own group, which is what the dense visible-only path
# computes for it, at the cost of the visible tokens only (a quarter at 75 % masking). The groups hold 2-2.5x as many
# slots as there are tokens, so only the attention itself runs on them; qkv, proj and the MLP run on the tokens.

def window_groups(coords, res, w, s):
    """The groups of one block (window w, shift s) of the tokens at coords (N, 2) of a res x res stage. Returns
    index (nG, G) into the tokens (padding points at token 0), pad (nG, G) bool, the relative-position index
    (nG, G, G) into the window's table: the offsets of the true coordinates, which inside one shift region are the
    offsets in the shifted frame, and back (N,): each token's place among the nG * G group slots."""
    r, c = ((coords - s) % res).T.contiguous()  # coordinates after the cyclic shift by -s, as contiguous rows
    bounds = torch.tensor([res - w, res - s] if s else [res], device=coords.device)
    region = torch.bucketize(r, bounds, right=True) * 3 + torch.bucketize(c, bounds, right=True)
    group = ((r // w) * (res // w) + c // w) * 9 + region  # one id per (window, region)
    order = group.argsort(stable=True)
    ids, counts = group[order].unique_consecutive(return_counts=True)
    nG, G = len(ids), int(counts.max())
    slot = torch.arange(len(order), device=coords.device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    row = torch.arange(nG, device=coords.device).repeat_interleave(counts)
    index = torch.zeros(nG, G, dtype=torch.long, device=coords.device)
    pad = torch.ones(nG, G, dtype=torch.bool, device=coords.device)
    index[row, slot], pad[row, slot] = order, False
    back = torch.empty_like(order)
    back[order] = row * G + slot
    yx = coords[index]  # (nG, G, 2)
    d = yx[:, :, None] - yx[:, None, :] + w - 1  # (nG, G, G, 2)
    return index, pad, (d[..., 0] * (2 * w - 1) + d[..., 1]).clamp(0, (2 * w - 1) ** 2 - 1), back


def merge_children(coords, res):
    """PatchMerging of visible tokens: the coordinates (N/4, 2) of the merged tokens, raster order, and the index
    (N/4, 4) of each one's children in Swin's concat order (0,0), (1,0), (0,1), (1,1). All 4 must be visible."""
    flat = torch.full((res * res,), -1, dtype=torch.long, device=coords.device)
    flat[coords[:, 0] * res + coords[:, 1]] = torch.arange(len(coords), device=coords.device)
    parents = (coords // 2).unique(dim=0)  # sorted rows: raster order
    py, px = parents.unbind(1)
    children = torch.stack([flat[(2 * py + dy) * res + 2 * px + dx] for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1))], 1)
    if (children < 0).any():
        raise ValueError("a merged token with a masked child: the mask must be made of whole 2x2 cells at every stage")
    return parents, children


class WindowAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size, qkv_bias=True):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # BEiT's index without its cls row/column is Swin's: (dy + w-1) * (2w-1) + dx + w-1
        self.register_buffer("relative_position_index", rel_pos_index((window_size, window_size))[1:, 1:],
                             persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, return_attn=False):
        """x (B, nW, N, C); mask None or additive (1 or B, nW, N, N). The heads of all windows share a batch row,
        so a mask that is the same for every image broadcasts over B instead of being copied B times (as timm's)."""
        y, logits = self.attend(self.qkv(x), mask, return_attn)
        return self.proj(y), logits

    def attend(self, qkv, mask=None, return_attn=False, rel_index=None):
        """The attention between the projections qkv (B, nW, N, 3C) of each window -> (B, nW, N, C), before proj.
        rel_index (nW, N, N): each window's own relative positions (groups of visible tokens)."""
        B, nW, N, C3 = qkv.shape
        C, h = C3 // 3, self.num_heads
        qkv = qkv.view(B, nW, N, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, hd)
        q, k, v = qkv.reshape(3, B, nW * h, N, C // h).unbind(0)  # (B, nW*h, N, hd)
        if rel_index is None:
            bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (h, N, N)
        else:
            bias = self.relative_position_bias_table[rel_index].permute(0, 3, 1, 2)  # (nW, h, N, N)
        bias = bias.expand(1, nW, h, N, N) if mask is None else mask.unsqueeze(2) + bias  # (1 or B, nW, h, N, N)
        bias = bias.reshape(-1, nW * h, N, N)
        # SDPA, except when a caller wants the attention itself, and in CPU training: torch's CPU flash kernel takes
        # no gradient for attn_mask, and SDPA's math fallback then runs bf16 in fp32, 5% slower than timm's explicit
        # path. The explicit logits stay fp32 under autocast, as timm's (CPU bf16 softmax is several times slower).
        if return_attn or (bias.requires_grad and q.device.type == "cpu"):
            logits = (q * self.scale) @ k.transpose(-2, -1) + bias  # (B, nW*h, N, N)
            x = logits.softmax(-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, nW*h, N, hd)
        x = x.view(B, nW, h, N, C // h).transpose(2, 3).reshape(B, nW, N, C)
        return x, logits.view(B, nW, h, N, N) if return_attn else None


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, resolution, window_size, shift_size, mlp_ratio=4.0, qkv_bias=True,
                 drop_path=0.0, eps=1e-5):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        mask = shift_mask(resolution, window_size, shift_size) if shift_size else None
        self.register_buffer("attn_mask", mask, persistent=False)  # (1, nW, N, N) or None

    def forward(self, x, visible=None, return_attn=False):
        """x (B, H, W, C); visible None or (B, H, W) bool: visible queries ignore the keys of masked tokens."""
        B, H, W, C = x.shape
        w, s = self.window_size, self.shift_size
        y = self.norm1(x)
        if s:  # cyclic shift: windows of the shifted grid, the regions kept apart by attn_mask
            y = torch.roll(y, (-s, -s), dims=(1, 2))
        mask = self.attn_mask
        if visible is not None:
            vis = torch.roll(visible, (-s, -s), dims=(1, 2)) if s else visible
            vis = window_partition(vis[..., None], w)[..., 0]  # (B, nW, N)
            # a visible query never sees a masked key; a masked query sees all, so no row is empty (no NaN)
            hide = torch.where(vis[..., :, None] & ~vis[..., None, :], float("-inf"), 0.0)  # (B, nW, N, N)
            mask = hide if mask is None else mask + hide
        y, logits = self.attn(window_partition(y, w), mask, return_attn)  # (B, nW, N, C)
        y = window_reverse(y, w, H, W)
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, logits) if return_attn else x

    def forward_visible(self, x, groups):
        """x (B, N, C): visible tokens only; groups: window_groups() for this block's window and shift."""
        index, pad, rel, back = groups
        hide = torch.where(pad, float("-inf"), 0.0)[None, :, None, :]  # (1, nG, 1, G): padding is no key
        qkv = self.attn.qkv(self.norm1(x))  # (B, N, 3C): on the tokens, not on the padded groups
        # index_select, not qkv[:, index]: its backward is an index_add, 3-4x faster on a CPU than index_put
        y, _ = self.attn.attend(qkv.index_select(1, index.flatten()).unflatten(1, index.shape), hide, rel_index=rel)
        y = y.flatten(1, 2).index_select(1, back)  # (B, nG, G, C) -> (B, N, C), the tokens' order
        x = x + self.drop_path(self.attn.proj(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape  # the 2x2 children in the official concat order x0..x3: (0,0), (1,0), (0,1), (1,1)
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))  # (B, H/2, W/2, 2C)

    def forward_visible(self, x, children):
        """x (B, N, C) visible tokens, children (N/4, 4) from merge_children -> (B, N/4, 2C)."""
        return self.reduction(self.norm(x[:, children].flatten(2)))


class SwinStage(nn.Module):
    """timm's layout: the PatchMerging that halves the resolution opens stages 1.. (the official code closes the
    previous stage with it). A stage not larger than the window takes one window of its size and no shift."""

    def __init__(self, dim, depth, num_heads, resolution, window_size, mlp_ratio, qkv_bias, dpr, eps, downsample):
        super().__init__()
        self.downsample = PatchMerging(dim // 2, eps) if downsample else nn.Identity()
        w = min(window_size, resolution)
        shift = window_size // 2 if resolution > window_size else 0
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, resolution, w, shift if i % 2 else 0, mlp_ratio, qkv_bias, dpr[i], eps)
            for i in range(depth)])

    def forward(self, x, visible=None, logits=None):
        """x (B, H, W, C) -> (B, H', W', C'), visible follows the tokens; a list `logits` collects every block's
        attention logits."""
        x = self.downsample(x)
        if visible is not None and isinstance(self.downsample, PatchMerging):
            visible = merge_visible(visible)
        for blk in self.blocks:
            if logits is None:
                x = blk(x, visible)
            else:
                x, a = blk(x, visible, return_attn=True)
                logits.append(a)
        return x, visible

    def forward_visible(self, x, coords, res):
        """The blocks on the visible tokens x (B, N, C) at coords (N, 2) of this res x res stage (after its
        PatchMerging): two groupings, the plain windows and the shifted ones."""
        groups = [window_groups(coords, res, blk.window_size, blk.shift_size) for blk in self.blocks[:2]]
        for i, blk in enumerate(self.blocks):
            x = blk.forward_visible(x, groups[i % 2])
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim, eps=1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, 3, H, W) -> (B, H/p, W/p, C)


# ----------------------------------------------------------------------------------------------------------------
# The model

class SwinTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                 norm_eps=1e-5):
        super().__init__()
        n = len(depths)
        if len(num_heads) != n:
            raise ValueError(f"num_heads {tuple(num_heads)}: give one per stage, {n} for depths {tuple(depths)}")
        grid = img_size // patch_size
        res = [grid >> s for s in range(n)]  # resolution of each stage
        if img_size % (patch_size << (n - 1)) or any(r > window_size and r % window_size for r in res):
            k = (patch_size << (n - 1)) * window_size  # every multiple of k fits
            raise ValueError(f"--img-size {img_size}: stages of {'/'.join(map(str, res))} tokens must each be a "
                             f"multiple of window {window_size} or at most it; use a multiple of {k}, e.g. "
                             f"{max(k, round(img_size / k) * k)}")
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_eps=norm_eps)
        self.grid, self.stride = (grid, grid), patch_size << (n - 1)
        self.num_features = embed_dim << (n - 1)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_eps)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))  # linear over all blocks
        self.layers = nn.ModuleList([
            SwinStage(embed_dim << s, depths[s], num_heads[s], res[s], window_size, mlp_ratio, qkv_bias,
                      dpr[s].tolist(), norm_eps, downsample=s > 0)
            for s in range(n)])
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head = nn.Identity()
        if num_classes > 0:  # timm's ClassifierHead: the Linear is head.fc
            self.head = nn.Sequential(OrderedDict(fc=nn.Linear(self.num_features, num_classes)))
        self.init_weights()

    def init_weights(self):
        """timm and the official code: trunc-normal(0.02) Linears and relative-position tables, zero biases,
        LayerNorm (1, 0); the patch-embed conv keeps PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def embed(self, img, mask=None, mask_token=None):
        """img (B, 3, H, W) -> tokens (B, H/4, W/4, C) after the patch-embed LayerNorm.
        mask (B, H/4, W/4) bool, True = masked: those tokens become `mask_token` (1, 1, C), as SimMIM does."""
        if img.shape[-2:] != (self.arch["img_size"],) * 2:
            raise ValueError(f"image of {tuple(img.shape[-2:])} pixels for a model built with "
                             f"--img-size {self.arch['img_size']} (the shift masks are fixed by it)")
        x = self.patch_embed(img)  # (B, H, W, C)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, H, W, 1)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        return x

    def forward_features(self, img, mask=None, mask_token=None, visible_only=False, out_stages=False, attn=False):
        """Returns the tokens after the final `norm`, (B, H', W', C'). With `out_stages` or `attn`, returns
        (tokens, [output of each stage (B, H_s, W_s, C_s), before the norm] or [], [attention logits
        (B, nW, heads, N, N) of every block, in its shifted frame] or []).
        visible_only with a mask: LocalMIM's visible-only encoder (the mask_token is not used)."""
        x = self.embed(img, None if visible_only else mask, mask_token)
        visible = ~mask if visible_only else None
        outs, logits = [], [] if attn else None
        for stage in self.layers:
            x, visible = stage(x, visible, logits)
            outs.append(x)
        x = self.norm(x)
        return (x, outs if out_stages else [], logits or []) if out_stages or attn else x

    def forward_head(self, x, pre_logits=False):
        x = x.mean((1, 2))  # average over the H' x W' tokens
        return x if pre_logits else self.head(x)

    def forward(self, img):
        return self.forward_head(self.forward_features(img))


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints (checkpoints.md sections 3, 5.5, 7) and changing the window

def convert_microsoft(sd):
    """Official Microsoft / SimMIM / LocalMIM (GreenMIM) Swin layout -> ours (timm's). Keeps the `encoder.` part of
    a pretraining dict (drops `decoder.*`, `hog_enc.*`), drops `mask_token`, the index/mask buffers and LocalMIM's
    side norms `norm.0..3`; moves `layers.s.downsample` -> `layers.s+1.downsample` and `head.*` -> `head.fc.*`.
    The old layout is told by `layers.0.downsample.reduction.weight` (a headless timm dict has no head.fc to tell
    it by: the bug of timm 1.0.29). A dict already in our layout passes unchanged."""
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    old = "layers.0.downsample.reduction.weight" in sd
    out = {}
    for k, v in sd.items():
        if re.search(r"(relative_position_index|relative_coords_table|attn_mask)$|^mask_token$|^norm\.\d", k):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.+)", k)
        if old and m:
            k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        out[re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)] = v
    return out


def reorder_merges(sd):
    """GreenMIM's first release, and with it LocalMIM's Swin pretraining, concatenates the 2x2 children of a merge
    row-first, (0,0) (0,1) (1,0) (1,1); Swin and timm column-first, x0 = (0,0), x1 = (1,0), x2 = (0,1), x3 = (1,1).
    Swapping the middle quarter of every downsample's norm and reduction input maps one onto the other (both ways)."""
    out = dict(sd)
    for k, v in sd.items():
        if re.search(r"downsample\.(norm\.(weight|bias)|reduction\.weight)$", k):
            c = v.shape[-1] // 4
            out[k] = torch.cat([v[..., :c], v[..., 2 * c:3 * c], v[..., c:2 * c], v[..., 3 * c:]], dim=-1)
    return out


def load_checkpoint(path, unsafe=False, pretraining=False):
    """Read a Swin checkpoint (ours, timm, Microsoft, SimMIM, LocalMIM). Returns (state dict in our keys, arch) such
    that `SwinTransformer(**arch, num_classes=0)` has its architecture (classifier keys stay in the dict). Our own
    encoder.pth carries its arch; otherwise it is read off the tensors, and img_size = stride x the last stage's
    window: the smallest image the tables fit, and the one every released checkpoint was trained at (192 for w6,
    224 for w7 and w14 (last stage 7), 384 for w12, 192 for SimMIM's Swin-L w12 (last stage 6)).
    pretraining=True: an official LocalMIM Swin release (side norms norm.0..3, the Microsoft layout) gets its merges
    reordered (reorder_merges), to continue its pretraining here. Fine-tuning keeps them as stored, as the official
    fine-tuning code does (it builds a plain Swin and loads the weights unchanged)."""
    raw, arch = read_state_dict(path, unsafe)
    sd = convert_microsoft(raw)
    localmim_release = any(re.match(r"(encoder\.)?norm\.\d", k) for k in raw) and any(
        re.match(r"(encoder\.)?layers\.0\.downsample\.", k) for k in raw)
    if pretraining and localmim_release:
        sd = reorder_merges(sd)
    if "patch_embed.proj.weight" not in sd or "layers.0.blocks.0.attn.qkv.weight" not in sd:
        raise ValueError(f"{path}: not a Swin checkpoint of a known layout (timm, Microsoft, SimMIM, LocalMIM); "
                         f"first keys: {', '.join(list(raw)[:4])}")
    if arch is None:
        dim, in_chans, p, _ = sd["patch_embed.proj.weight"].shape
        n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        depths = tuple(1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"layers.{s}.blocks."))
                       for s in range(n))
        tables = [sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"] for s in range(n)]
        window, last = [(math.isqrt(t.shape[0]) + 1) // 2 for t in (tables[0], tables[-1])]
        arch = dict(img_size=last * (p << (n - 1)), patch_size=p, in_chans=in_chans, embed_dim=dim, depths=depths,
                    num_heads=tuple(t.shape[1] for t in tables), window_size=window,
                    mlp_ratio=sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dim,
                    qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd,
                    # LocalMIM's Swin (its side norms norm.0..3 give it away) uses LayerNorm eps 1e-6
                    norm_eps=1e-6 if any(re.match(r"(encoder\.)?norm\.\d", k) for k in raw) else 1e-5)
    return sd, arch


def resize_state_dict(sd, model):
    """Carry relative-position tables over to `model`'s windows with SimMIM's geometric cubic scheme
    (vit.resize_rel_pos_table), e.g. a 192-px w6 pretraining into the 224-px w7 fine-tune model (121 -> 169 rows;
    Swin-L 12 -> 14: 529 -> 729, and 6 -> 7 in its last stage). Returns a new dict; keys are not touched."""
    sd, own = dict(sd), model.state_dict()
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") and k in own and v.shape[0] != own[k].shape[0]:
            sd[k] = resize_rel_pos_table(v, math.isqrt(own[k].shape[0]))
    return sd
