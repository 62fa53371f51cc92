"""Speed where the paper recipes train: every method's training step at paper size on one GPU, with bf16 autocast
and torch.compile (and eager for comparison): images/s after warm-up, compile time, peak memory, MFU, the SDPA
kernel each attention call runs on, and a short loss curve on a fixed batch to show that it trains.

    python bench/gpu.py --out runs/gpu                                # CUDA, paper sizes, about 8 min
    python bench/gpu.py --device cpu --tiny --modes eager --out /tmp/g  # the same code on tiny sizes (tests)

MFU = model FLOPs per image (counted analytically below from the architecture: the matmuls and the attention, for
the tokens each method actually processes; backward = 2 x forward for trained parts, frozen teachers forward only)
x images/s / the GPU's dense bf16 peak (looked up from its name, or --peak-tflops). The step is the method's own
model and loss from its file (forward, backward, AdamW) on a fixed synthetic batch in device memory: no data
loading (the training scripts' DeviceLoader or workers supply that). Writes gpu.json and gpu.md.
"""
import argparse
import json
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not bench/
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import localmim  # noqa: E402
import mae  # noqa: E402
import maskalign  # noqa: E402
import simmim  # noqa: E402
import swin  # noqa: E402
import vit  # noqa: E402

# dense bf16 tensor-core peaks, TFLOPS (vendor datasheets, without sparsity); the first name that matches wins
PEAKS = [("H200", 989), ("GH200", 989), ("H100 PCIe", 756), ("H100", 989), ("H800", 989), ("B200", 2250),
         ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 70), ("A10", 125),
         ("RTX 4090", 165), ("RTX 3090", 71), ("A6000", 155)]


# -----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs of one image's forward pass (multiply-add = 2 FLOPs)

def block_flops(tokens, dim, span=None, mlp=4.0):
    """A transformer block on `tokens` tokens: qkv + proj + MLP matmuls, and QK^T + AV over `span` keys each."""
    span = tokens if span is None else span
    return 2 * tokens * dim * dim * (4 + 2 * mlp) + 4 * tokens * span * dim


def vit_flops(model, tokens):
    """A vit.py encoder on `tokens` tokens (cls included): patch embedding of its patches, then the blocks."""
    p, D = model.patch_size, model.embed_dim
    patches = tokens - model.num_prefix
    mlp = model.blocks[0].mlp.fc1.out_features / D
    return 2 * patches * 3 * p * p * D + len(model.blocks) * block_flops(tokens, D, mlp=mlp)


def swin_flops(model):
    """A swin.py encoder on all tokens: patch embedding, window attention over window^2 keys, PatchMerging."""
    a, (h, w) = model.arch, model.grid
    C, total = a["embed_dim"], 2 * h * w * 3 * a["patch_size"] ** 2 * a["embed_dim"]
    for s, stage in enumerate(model.layers):
        if s > 0:
            h, w, C = h // 2, w // 2, C * 2
            total += 2 * h * w * (2 * C) * C  # PatchMerging: 4 (C/2) -> C
        window = stage.blocks[0].window_size
        total += len(stage.blocks) * block_flops(h * w, C, span=window * window, mlp=a["mlp_ratio"])
    return total


def step_flops(parts):
    """Training FLOPs per image: 3 x forward of what trains, 1 x forward of a frozen teacher."""
    return 3 * parts["trained"] + parts.get("frozen", 0)


# -----------------------------------------------------------------------------------------------------------------
# The configurations: each builds the method's model, a fixed batch and a loss closure, and counts its FLOPs

def vit_encoder(name, tiny, **kw):
    if tiny:
        return vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0, **kw)
    return vit.create_model(name, num_classes=0, **kw)


