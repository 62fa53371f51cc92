"""
Throughput of data.py: synthetic generation alone on one core (targets: >= 2000 img/s at 32 px, >= 200 at 224),
generation + transform on one core, the DataLoader with N workers, and the two paths for images held in memory
(.npz, CIFAR, STL-10): per-image transforms in loader workers vs DeviceLoader's batched augmentation.

    python bench/data.py --workers 2
    python bench/data.py --device cuda            # DeviceLoader on the GPU
"""
import argparse
import os
import sys
import tempfile
import time

# `python bench/data.py` puts bench/ first on sys.path, where `import data` would find this file: use the repo root.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--workers", type=int, default=2, help="loader workers (this machine: 2 cores)")
parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
parser.add_argument("--device", default="cpu", help="where DeviceLoader batches the in-memory images")
args = parser.parse_args()
torch.set_num_threads(1)  # one core: the number that matters is images/s per worker


def rate(fn):
    """Images/s of fn(i) per second of this process's CPU time (process_time, not wall time, so that the number
    means something on a machine shared with other jobs), best of ten rounds after a warm-up."""
    fn(0)
    best, i = 0.0, 1
    for _ in range(10):
        t0, n = time.process_time(), 0
        while time.process_time() - t0 < args.seconds / 10:
            fn(i)
            i, n = i + 1, n + 1
        best = max(best, n / (time.process_time() - t0))
    return best


def loader_rate(loader):
    """Images/s of wall time of a loader after one warm-up batch, over args.seconds; a loader that runs out of
    images (the in-memory ones on the DeviceLoader) goes on with its next epoch."""
    epoch, it = 0, iter(loader)
    next(it)  # workers started and warm
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        try:
            n += len(next(it)[1])
        except StopIteration:
            epoch += 1
            loader.sampler.set_epoch(epoch)
            it = iter(loader)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
print("one core, img/s per CPU-second:")
for size in (32, 224):
    gen = rate(lambda i: data.synthetic_image(i, 0, 0, size))
    pre = data.build_dataset("synthetic", "train", data.pretrain_transform(size), img_size=size, num_images=10**6)
    fin = data.build_dataset("synthetic", "train", data.finetune_transform(size), img_size=size, num_images=10**6)
    t_pre, t_fin = rate(lambda i: pre[(i, i)]), rate(lambda i: fin[(i, i)])
    print(f"{size:4d} px  generation {gen:7.0f}   + pretrain transform {t_pre:7.0f}   + finetune transform {t_fin:7.0f}")

print("loader, img/s of wall time (depends on free cores):")
for size, batch in ((32, 256), (224, 64)):
    ds = data.build_dataset("synthetic", "train", data.pretrain_transform(size), img_size=size, num_images=10**6)
    loader = data.build_loader(ds, batch, train=True, workers=args.workers)
    print(f"{size:4d} px  {args.workers} workers, batch {batch}, pretrain transform {loader_rate(loader):7.0f}")

print("in-memory images (an .npz of 50 000 random 32-px images), the pretraining transform, img/s of wall time:")
with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    for size, n in ((32, 50000), (96, 10000)):
        path = os.path.join(tmp, f"mem{size}.npz")
        np.savez(path, images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels=np.zeros(n, int))
        ds = data.build_dataset(path, "train", data.pretrain_transform(size, scale=(0.2, 1.0)), img_size=size)
        for name, kw in ((f"{args.workers} workers, per image", dict(workers=args.workers)),
                         (f"DeviceLoader on {args.device}", dict(workers=0, device=args.device))):
            loader = data.build_loader(ds, 256, train=True, **kw)
            loader.sampler.set_epoch(0)
            print(f"{size:4d} px  {name:<28} {loader_rate(loader):9.0f}")
