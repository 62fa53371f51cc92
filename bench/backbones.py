"""Training throughput of vit.py and swin.py next to timm's implementation of the same model: forward + backward
images/s at the same batch and input, fp32 and bf16 autocast, eager and compiled (`model.compile()`).

    python bench/backbones.py                        # CPU: vit_tiny at 32 px (patch 4), a 4-stage Swin-T at 64 px
    python bench/backbones.py --device cuda          # paper sizes: vit_base_patch16_224 (batch 128),
                                                     #   swin_base_patch4_window7_224 (batch 64)
    python bench/backbones.py --model swin_base_patch4_window6_192 --batch-size 64 --steps 50
    python bench/backbones.py --threads 1 --cpu-time  # a CPU shared with other jobs: count only our CPU time

Warm-up steps (compilation included) are not timed, the device is synchronised around the timer, and ours and
timm's alternate over `--rounds` rounds, the best of which is reported (other processes on the machine only ever
slow a round down). timm's Swin runs as timm ships it: explicit softmax attention (its fused path is marked
experimental and off by default); ours goes through F.scaled_dot_product_attention, except in CPU training (see
swin.WindowAttention).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import swin  # noqa: E402
import vit  # noqa: E402

# (name, overrides, batch size): the CPU defaults are tiny models; on CUDA the papers' base models
CPU = [("vit_tiny_patch16_224", dict(img_size=32, patch_size=4), 16),
       ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4), 16)]
CUDA = [("vit_base_patch16_224", dict(img_size=224), 128), ("swin_base_patch4_window7_224", dict(img_size=224), 64)]


def build(name, kw):
    """(ours, timm's): the same architecture, and the same weights (a strict load checks the former)."""
    import timm
    if name in vit.SIZES:
        ours, ref = vit.create_model(name, **kw), timm.create_model(name, **kw)
    else:
        ours = swin.create_model(name, **kw)
        size = name.split("_")[1]  # timm has no 192-px names: its 224-px model at our geometry
        ref = timm.create_model(f"swin_{size}_patch4_window7_224", **{**kw, "img_size": ours.arch["img_size"],
                                                                      "window_size": ours.arch["window_size"]},
                                drop_path_rate=0.0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model, x, y, bf16, steps, clock=time.perf_counter):
    """Images/s of `steps` training steps (forward, cross-entropy, backward)."""
    sync(x.device)
    t0 = clock()
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    sync(x.device)
    return steps * len(x) / (clock() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a name of vit.py or swin.py; default: the device's pair of models")
    parser.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    parser.add_argument("--batch-size", type=int, help="default: 16 on CPU, 128 (ViT) / 64 (Swin) on CUDA")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: 5 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and timm's; best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadiest on a busy machine")
    parser.add_argument("--cpu-time", action="store_true",
                        help="with --threads 1 on a shared CPU: time the process ran (time.process_time) instead of "
                             "the wall clock, so that other processes' load is not counted")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time model.compile() (default: on CUDA only; compiling on CPU takes minutes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and (args.device != "cpu" or torch.get_num_threads() != 1):
        parser.error("--cpu-time measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.process_time if args.cpu_time else time.perf_counter
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (30 if cuda else 5)
    if args.model:
        kw = {"img_size": args.img_size} if args.img_size else {}
        configs = [(args.model, kw, args.batch_size or (64 if cuda else 16))]
    else:
        configs = [(n, {**kw, **({"img_size": args.img_size} if args.img_size else {})}, args.batch_size or b)
                   for n, kw, b in (CUDA if cuda else CPU)]
    compiled = [False, True] if (cuda if args.compile is None else args.compile) else [False]
    dtypes = ["fp32", "bf16"]
    try:
        pairs = [build(name, kw) for name, kw, _ in configs]
    except ValueError as e:
        sys.exit(f"error: {e}")
    import timm
    hw = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{hw}; torch {torch.__version__}, timm {timm.__version__}; {steps} steps x best of {args.rounds}"
          f"{'; process CPU time' if args.cpu_time else ''}")
    print(f"{'model':<34} {'img':>4} {'batch':>5} {'mode':<8} {'dtype':<5} {'ours img/s':>10} {'timm img/s':>10} "
          f"{'ours/timm':>9}")
    for (name, kw, batch), (ours, ref) in zip(configs, pairs):
        img = ours.arch["img_size"]
        label = name + "".join(f" {k[0]}{v}" for k, v in kw.items() if k != "img_size")  # p4: patch 4, w4: window
        torch.manual_seed(0)
        x = torch.randn(batch, 3, img, img, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        for comp in compiled:
            models = [m.to(device).train() for m in (ours, ref)]
            if comp:
                for m in models:
                    m.compile()  # in place (the eager rounds ran first)
            for dt in dtypes:
                best = [0.0, 0.0]
                for _ in range(args.rounds):
                    for i, m in enumerate(models):
                        run(m, x, y, dt == "bf16", args.warmup)
                        best[i] = max(best[i], run(m, x, y, dt == "bf16", steps, clock))
                print(f"{label:<34} {img:>4} {batch:>5} {'compiled' if comp else 'eager':<8} {dt:<5} "
                      f"{best[0]:>10.1f} {best[1]:>10.1f} {best[0] / best[1]:>9.2f}", flush=True)
            if comp:
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