def config_simmim_vit(tiny, device):
    enc = vit_encoder("vit_base_patch16_224", tiny, pos_embed="none", rel_pos_bias="shared", init_values=0.1,
                      drop_path_rate=0.1)
    model = simmim.SimMIM(enc).to(device)
    S, p = enc.grid[0] * enc.patch_size, enc.patch_size
    m = max(p, S // 7)  # the paper's 32-px blocks at 224 (7 x 7); 4-px blocks when tiny
    img = torch.randn(batch(tiny), 3, S, S, device=device)
    mask = simmim.upsample(simmim.block_masks(len(img), S // m, 0.6, device), m // p)
    N = enc.grid[0] * enc.grid[1]
    parts = {"trained": vit_flops(enc, 1 + N) + 2 * N * enc.embed_dim * 3 * p * p}
    return model, lambda: model(img, mask), parts, len(img)


def config_simmim_swin(tiny, device):
    if tiny:
        enc = swin.SwinTransformer(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                   window_size=4, num_classes=0)
    else:
        enc = swin.create_model("swin_base_patch4_window6_192", num_classes=0)
    model = simmim.SimMIM(enc).to(device)
    S = enc.grid[0] * enc.arch["patch_size"]
    img = torch.randn(batch(tiny), 3, S, S, device=device)
    mask = simmim.upsample(simmim.block_masks(len(img), S // 32, 0.6, device), 8)  # 32-px blocks, 4-px tokens
    h = S // enc.stride
    parts = {"trained": swin_flops(enc) + 2 * h * h * enc.num_features * 3 * enc.stride ** 2}
    return model, lambda: model(img, mask), parts, len(img)


def config_mae(tiny, device):
    enc = vit_encoder("vit_base_patch16_224", tiny, pos_embed="sincos")
    d, depth, heads = (32, 1, 4) if tiny else (512, 8, 16)
    model = mae.MAE(enc, d, depth, heads).to(device)
    S, p = enc.grid[0] * enc.patch_size, enc.patch_size
    img = torch.randn(batch(tiny), 3, S, S, device=device)
    L = enc.grid[0] * enc.grid[1]
    K = int(L * 0.25)
    parts = {"trained": vit_flops(enc, 1 + K) + 2 * (1 + K) * enc.embed_dim * d + depth * block_flops(1 + L, d)
             + 2 * L * d * 3 * p * p}
    return model, lambda: model(img, 0.75)[0], parts, len(img)


def config_localmim(tiny, device):
    enc = vit_encoder("vit_base_patch16_224", tiny, pos_embed="sincos")
    if tiny:
        enc = vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=0,
                               pos_embed="sincos")
    model = localmim.LocalMIM(enc).to(device)
    S, D, h = enc.grid[0] * enc.patch_size, enc.embed_dim, enc.grid[0]
    img = torch.randn(batch(tiny), 3, S, S, device=device)
    K, w, out = int(h * h * 0.25), 256, 27  # HOG: 9 bins x 3 colours
    dec = sum(2 * (1 + K) * D * w + block_flops(1 + h * h, w) for _ in range(4))
    dec += 2 * h * h * w * (w // 2) * 4 + 2 * (2 * h) ** 2 * (w // 2) * (w // 4) * 4 + 2 * (4 * h) ** 2 * (w // 4) * out
    dec += 2 * h * h * w * (w // 2) * 4 + 2 * (2 * h) ** 2 * (w // 2) * out  # the 2x decoder
    dec += 2 * h * h * w * out + 2 * (h // 2) ** 2 * w * out  # 1x and 1/2x
    parts = {"trained": vit_flops(enc, 1 + K) + dec}
    return model, lambda: model(img)[0], parts, len(img)


def config_maskalign(tiny, device):
    enc = vit_encoder("vit_base_patch16_224", tiny, pos_embed="sincos", drop_path_rate=0.1)
    # a CLIP-B/16-shaped random teacher: QuickGELU, pre-norm, no patch bias, LayerNorm eps 1e-5
    t_kw = dict(act="quick_gelu", pre_norm=True, patch_bias=False, norm_eps=1e-5)
    teacher_vit = vit_encoder("vit_base_patch16_224", tiny, **t_kw)
    top_k = 2 if tiny else 5
    teacher = maskalign.Teacher(teacher_vit, maskalign.CLIP_MEAN, maskalign.CLIP_STD, top_k).to(device)
    model = maskalign.MaskAlign(enc, teacher_vit.embed_dim, len(teacher_vit.blocks), top_k).to(device)
    S, L = enc.grid[0] * enc.patch_size, enc.grid[0] * enc.grid[1]
    img = torch.randn(batch(tiny), 3, S, S, device=device)
    K = int(L * 0.3)
    parts = {"trained": vit_flops(enc, 1 + K) + top_k * 2 * (1 + K) * enc.embed_dim * teacher_vit.embed_dim,
             "frozen": vit_flops(teacher_vit, 1 + L)}
    return model, lambda: maskalign.maskalign_loss(model, teacher, img, "attention", K)[0], parts, len(img)


def config_finetune(tiny, device):
    model = (vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10,
                              global_pool="avg", drop_path_rate=0.1) if tiny else
             vit.create_model("vit_base_patch16_224", num_classes=1000, global_pool="avg", drop_path_rate=0.1))
    model = model.to(device)
    S = model.grid[0] * model.patch_size
    img = torch.randn(batch(tiny), 3, S, S, device=device)
    y = torch.randint(0, model.head.out_features, (len(img),), device=device)
    parts = {"trained": vit_flops(model, 1 + model.grid[0] ** 2) + 2 * model.embed_dim * model.head.out_features}
    return model, lambda: F.cross_entropy(model(img).float(), y, label_smoothing=0.1), parts, len(img)


CONFIGS = {"simmim_vit_b16": config_simmim_vit, "simmim_swin_b": config_simmim_swin, "mae_vit_b16": config_mae,
           "localmim_vit_b16": config_localmim, "maskalign_vit_b16": config_maskalign,
           "finetune_vit_b16": config_finetune}
BATCH = {"gpu": 128, "tiny": 4}


def batch(tiny):
    return BATCH["tiny" if tiny else "gpu"]


# -----------------------------------------------------------------------------------------------------------------
# Measuring

SDPA_KERNELS = {"aten::_scaled_dot_product_flash_attention": "flash",
                "aten::_scaled_dot_product_efficient_attention": "efficient",
                "aten::_scaled_dot_product_cudnn_attention": "cudnn",
                "aten::_scaled_dot_product_attention_math": "math",
                "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu_flash"}


def attention_backends(step):
    """How many attention calls of one training step ran on each SDPA kernel; `explicit` counts the softmax calls
    of the explicit path (a CPU under bf16, or a caller that wants the attention itself, as MaskAlign's cls row)."""
    from torch.profiler import profile
    with profile() as prof:
        step()
    counts = {}
    for e in prof.key_averages():
        kind = SDPA_KERNELS.get(e.key) or ("explicit" if e.key == "aten::_softmax" else None)
        if kind:
            counts[kind] = counts.get(kind, 0) + e.count
    return counts


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name, device, tiny, compiled, warmup, steps, curve):
    torch.manual_seed(0)
    model, loss_fn, parts, B = CONFIGS[name](tiny, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    if compiled:
        model.compile()

    def step():
        with amp:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    flops = step_flops(parts)
    peak_mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0) / 2 ** 20
    losses = [round(step().item(), 4) for _ in range(curve)]  # the same batch again and again: it must fall
    backends = {} if compiled else attention_backends(step)
    return dict(method=name, mode="compiled" if compiled else "eager", batch=B, img_per_s=round(B / dt, 1),
                step_ms=round(1000 * dt, 2), first_step_s=round(first, 2),
                compile_s=round(first - dt, 2) if compiled else None, peak_mem_mb=round(peak_mem),
                gflop_per_img=round(flops / 1e9, 3), achieved_tflops=round(flops * B / dt / 1e12, 2),
                attention=backends, loss_curve=losses)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU tests): the same code, sizes that fit")
    p.add_argument("--methods", default=",".join(CONFIGS), help="comma-separated subset of the configurations")
    p.add_argument("--modes", default="compiled,eager", help="compiled and/or eager")
    p.add_argument("--warmup", type=int, default=5, help="steps after the first (compile) step, not timed")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--curve", type=int, default=10, help="steps of the loss curve on the fixed batch")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name)")
    p.add_argument("--out", default="runs/gpu", help="gpu.json and gpu.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({os.cpu_count()} cores)"
    peak = args.peak_tflops or next((v for k, v in PEAKS if k in name), None)
    os.makedirs(args.out, exist_ok=True)
    print(f"{name}; torch {torch.__version__}; dense bf16 peak {peak or 'unknown'} TFLOPS", flush=True)
    rows = []
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            try:
                r = measure(method, device, args.tiny, mode == "compiled", args.warmup, args.steps, args.curve)
            except Exception as e:  # one configuration that does not fit must not hide the others
                r = dict(method=method, mode=mode, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            r["mfu"] = round(100 * r["achieved_tflops"] / peak, 1) if peak and "achieved_tflops" in r else None
            rows.append(r)
            print(json.dumps(r), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, peak_tflops=peak, rows=rows), f, indent=1)
    lines = [f"{name}, torch {torch.__version__}, bf16 autocast, batch {rows[0].get('batch')}, dense bf16 peak "
             f"{peak or '?'} TFLOPS", "",
             "| method | mode | img/s | step ms | compile s | peak MB | GFLOP/img | TFLOPS | MFU % | attention | "
             "loss curve (first, last) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['mode']} | failed: {r['error']} |||||||||")
            continue
        att = ", ".join(f"{k} {v}" for k, v in r["attention"].items()) or "–"
        lines.append(f"| {r['method']} | {r['mode']} | {r['img_per_s']} | {r['step_ms']} | {r['compile_s'] or '–'} | "
                     f"{r['peak_mem_mb']} | {r['gflop_per_img']} | {r['achieved_tflops']} | {r['mfu'] or '–'} | "
                     f"{att} | {r['loss_curve'][0]} → {r['loss_curve'][-1]} |")
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
