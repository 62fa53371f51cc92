"""Pretraining throughput of the method scripts, measured by the scripts themselves: images/s and peak memory of
their own training loop (data loading, masking, forward, loss, backward, clipping, AdamW), eager vs compiled,
fp32 vs bf16 autocast.

    python bench/pretrain.py                                      # CPU: ViT-T @32 px (patch 4), Swin-T @128 px (window 4)
    python bench/pretrain.py --methods mae,simmim,localmim,maskalign  # every method, same backbone, size and batch
    python bench/pretrain.py --device cuda                        # paper sizes: ViT-B/16 @224, Swin-B/w6 @192, batch 128

Each configuration runs in a subprocess for 2N optimizer steps with --log-every N on --data synthetic: the first
log.jsonl record covers the warm-up (compilation included), the last one the N timed steps after it (the scripts
read the clock after a host sync). peak_mem_mb is what the script logs: max allocated CUDA memory on a GPU, the
process's peak resident set on a CPU (the Python runtime, the compiler and the data included). A run that fails
(e.g. a ViT-only method on Swin) prints its last error line in the table instead of numbers.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, model flags, batch): tiny models on a CPU, the papers' encoders on a GPU
CPU = [("vit_tiny p4", ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-patch-size", "4"], 32),
       ("swin_tiny w4", ["--model", "swin_tiny_patch4_window7_224", "--img-size", "128", "--window-size", "4"], 32)]
CUDA = [("vit_base p16", ["--model", "vit_base_patch16_224", "--img-size", "224"], 128),
        ("swin_base w6", ["--model", "swin_base_patch4_window6_192", "--img-size", "192"], 128)]


def method_flags(method, img_size):
    """What a method needs beyond the common flags to run on synthetic data with no download."""
    if method == "simmim":  # 32-px blocks hide all of a 32-px image: a 4x4 grid of blocks at any size
        return ["--mask-patch-size", str(min(32, img_size // 4))]
    if method == "maskalign":  # a randomly initialised teacher of the student's size, nothing to download
        return ["--teacher", "random"]
    if method == "mae" and img_size <= 64:  # the small-image decoder of mae.py's cifar preset
        return ["--decoder-dim", "128", "--decoder-depth", "2", "--decoder-heads", "4"]
    return []


def measure(method, flags, batch, device, amp, compiled, steps, workers, env, data="synthetic"):
    """(img/s, peak MB) over the last `steps` of 2 * steps, or (None, last error line)."""
    with tempfile.TemporaryDirectory() as out:
        img_size = int(flags[flags.index("--img-size") + 1])
        cmd = [sys.executable, os.path.join(ROOT, f"{method}.py"), *flags, *method_flags(method, img_size),
               "--batch-size", str(batch), "--data", data, "--device", device, "--amp", amp,
               "--compile" if compiled else "--no-compile", "--steps", str(2 * steps), "--log-every", str(steps),
               "--workers", str(workers), "--out", out]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        log = os.path.join(out, "log.jsonl")
        if p.returncode != 0 or not os.path.exists(log):
            lines = (p.stderr or p.stdout or "no output").strip().splitlines()
            return None, lines[-1][:100]
        last = json.loads(open(log).read().splitlines()[-1])
        return last["img_per_s"], last["peak_mem_mb"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="mae,simmim", help="comma-separated method scripts, e.g. mae,localmim")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="vit,swin", help="which of the device's two configurations: vit, swin")
    parser.add_argument("--batch-size", type=int, help="default: 32 on CPU, 128 on CUDA")
    parser.add_argument("--steps", type=int, help="timed steps after as many warm-up steps (default: 5 CPU, 20 CUDA)")
    parser.add_argument("--amp", default="none,bf16", help="comma-separated --amp values to time")
    parser.add_argument("--compile", default="eager,compiled", help="eager, compiled or both")
    parser.add_argument("--workers", type=int, help="data loader workers (default: 0 on CPU, 8 on CUDA)")
    parser.add_argument("--data", default="synthetic", help="synthetic (made per image on the fly) or in-memory "
                        "images (an .npz folder: batched on the device, as the scripts do)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs; on a CPU shared with other jobs, "
                        "fewer threads than cores avoids oversubscription (which can cost 10x)")
    args = parser.parse_args()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    cuda = args.device.startswith("cuda")
    steps = args.steps or (20 if cuda else 5)
    workers = args.workers if args.workers is not None else (8 if cuda else 0)
    configs = [c for c, key in zip(CUDA if cuda else CPU, ("vit", "swin")) if key in args.models.split(",")]
    threads = env.get("OMP_NUM_THREADS", torch.get_num_threads())
    hw = torch.cuda.get_device_name() if cuda else f"cpu, {os.cpu_count()} cores, {threads} thread(s) per run"
    print(f"{hw}; torch {torch.__version__}; {steps} timed steps after {steps} warm-up steps")
    print(f"{'method':<10} {'model':<18} {'img':>4} {'batch':>5} {'amp':<5} {'compile':<8} {'img/s':>8} "
          f"{'peak_mem_mb':>11}")
    for method in args.methods.split(","):
        for label, flags, batch in configs:
            batch = args.batch_size or batch
            img = flags[flags.index("--img-size") + 1]
            for mode in args.compile.split(","):
                for amp in args.amp.split(","):
                    speed, mem = measure(method, flags, batch, args.device, amp, mode == "compiled", steps, workers,
                                         env, args.data)
                    row = f"{method:<10} {label:<18} {img:>4} {batch:>5} {amp:<5} {mode:<8}"
                    print(f"{row} {speed:>8.1f} {mem:>11}" if speed is not None else f"{row} failed: {mem}",
                          flush=True)


if __name__ == "__main__":
    main()
