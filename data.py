"""
Data for every script: the transforms of the papers, the datasets behind `--data`, a loader that resumes exactly, and
the pictures every script writes (labelled image grids, loss curves).

    ds = build_dataset(args.data, "train", pretrain_transform(224), data_dir=args.data_dir, img_size=224)
    loader = build_loader(ds, args.batch_size, train=True, workers=args.workers, seed=args.seed)
    loader.sampler.set_epoch(epoch, skip_batches=step_in_epoch)   # before each epoch, also after --resume

`--data` is `synthetic` (default: dead-leaves images made on the fly, offline), `cifar10`/`cifar100`/`stl10`
(torchvision, downloaded into --data-dir), a folder in ImageFolder layout, or a .npz file / a folder with
train.npz + test.npz (`images` uint8 NHWC, `labels`). Split "train" is the training split; any other name
("val", "test") is the held-out one.

Exact resume: the sampler yields (index, sample_seed) pairs with sample_seed a hash of (seed, epoch, index), and
the dataset seeds torch's RNG with it around the transform. The augmentation of an image is therefore the same
whatever the number of workers, processes, or where the run was stopped, and `set_epoch(e, skip_batches=k)`
continues an epoch at batch k without loading the first k batches.
"""
import functools
import json
import math
import os
import signal
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL = 64  # at or below this size (CIFAR, STL-10 at 64, synthetic at 32) the ImageNet crops make no sense

# -----------------------------------------------------------------------------
# Transforms. Input: a uint8 (3, H, W) tensor of any size (every dataset below returns one); output: float
# (3, img_size, img_size), normalised with the ImageNet statistics as in all four papers.


def _to_float():
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _small_crop(img_size, interpolation):
    # The CIFAR recipe: bring the image to img_size (a no-op when it already is), then a random crop of a
    # reflect-padded copy. It keeps the pixel grid; a RandomResizedCrop at scale 0.2 on a 32 px image would
    # upsample a 14 px crop 2.3x, and masked-pixel targets would become blur that is trivial to interpolate.
    return [T.Resize(img_size, interpolation=interpolation), T.CenterCrop(img_size),
            T.RandomCrop(img_size, padding=img_size // 8, padding_mode="reflect")]


def pretrain_transform(img_size, scale=(0.67, 1.0), interpolation="bilinear"):
    """SimMIM: RandomResizedCrop(scale 0.67-1, bilinear) + flip (data_simmim.py); the MAE family (LocalMIM,
    MaskAlign) passes scale=(0.2, 1.0), interpolation="bicubic" (main_pretrain.py). At img_size <= 64 both use
    the padded random crop + flip instead, and `scale` is unused (see _small_crop). `.batched` is the same
    augmentation for a whole batch on its device (build_loader uses it for images held in memory)."""
    if img_size <= SMALL:
        crop = _small_crop(img_size, interpolation)
    else:
        crop = [T.RandomResizedCrop(img_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=interpolation)]
    transform = T.Compose([T.ToImage(), *crop, T.RandomHorizontalFlip(), *_to_float(), T.ToPureTensor()])
    transform.batched = functools.partial(batch_augment, img_size=img_size, scale=scale, interpolation=interpolation)
    return transform


def batch_augment(x, generator, img_size, scale=(0.67, 1.0), interpolation="bilinear"):
    """pretrain_transform for a batch, on its device, every sample with its own draw: uint8 (B, 3, H, W) -> float
    (B, 3, S, S), normalised. The crops have pretrain_transform's distribution: at <= 64 px the same padded random
    crop (after the same resize), above it RandomResizedCrop's boxes (same scale, ratio, 10 tries, centre-crop
    fallback) resampled by roi_align, which is bilinear with area averaging when it shrinks (not bicubic)."""
    B, _, H, W = x.shape
    dev, g = x.device, generator
    x = x.float()
    if img_size <= SMALL:
        if (H, W) != (img_size, img_size):  # T.Resize(short side) + CenterCrop, as _small_crop
            x = F.interpolate(x, scale_factor=img_size / min(H, W), mode=interpolation, antialias=True).round()
            top, left = (x.shape[2] - img_size) // 2, (x.shape[3] - img_size) // 2
            x = x[:, :, top:top + img_size, left:left + img_size].clamp(0, 255)
        pad = img_size // 8
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        offset = torch.randint(0, 2 * pad + 1, (2, B, 1), device=dev, generator=g)  # top, left of each crop
        rows, cols = offset + torch.arange(img_size, device=dev)  # (B, S) each
        x = x[torch.arange(B, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]  # (B, 3, S, S)
    else:
        top, left, h, w = rrc_boxes(B, H, W, scale, (3 / 4, 4 / 3), g, dev)
        boxes = torch.stack([torch.arange(B, device=dev), left, top, left + w, top + h], 1).float()  # (B, 5)
        x = torchvision.ops.roi_align(x, boxes, img_size, aligned=True)  # (B, 3, S, S)
    flip = torch.rand(B, device=dev, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def rrc_boxes(B, H, W, scale, ratio, generator, device):
    """RandomResizedCrop.get_params for B images at once: 10 tries of (area, log-ratio) each, the first that fits,
    else the centre crop of the nearest allowed ratio. -> top, left, height, width, (B,) long each."""
    g = generator
    area = H * W * torch.empty(B, 10, device=device).uniform_(*scale, generator=g)
    aspect = torch.exp(torch.empty(B, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                   generator=g))
    w, h = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()  # (B, 10)
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.float().argmax(1)  # the first try that fits
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    u = torch.rand(2, B, device=device, generator=g)
    top, left = (u[0] * (H - h + 1)).long(), (u[1] * (W - w + 1)).long()
    # torchvision's fallback when no try fits: the centre crop, clipped to the allowed ratios (always computed, so
    # that a GPU never waits for the host to look)
    cw, ch = (W, round(W / ratio[0])) if W / H < ratio[0] else (round(H * ratio[1]), H) if W / H > ratio[1] else (W, H)
    none = ~fits.any(1)
    h, w = torch.where(none, ch, h), torch.where(none, cw, w)
    top, left = torch.where(none, (H - ch) // 2, top), torch.where(none, (W - cw) // 2, left)
    return top, left, h, w


def finetune_transform(img_size, randaug_magnitude=9, reprob=0.25):
    """timm's create_transform as used by MAE/SimMIM fine-tuning (rand-m9-mstd0.5-inc1, reprob 0.25 'pixel'),
    written with torchvision v2. Differences to timm: torchvision's RandAugment has no magnitude noise (mstd0.5)
    and no 'inc' variants, and rotates/shears bilinearly (tensor kernels have no bicubic affine). MixUp/CutMix
    act on batches and live in finetune.py. randaug_magnitude 0 and reprob 0: crop and flip only, which is
    pretrain_transform's (scale 0.08-1, bicubic) and so has its `.batched` twin for in-memory images."""
    if not 0 <= randaug_magnitude <= 10:
        raise ValueError(f"randaug magnitude {randaug_magnitude}: must be in 0..10 (timm's m0-m10 scale)")
    if randaug_magnitude == 0 and reprob == 0:
        return pretrain_transform(img_size, scale=(0.08, 1.0), interpolation="bicubic")
    if img_size <= SMALL:
        crop = _small_crop(img_size, "bicubic")  # the usual small-image recipe; RRC at scale 0.08 is too harsh
    else:
        crop = [T.RandomResizedCrop(img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic")]
    return T.Compose([
        T.ToImage(), *crop, T.RandomHorizontalFlip(),
        # 11 bins make magnitude 9 mean 9/10 of each op's range, timm's scale (torchvision's default is 31 bins);
        # timm fills the uncovered corners with the mean pixel, not black.
        T.RandAugment(num_ops=2, magnitude=randaug_magnitude, num_magnitude_bins=11, interpolation="bilinear",
                      fill=[round(255 * m) for m in IMAGENET_MEAN]),
        *_to_float(),
        # value="random" fills the box with per-pixel N(0, 1) noise in normalised space: exactly timm's mode='pixel'
        # (same area 0.02-1/3 and log aspect 0.3-3.3, one box).
        T.RandomErasing(p=reprob, value="random"),
        T.ToPureTensor()])


def eval_transform(img_size, crop_pct=0.875):
    """Resize the short side to img_size / crop_pct (256 for 224, bicubic) and centre-crop (MAE, SimMIM, timm).
    At img_size <= 64 there is no border to crop away: an image of img_size passes unchanged (Resize and
    CenterCrop are no-ops then), any other size is resized to img_size."""
    size = img_size if img_size <= SMALL else int(img_size / crop_pct)
    return T.Compose([T.ToImage(), T.Resize(size, interpolation="bicubic"), T.CenterCrop(img_size),
                      *_to_float(), T.ToPureTensor()])


def denormalize(x):
    """Normalised (B, 3, H, W) or (3, H, W) back to [0, 1] for pictures."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


# -----------------------------------------------------------------------------
# Synthetic data: a dead-leaves model (Baradad et al., "Learning to See by Looking at Noise", NeurIPS 2021):
# opaque shapes with power-law sizes, random colours, shading and 1/f texture, painted back to front. Such images
# have the occlusion edges and nearly the spectrum of natural images (power ~ f^-2.3 at 32 px, f^-2.5 at 224;
# natural images ~ f^-2, CIFAR-10 ~ f^-2.8 measured the same way). The label is the type of the 1-3 larger
# shapes painted last (in front); the leaves behind are of random types, and colours, shading and sizes do not
# depend on the class, so only shape tells the classes apart. Geometry is in units of the image side, so an
# index shows the same scene at every resolution.

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "ellipse", "crescent", "semicircle", "corner")
LEAVES, RMIN, RMAX = 64, 0.05, 0.6  # leaves behind the class shapes, their radius range


def _arc(a0, a1, n, cx=0.0, r=1.0, ry=1.0):
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), r * ry * np.sin(t)], 1)


def _templates(k=22):
    """Each shape as a polygon of k vertices, radius about 1 (short ones repeat their last vertex), so all the
    leaves of an image are placed in one vectorised step. 'ring' is drawn as an annulus, not from its polygon."""
    w, a0, b0 = 0.33, math.atan2(0.79, 0.61), math.acos(0.11 / 0.8)
    star_a, star_r = np.arange(10) * math.pi / 5 - math.pi / 2, np.where(np.arange(10) % 2, 0.42, 1.0)
    polys = [
        _arc(0, 2 * math.pi, 21)[:-1],  # circle
        [(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)],  # square
        _arc(math.pi / 2, math.pi / 2 + 2 * math.pi, 4)[:-1],  # triangle
        _arc(0, 2 * math.pi, 21)[:-1],  # ring
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
         (-w, -w)],  # cross
        np.stack([star_r * np.cos(star_a), star_r * np.sin(star_a)], 1),  # star
        _arc(0, 2 * math.pi, 21, ry=0.45)[:-1],  # ellipse
        # crescent: the unit disk minus a disk of radius 0.8 at (0.5, 0); the circles cross at (0.61, +-0.79)
        np.concatenate([_arc(a0, 2 * math.pi - a0, 12), _arc(2 * math.pi - b0, b0, 10, cx=0.5, r=0.8)]),
        _arc(0, math.pi, 14),  # semicircle
        [(-.8, -.8), (-.25, -.8), (-.25, .25), (.8, .25), (.8, .8), (-.8, .8)],  # corner (an L)
    ]
    out = np.zeros((len(polys), k, 2))
    for i, p in enumerate(polys):
        p = np.asarray(p, dtype=float)
        p = p - (p.max(0) + p.min(0)) / 2  # centre the bounding box, so crescents and semicircles stay in view
        out[i] = np.concatenate([p, np.repeat(p[-1:], k - len(p), 0)])
    return out, [2 * len(p) for p in polys]


TEMPLATES, NCOORDS = _templates()  # (10, K, 2) vertices, and the number of real coordinates of each shape


def _pink_noise(n, seed=0):
    """An n x n tile of 1/f noise (random phases, amplitude ~ 1/f, std 1), fixed for all images. Leaves sample it
    at their own offsets: cheap texture that gives the fine detail of natural images (power ~ 1/f^2)."""
    f = np.sqrt(np.fft.fftfreq(n)[:, None] ** 2 + np.fft.rfftfreq(n)[None] ** 2)
    phase = np.random.default_rng(seed).uniform(0, 2 * math.pi, f.shape)
    tile = np.fft.irfft2(np.exp(1j * phase) / np.maximum(f, 1 / n), s=(n, n))
    return (tile / tile.std()).astype(np.float32).ravel()


TILE = 256
NOISE = _pink_noise(TILE)  # flat, TILE * TILE


def synthetic_image(index, seed=0, split=0, size=32):
    """Image `index` of the synthetic set as uint8 (3, size, size), and its label; a pure function of the
    arguments (split: 0 train, 1 held out). Vectorised numpy + PIL: ~0.4 ms at 32 px, ~1.3 ms at 224 on a core."""
    rng = np.random.default_rng([seed, split, index])
    label = index % len(SHAPES)  # exactly balanced classes
    n_obj = 1 + int(rng.integers(3))
    n = LEAVES + n_obj
    g = rng.random((n, 5))  # per leaf: radius, x, y, angle, type
    # Dead-leaves radii have density ~ r^-3 (scale invariance, Lee, Mumford & Huang 2001): inverse-CDF sampling.
    r = (RMIN ** -2 - g[:, 0] * (RMIN ** -2 - RMAX ** -2)) ** -0.5
    xy = g[:, 1:3] * 1.2 - 0.1  # centres a little outside the frame too, as in an unbounded field of leaves
    kind = (g[:, 4] * len(SHAPES)).astype(int)
    r[-n_obj:] = 0.15 + 0.15 * g[-n_obj:, 0]  # the class shapes: larger, nearer the centre, in front
    xy[-n_obj:] = 0.25 + 0.5 * g[-n_obj:, 1:3]
    kind[-n_obj:] = label
    c, s = np.cos(2 * math.pi * g[:, 3:4]), np.sin(2 * math.pi * g[:, 3:4])
    tx, ty = TEMPLATES[kind, :, 0], TEMPLATES[kind, :, 1]  # (n, K)
    px = (tx * c - ty * s) * r[:, None] + xy[:, :1]
    py = (tx * s + ty * c) * r[:, None] + xy[:, 1:]
    polys = (np.stack([px, py], -1) * size).reshape(n, -1).tolist()
    # Paint leaf ids (1..n, 0 = background) back to front with PIL's C rasteriser; later leaves occlude earlier.
    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    for k, (t, poly, (x, y), rad) in enumerate(zip(kind.tolist(), polys, (xy * size).tolist(), (r * size).tolist())):
        if t == 3:  # ring: an annulus, so whatever lies behind shows through the hole
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), outline=k + 1, width=max(1, round(0.45 * rad)))
        else:
            draw.polygon(poly[:NCOORDS[t]], fill=k + 1)  # without the padding vertices: 2x faster
    ids = np.asarray(canvas)  # (S, S)
    # Colour per leaf (leaf 0 is the background): a grey level mixed toward a random RGB by a random saturation,
    # times a luminance made of a linear shading and a patch of the 1/f noise tile at a random shift. Flat leaves
    # alone give a power spectrum ~ f^-3 at 224 px; the texture brings it toward the f^-2 of natural images.
    p = rng.random((n + 1, 9)).astype(np.float32)
    grey = 0.1 + 0.8 * p[:, :1]
    w = np.empty((7, n + 1), np.float32)  # per leaf: r, g, b, luminance offset, x-slope, y-slope, noise amplitude
    w[0:3] = (grey + p[:, 1:2] * (p[:, 2:5] - grey)).T
    w[4:6] = 1.6 * (p[:, 5:7].T - 0.5)  # shading slope per image side
    w[3] = 1 - w[4] * np.append(0.5, xy[:, 0]) - w[5] * np.append(0.5, xy[:, 1])  # luminance 1 at the centre
    w[6] = 0.25 * p[:, 7]
    shift = (p[:, 8] * NOISE.size).astype(np.int64)
    q = np.take(w, ids, axis=1)  # (7, S, S): every pixel's leaf parameters in one gather
    x = np.arange(size, dtype=np.float32)[None] / size  # (1, S)
    u = np.arange(size) * TILE // size  # the tile is sampled in image-relative units, like the geometry
    tile_idx = (u[:, None] * TILE + u[None] + shift.take(ids)) % NOISE.size  # (S, S)
    lum = q[3] + q[4] * x + q[5] * x.T + q[6] * NOISE.take(tile_idx)  # (S, S)
    img = q[:3] * lum  # (3, S, S)
    np.clip(img * 255, 0, 255, out=img)
    return torch.from_numpy(img.astype(np.uint8)), label


# -----------------------------------------------------------------------------
# Datasets. One class: images come from the synthetic generator, from a uint8 (N, 3, H, W) tensor in memory
# (.npz, CIFAR, STL-10), or from files decoded lazily (ImageFolder layout). Each returns a uint8 (3, H, W) tensor.

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VALID = ("synthetic, cifar10, cifar100, stl10, a folder (<class>/*.jpg, or train/ and val/ of those), "
         "or a .npz file / a folder with train.npz and test.npz")


class ImageDataset(Dataset):
    """Items (transform(uint8 image), label); also .labels (all labels, no decoding), .classes, .num_classes."""

    def __init__(self, kind, source, labels, classes, transform, seed=0, split=0, size=32):
        self.kind, self.source, self.labels, self.classes = kind, source, labels, list(classes)
        self.num_classes = len(self.classes)
        self.transform, self.seed, self.split, self.size = transform, seed, split, size

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if self.kind == "synthetic":
            return synthetic_image(i, self.seed, self.split, self.size)
        if self.kind == "memory":
            return self.source[i], self.labels[i]
        # Files: an unreadable one is skipped with a warning and the next readable file stands in, so a long run
        # does not die on one corrupt JPEG; the choice is deterministic, so resume stays exact.
        for j in range(i, i + len(self)):
            path = self.source[j % len(self)]
            try:
                with Image.open(path) as im:
                    return T.functional.pil_to_tensor(im.convert("RGB")), self.labels[j % len(self)]
            except OSError as e:
                warnings.warn(f"skipping unreadable image {path}: {e}")
        raise ValueError(f"--data: none of the {len(self)} images could be read (the last one tried: {path})")

    def __getitem__(self, key):
        # build_loader's sampler passes (index, sample_seed); plain indexing (ds[i]) uses the global RNG.
        i, sample_seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.load(i)
        if self.transform is None:
            return img, label
        if sample_seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream untouched
            torch.default_generator.manual_seed(sample_seed)  # CPU only: torch.manual_seed would reseed CUDA too
            return self.transform(img), label


def _npz(path):
    """(images (N, 3, H, W) uint8 tensor, labels, classes) from a .npz with `images` NHWC and `labels`."""
    try:
        z = np.load(path)
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, AttributeError) as e:  # not a zip, a pickle, truncated, a .npy (no .files)
        raise ValueError(f"--data {path}: not a readable .npz file ({e})") from None
    if "images" not in arrays or "labels" not in arrays:
        raise ValueError(f"--data {path}: needs arrays 'images' (uint8 N,H,W,3) and 'labels'; it has {sorted(arrays)}")
    x, y = arrays["images"], arrays["labels"]
    names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ValueError(f"--data {path}: 'images' must be uint8 (N>0, H, W, 3), got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or y.dtype.kind not in "iu" or y.min() < 0 or (names and y.max() >= len(names)):
        raise ValueError(f"--data {path}: 'labels' must be {len(x)} integers in [0, num_classes), "
                         f"got {y.dtype} {y.shape}")
    classes = names or [str(c) for c in range(int(y.max()) + 1)]
    return torch.from_numpy(x).permute(0, 3, 1, 2), y.tolist(), classes  # a CHW view, no copy


def _readable(path):
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError):  # PIL raises these for truncated or foreign files
        return False


def _subdirs(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _folder(root, classes=None):
    """(files, labels, classes) of root/<class>/**/*.<image ext>, classes sorted by name as in ImageFolder."""
    dirs = _subdirs(root)
    classes = classes or dirs
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in dirs:
        if c not in index:
            raise ValueError(f"--data {root}: class folder '{c}' is not one of the {len(classes)} training classes")
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, name))
                    labels.append(index[c])
    if not files:  # empty class folders are fine, an empty dataset is not
        raise ValueError(f"--data {root}: no images ({', '.join(IMG_EXTENSIONS)}) in class subfolders; "
                         f"expected {root}/<class>/<image>")
    return files, labels, classes


def _torchvision(name, train, data_dir):
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[name]
    kw = {"split": "train" if train else "test"} if name == "stl10" else {"train": train}
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier()  # under torchrun, rank 0 downloads alone while the others wait
    try:
        ds = cls(data_dir, download=False, **kw)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        try:
            ds = cls(data_dir, download=True, **kw)
        except (OSError, RuntimeError) as e:  # offline (URLError is an OSError), or a bad download
            raise FileNotFoundError(
                f"--data {name}: not in --data-dir {data_dir} and could not be downloaded ({type(e).__name__}); "
                f"use --data synthetic, or a .npz file / ImageFolder folder") from None
    finally:
        if first and dist.is_initialized():
            dist.barrier()
    x = torch.from_numpy(ds.data)
    x = x if name == "stl10" else x.permute(0, 3, 1, 2)  # STL-10 is stored NCHW, CIFAR NHWC
    return x, [int(y) for y in (ds.labels if name == "stl10" else ds.targets)], ds.classes


def build_dataset(data, split, transform, data_dir="data", img_size=224, seed=0, num_images=None):
    """The dataset behind `--data` (see the module docstring); items are (transform(uint8 image), label).
    num_images: epoch length of `synthetic` (default 10000 train, 2000 held out); for the other kinds, a fixed
    random subset of that many images. `seed` picks the synthetic images and that subset: keep it fixed across
    runs that should see the same data, and vary the seed of build_loader instead."""
    train = split == "train"
    if num_images is not None and num_images < 1:
        raise ValueError(f"--num-images {num_images}: must be at least 1")
    if data == "synthetic":
        n = num_images or (10000 if train else 2000)
        return ImageDataset("synthetic", None, [i % len(SHAPES) for i in range(n)], SHAPES, transform, seed,
                            split=0 if train else 1, size=img_size)
    if data in ("cifar10", "cifar100", "stl10"):
        kind, (source, labels, classes) = "memory", _torchvision(data, train, data_dir)
    elif not os.path.exists(data):
        if os.sep in data or data.endswith(".npz"):
            raise FileNotFoundError(f"--data {data}: no such file or folder")
        raise ValueError(f"--data {data}: unknown; valid: {VALID}")
    elif os.path.isfile(data):  # one .npz serves both splits, as a flat folder does
        kind, (source, labels, classes) = "memory", _npz(data)
    elif any(os.path.isfile(os.path.join(data, f)) for f in ("train.npz", "test.npz")):
        path = os.path.join(data, "train.npz" if train else "test.npz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {data}: holds no {os.path.basename(path)} for split '{split}'")
        kind, (source, labels, classes) = "memory", _npz(path)
    elif not os.listdir(data):
        raise ValueError(f"--data {data}: empty folder; valid: {VALID}")
    elif os.path.isdir(os.path.join(data, "train")):  # train/ and val/, classes from train/ for both
        classes = _subdirs(os.path.join(data, "train"))
        root = os.path.join(data, "train" if train else "val")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {data}: has train/ but no val/ folder for split '{split}'")
        kind, (source, labels, classes) = "files", _folder(root, classes)
    else:
        kind, (source, labels, classes) = "files", _folder(data)
    if kind == "files" and not any(_readable(f) for f in source):  # else the loader would raise mid-training
        raise ValueError(f"--data {data}: none of the {len(source)} image files can be read, e.g. {source[0]}")
    if num_images is not None and num_images != len(labels):
        if num_images > len(labels):
            raise ValueError(f"--num-images {num_images}: --data {data} has only {len(labels)} {split} images")
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:num_images].sort()[0]
        source = source[keep] if kind == "memory" else [source[i] for i in keep.tolist()]
        labels = [labels[i] for i in keep.tolist()]
    return ImageDataset(kind, source, labels, classes, transform)


# -----------------------------------------------------------------------------
# Sampler and loader


def _hash(*keys):
    """splitmix64 folded over keys (the last may be an array): unrelated 64-bit seeds for nearby inputs."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for k in keys:
            h = np.asarray(k).astype(np.uint64) + h + np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return h


class EpochSampler(Sampler):
    """Yields (index, sample_seed) for this process. Train (shuffle): a permutation per (seed, epoch), split over
    ranks as DistributedSampler does (cut to a multiple of the world size with drop_last, else padded by
    repeating). Eval: rank-strided, no padding and no duplicates, so counts summed over ranks are exact (ranks
    may then differ by one image: reduce after the loop, not per batch). sample_seed depends only on
    (seed, epoch, index), so augmentations do not depend on workers, world size or where a run resumed."""

    def __init__(self, n, batch_size, shuffle, drop_last, seed=0, rank=0, world=1):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = self.skip = 0
        if shuffle:
            self.num = n // world if drop_last else math.ceil(n / world)
        else:
            self.num = len(range(rank, n, world))

    def set_epoch(self, epoch, skip_batches=0):
        """Call before each epoch; skip_batches > 0 resumes an epoch after that many batches."""
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self):  # the full epoch, whatever skip_batches says, so len(loader) is batches per epoch
        return self.num

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(int(_hash(self.seed, self.epoch)))
            total = self.num * self.world
            idx = torch.randperm(self.n, generator=g).repeat(math.ceil(total / self.n))[:total]
            idx = idx[self.rank::self.world]
        else:
            idx = torch.arange(self.rank, self.n, self.world)
        idx = idx[self.skip * self.batch_size:].numpy()  # skipped batches are never loaded
        return iter(zip(idx.tolist(), _hash(self.seed, self.epoch, idx).tolist()))


def build_loader(dataset, batch_size, train, workers=8, seed=0, drop_last=None, device=None):
    """DataLoader over this process's shard; `loader.sampler.set_epoch(epoch, skip_batches)` before each epoch.
    With a device, images held in memory (.npz, CIFAR, STL-10) under a pretraining transform are batched on that
    device instead (DeviceLoader): the same order, distribution and resume, without per-image work."""
    drop_last = train if drop_last is None else drop_last
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    sampler = EpochSampler(len(dataset), batch_size, train, drop_last, seed, rank, world)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(f"--batch-size {batch_size}: larger than the {len(sampler)} images each of the {world} "
                         f"process(es) gets; use a smaller batch or more images")
    if device is not None and dataset.kind == "memory" and hasattr(dataset.transform, "batched") and drop_last:
        return DeviceLoader(dataset, batch_size, sampler, torch.device(device), seed)
    # The private generator only seeds worker processes (every sample is re-seeded anyway); without it the
    # DataLoader would draw that seed from the global RNG on each epoch and shift the training randomness.
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_ctrl_c)


class DeviceLoader:
    """The batches of an in-memory dataset made on the training device: the uint8 images are copied there once,
    and each batch is gathered and augmented by the transform's `.batched` in a few tensor ops (tens of thousands
    of 32-px images per second on a GPU, where PIL workers give a few thousand). The sampler is build_loader's, so
    order, sharding and set_epoch(epoch, skip_batches) are the same; the randomness of batch k of an epoch is a
    function of (seed, epoch, k, rank), so a resumed run draws exactly what the uninterrupted one did."""

    def __init__(self, dataset, batch_size, sampler, device, seed):
        self.images, self.labels = dataset.source.to(device), torch.as_tensor(dataset.labels, device=device)
        self.augment, self.sampler, self.batch_size, self.seed = dataset.transform.batched, sampler, batch_size, seed
        self.generator = torch.Generator(device)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        idx = torch.tensor([i for i, _ in self.sampler], dtype=torch.long)  # this rank's order, skipped batches gone
        for k in range(len(idx) // self.batch_size):
            batch = idx[k * self.batch_size:(k + 1) * self.batch_size].to(self.images.device)
            number = self.sampler.skip + k  # the batch's place in the epoch
            self.generator.manual_seed(int(_hash(self.seed, self.sampler.epoch, number, self.sampler.rank)))
            yield self.augment(self.images[batch], self.generator), self.labels[batch]


def _ignore_ctrl_c(worker_id):
    """A Ctrl-C reaches the loader's workers too; the training process decides when to stop (after its step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# Pictures every script writes

def spread(labels, n):
    """Indices of n pictures spread over the classes: the first image of each class in class order, then the second
    of each, and so on. Fixed for a dataset (no seed), so every run and every epoch shows the same images."""
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    rounds = [[idx[r] for _, idx in sorted(by_class.items()) if r < len(idx)] for r in range(n)]
    return [i for row in rounds for i in row][:n]


def save_grid(rows, labels, path, min_size=96):
    """A PNG of image rows, (n, 3, H, W) in [0, 1] each, one column per image and a label left of each row; images
    smaller than min_size are enlarged (nearest), so 32-px pictures stay readable."""
    from PIL import ImageDraw, ImageFont
    scale = max(1, math.ceil(min_size / rows[0].shape[-1]))
    grid = torch.cat([r.float().cpu() for r in rows])  # (rows * n, 3, H, W)
    grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(grid, nrow=len(rows[0]), padding=2, pad_value=1.0)  # (3, Hg, Wg)
    image = T.functional.to_pil_image(grid)
    font = ImageFont.load_default()
    width = 8 + max(ImageDraw.Draw(image).textlength(t, font=font) for t in labels)
    canvas = Image.new("RGB", (image.width + int(width), image.height), "white")
    canvas.paste(image, (int(width), 0))
    draw, h = ImageDraw.Draw(canvas), (image.height - 2) / len(rows)
    for k, text in enumerate(labels):
        draw.text((4, 2 + h * k + h / 2 - 5), text, fill="black", font=font)
    canvas.save(path)


def plot_log(out, keys=("loss",)):
    """OUT/log.jsonl -> OUT/loss.png: each key (loss; top1 for fine-tuning) against the optimizer step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["step"] for r in recs if key in r], [r[key] for r in recs if key in r], marker=".")
        ax.set_xlabel("optimizer step"), ax.set_title(key), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close(fig)
