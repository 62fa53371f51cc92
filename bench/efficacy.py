"""Does pretraining with these files give a better encoder than training from scratch? One command that answers it
on any data, honestly: every method pretrains on the training images without their labels; every encoder and a
from-scratch model of the same architecture are fine-tuned with one recipe whose LR and layer decay each gets from
the same small sweep on a validation split carved out of the training images; the test split is touched once, by
the final runs, whose final-epoch top-1 is reported (no best-epoch picking).

    python bench/efficacy.py --data ../shared/data/cifar10 --budget cpu --out runs/efficacy   # 2 cores, bf16, 75 min
    python bench/efficacy.py --data ../shared/data/cifar10 --budget cpu_small --methods mae \\
        --out runs/efficacy_small                                                         # 2 cores, fp32, ~1.5 h
    python bench/efficacy.py --data cifar10 --budget gpu --out runs/efficacy_gpu               # one GPU, ~8 min
    python bench/efficacy.py --data synthetic --budget smoke --out /tmp/eff                    # the pipeline, ~1 min

Stages (each a run of the repository's own scripts, in a folder of --out; a finished stage is skipped, an
interrupted one continues with --resume; --jobs of them run side by side):
  data       the training images (all of them: pretraining), a stratified validation split carved out of them
             (the sweep), 100 % and 10 % label subsets (stratified, fixed seed), the test split; as .npz folders
  pretrain   mae.py, simmim.py, localmim.py on the images without labels; maskalign.py distils the MAE encoder of
             this run (no labels, no outside data)
  probe      frozen features (the mean patch token): kNN (k = 20, cosine) and a ridge classifier (its penalty picked
             on the validation split), for every encoder, the same architecture at random init, and raw pixels
  sweep      finetune.py at 10 % of the labels of the training part, every (LR, layer decay) of the grid, for
             scratch and for every encoder alike; the final-epoch validation top-1 picks each model's setting
  final      finetune.py with that setting at 100 % and 10 % of the labels (10 %: several seeds; cpu_small: 10 %
             only), test top-1
Writes results.md (the table), results.json and results.png, and prints the wall time of every stage.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not bench/
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import vit  # noqa: E402

ROOT = sys.path[0]
METHODS = ("mae", "simmim", "localmim", "maskalign")
MODEL = ["--model", "vit_tiny_patch16_224", "--model-patch-size", "4", "--depth", "6"]  # ViT-Tiny/4, 6 blocks
BUDGETS = {
    # 2 CPU cores with AVX-512 BF16, under 2 hours (75 min measured on the README's machine C): each method gets
    # about the same pretraining time on one core (epochs from the img/s of bench/pretrain.py), fine-tuning is
    # short; layer decay 1.0 lost to 0.75 for every model, scratch included, in a 2 x 2 sweep of an earlier run
    # (validation split), so the grid keeps 0.75 alone
    "cpu": dict(img_size=32, device="cpu", jobs=2, pretrain=dict(mae=15, simmim=6, localmim=7, maskalign=10),
                finetune_epochs=dict(full=2, few=12), sweep=dict(lr=(1e-3, 2e-3), layer_decay=(0.75,)),
                seeds=2, batch=64),
    # 2 CPU cores without AVX-512 BF16 (fp32, about 5x slower): the same protocol at a quarter of the pretraining,
    # scarce labels only (full=0: no 100 % row; one epoch of it would say little); with --methods mae about 1.5 h
    "cpu_small": dict(img_size=32, device="cpu", jobs=2, pretrain=dict(mae=4, simmim=2, localmim=2, maskalign=3),
                      finetune_epochs=dict(full=0, few=8), sweep=dict(lr=(1e-3, 2e-3), layer_decay=(0.75,)),
                      seeds=2, batch=64),
    # one GPU, about 8 minutes: two stages share it; no torch.compile (its minute would not pay back in runs this
    # short); the data on the device (DeviceLoader), so a stage costs its steps and a few seconds of start-up
    "gpu": dict(img_size=32, device="cuda", jobs=2, pretrain=dict(mae=40, simmim=15, localmim=20, maskalign=20),
                finetune_epochs=dict(full=10, few=40), sweep=dict(lr=(1e-3, 2e-3), layer_decay=(0.75, 1.0)),
                seeds=3, batch=256),
    # the pipeline end to end in seconds (tests): a few synthetic images, one step per stage
    "smoke": dict(img_size=32, device="cpu", jobs=2, pretrain=dict(mae=1, simmim=1, localmim=1, maskalign=1),
                  finetune_epochs=dict(full=1, few=1), sweep=dict(lr=(1e-3,), layer_decay=(0.75, 1.0)), seeds=2,
                  batch=8, num_images=64),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10", help="any --data of the scripts: .npz folder, "
                   "ImageFolder, cifar10/100, stl10, synthetic")
    p.add_argument("--data-dir", default="data", help="where torchvision datasets are (downloaded)")
    p.add_argument("--budget", choices=BUDGETS, default="cpu", help="epochs, sweep grid and seeds (see BUDGETS)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--out", default="runs/efficacy", help="one folder per stage, the results")
    p.add_argument("--resume", action="store_true", help="continue the interrupted stages (finished ones are "
                   "always skipped)")
    p.add_argument("--jobs", type=int, default=None, help="stages side by side (default: the budget's)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of the training images, for the sweep")
    p.add_argument("--few", type=float, default=0.1, help="the scarce-label fraction")
    p.add_argument("--seed", type=int, default=0, help="the splits and subsets")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # a probe stage: OUT/probe.json of one encoder
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: {', '.join(bad)} unknown; choose from {', '.join(METHODS)}")
    if "maskalign" in args.methods and "mae" not in args.methods:
        p.error("--methods: maskalign distils the MAE encoder of the same run; add mae")
    if not 0 < args.val_fraction < 1 or not 0 < args.few <= 1:
        p.error("--val-fraction and --few: fractions in (0, 1)")
    return args


# -----------------------------------------------------------------------------------------------------------------
# Data: every split as an .npz folder the scripts read (train.npz + test.npz)

def stratified(labels, fraction, seed):
    """Indices of a stratified random subset: round(fraction * n_c) of every class c, sorted."""
    rng, keep = np.random.default_rng(seed), []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep += list(rng.permutation(idx)[:max(1, round(fraction * len(idx)))])
    return np.sort(np.array(keep))


def load_images(args, split, size, limit=None):
    """(uint8 N,H,W,3 array at `size` px, labels) of any --data."""
    ds = data.build_dataset(args.data, split, None, args.data_dir, size, num_images=limit)
    x = ds.source if ds.kind == "memory" else torch.stack([ds.load(i)[0] for i in range(len(ds))])
    if x.shape[-1] != size:  # e.g. STL-10 at 96 px: the budget's resolution
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy(), np.array(ds.labels), ds.classes


def write_splits(args, budget, folder):
    """The .npz folders of every stage and index.npz (the split indices into the training images)."""
    size, limit = budget["img_size"], budget.get("num_images")
    x, y, classes = load_images(args, "train", size, limit)
    xt, yt, _ = load_images(args, "test", size, limit and limit // 2)
    val = stratified(y, args.val_fraction, args.seed)
    part = np.setdiff1d(np.arange(len(y)), val)  # the training part of the sweep
    index = dict(val=val, part=part, sweep_few=part[stratified(y[part], args.few, args.seed + 1)],
                 final_few=stratified(y, args.few, args.seed + 1), final_full=np.arange(len(y)))
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "index.npz"), **index)
    for name, train, held in (("pretrain", index["final_full"], None), ("sweep_few", index["sweep_few"], val),
                              ("final_full", index["final_full"], "test"), ("final_few", index["final_few"], "test")):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        np.savez(os.path.join(folder, name, "train.npz"), images=x[train], labels=y[train], class_names=classes)
        if isinstance(held, str):  # the test split
            hx, hy = xt, yt
        else:  # the validation split; none for pretraining (a placeholder image: the scripts read train.npz only)
            hx, hy = (x[held], y[held]) if held is not None else (x[:1], y[:1])
        np.savez(os.path.join(folder, name, "test.npz"), images=hx, labels=hy, class_names=classes)
    return {k: len(v) for k, v in index.items()} | {"test": len(yt), "img_size": size}


# -----------------------------------------------------------------------------------------------------------------
# Frozen features: kNN and a ridge classifier (the penalty picked on the validation split)

@torch.no_grad()
def features(model, images, batch=500):
    """The mean patch token after the encoder's final norm, (N, D); images uint8 (N, H, W, 3)."""
    model.eval()
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        x = (torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        out.append(model.forward_features(x)[:, model.num_prefix:].mean(1).float())
    return torch.cat(out)


def knn(train, ytrain, test, ytest, k=20, temperature=0.07):
    """Top-1 % of a cosine kNN with similarity-weighted votes (DINO's)."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    classes, hits = int(ytrain.max()) + 1, 0
    for i in range(0, len(test), 1000):
        sim, idx = (test[i:i + 1000] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), classes).scatter_add_(1, ytrain[idx], (sim / temperature).exp())
        hits += (votes.argmax(1) == ytest[i:i + 1000]).sum().item()
    return 100 * hits / len(test)


def ridge(train, ytrain, test, ytest, penalty):
    """Top-1 % of a least-squares classifier on standardised features (one-hot targets, L2 penalty x N)."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    a, b = (F.pad((t - mu) / sd, (0, 1), value=1.0).double() for t in (train, test))  # a bias column
    targets = F.one_hot(ytrain, int(ytrain.max()) + 1).double()
    w = torch.linalg.solve(a.T @ a + penalty * len(a) * torch.eye(a.shape[1], dtype=torch.double), a.T @ targets)
    return 100 * ((b @ w).argmax(1) == ytest).double().mean().item()


def probe(folder, encoder):
    """kNN and ridge of one feature set: `pixels`, `init:PATH` (random init of PATH's architecture) or a file. The
    ridge penalty is picked on the validation split (fitted on the rest of the training images), then the
    classifier is fitted on all training images and measured on the test split."""
    splits = os.path.join(folder, "data")
    train, test = (np.load(os.path.join(splits, *f)) for f in (("pretrain", "train.npz"), ("final_full", "test.npz")))
    index = np.load(os.path.join(splits, "index.npz"))
    if encoder == "pixels":  # 2 x 2 average pooling: 16 x 16 x 3 values at 32 px
        feat = lambda x: F.avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2).float(), 2).flatten(1)  # noqa: E731
    else:
        torch.manual_seed(0)
        sd, arch = vit.load_checkpoint(encoder.removeprefix("init:"))
        model = vit.VisionTransformer(**arch, num_classes=0)
        if not encoder.startswith("init:"):
            model.load_state_dict(sd)
        feat = lambda x: features(model, x)  # noqa: E731
    ftrain, ftest = feat(train["images"]), feat(test["images"])
    ytrain, ytest = torch.from_numpy(train["labels"]), torch.from_numpy(test["labels"])
    part, val = torch.from_numpy(index["part"]), torch.from_numpy(index["val"])
    penalty = max((1e-4, 1e-3, 1e-2, 1e-1), key=lambda lam: ridge(ftrain[part], ytrain[part], ftrain[val],
                                                                   ytrain[val], lam))
    return {"knn": knn(ftrain, ytrain, ftest, ytest), "ridge": ridge(ftrain, ytrain, ftest, ytest, penalty),
            "ridge_penalty": penalty}


# -----------------------------------------------------------------------------------------------------------------
# Stages: runs of the scripts, side by side, each in its own folder; done.json marks a finished one

def pretrain_argv(args, budget, method, folder):
    argv = [f"{method}.py", "--preset", "cifar", "--data", os.path.join(folder, "data", "pretrain"),
            "--img-size", str(budget["img_size"]), "--epochs", str(budget["pretrain"][method]),
            "--device", budget["device"], "--no-compile", "--workers", "0", "--seed", str(args.seed)]
    if method == "maskalign":  # its teacher: this run's MAE encoder, learned from the same unlabeled images
        argv += ["--teacher", os.path.join(folder, "pretrain_mae", "encoder.pth")]
    if "num_images" in budget:  # smoke: a few images, small batches
        argv += ["--batch-size", str(budget["batch"]), "--warmup-epochs", "0"]
    return argv


def finetune_argv(args, budget, folder, model, split, lr, layer_decay, seed):
    encoder = os.path.join(folder, f"pretrain_{model}", "encoder.pth")
    scratch = os.path.join(folder, "pretrain_mae", "encoder.pth")  # only its architecture: init:
    epochs = budget["finetune_epochs"]["full" if split.endswith("full") else "few"]
    return ["finetune.py", "--pretrained", f"init:{scratch}" if model == "scratch" else encoder,
            "--data", os.path.join(folder, "data", split), "--recipe", "mae", "--lr", str(lr), "--layer-decay",
            str(layer_decay), "--epochs", str(epochs), "--warmup-epochs", str(round(0.1 * epochs, 2)),
            "--randaug", "0", "--smoothing", "0.1", "--drop-path", "0.1",  # short runs: crop + flip only
            "--batch-size", str(budget["batch"]), "--device", budget["device"], "--no-compile", "--workers", "0",
            "--seed", str(seed), "--log-every", "1000", "--eval-every", str(epochs)]  # only the final epoch counts


def final_runs(budget):
    """(split, seed) of the final runs: 100 % of the labels once (unless the budget gives it 0 epochs), the scarce
    labels with every seed."""
    full = [("final_full", 0)] if budget["finetune_epochs"]["full"] else []
    return full + [("final_few", s) for s in range(budget["seeds"])]


def final_top1(folder):
    """The last evaluation of a finetune.py run (final epoch: no best-epoch picking)."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f if "top1" in line][-1]["top1"]


def run_stages(stages, jobs, resume, out, threads):
    """stages: [(name, deps, argv or callable -> argv)] in order; runs up to `jobs` at once."""
    done = {name for name, _, _ in stages if os.path.exists(os.path.join(out, name, "done.json"))}
    pending, running, failed = [s for s in stages if s[0] not in done], {}, []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while (pending and not failed) or running:
        for stage in list(pending):
            name, deps, argv = stage
            if len(running) >= jobs or failed or not set(deps) <= done:
                continue
            folder = os.path.join(out, name)
            argv = argv() if callable(argv) else argv
            if os.path.exists(os.path.join(folder, "ckpt.pt")):
                if not resume:
                    sys.exit(f"error: stage {name} was interrupted ({folder} holds its checkpoint); continue with "
                             f"--resume")
                argv = argv + ["--resume"]
            os.makedirs(folder, exist_ok=True)
            log = open(os.path.join(folder, "run.log"), "a")
            proc = subprocess.Popen([sys.executable, *argv, "--out", folder], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), log)
            pending.remove(stage)
            print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                tail = open(os.path.join(out, name, "run.log")).read().strip().splitlines()[-1:]
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {name}: {' '.join(tail)}", flush=True)
                failed.append(name)
                continue
            with open(os.path.join(out, name, "done.json"), "w") as f:
                json.dump({"wall_s": round(time.time() - t0, 1)}, f)
            done.add(name)
            print(f"[{time.strftime('%H:%M:%S')}] done  {name} ({(time.time() - t0) / 60:.1f} min)", flush=True)
        time.sleep(0.5)
    if failed:
        sys.exit(f"error: stage(s) {', '.join(failed)} failed; see {out}/<stage>/run.log, then rerun with --resume")


def wall(out, name):
    path = os.path.join(out, name, "done.json")
    return json.load(open(path))["wall_s"] if os.path.exists(path) else None


# -----------------------------------------------------------------------------------------------------------------
# The report

def report(args, budget, out, sizes, probes, choice, finals):
    models = ["scratch", *args.methods]
    rows, table = {}, []
    for name in ["pixels", "init", *models]:
        r = dict(probe=probes.get(name))
        if name in models:
            few = [finals[(name, "final_few", s)] for s in range(budget["seeds"])]
            r.update(lr=choice[name][0], layer_decay=choice[name][1], few=few, full=finals.get((name, "final_full", 0)),
                     few_mean=float(np.mean(few)), few_std=float(np.std(few, ddof=1)) if len(few) > 1 else 0.0)
        if name in args.methods:
            minutes = round(wall(out, f"pretrain_{name}") / 60, 1)
            r.update(pretrain_epochs=budget["pretrain"][name], pretrain_min=minutes)
        rows[name] = r
    label = {"pixels": "raw pixels (2x2 pooled)", "init": "random init (same ViT)", "scratch": "from scratch",
             "mae": "MAE", "simmim": "SimMIM", "localmim": "LocalMIM", "maskalign": "MaskAlign (MAE teacher)"}
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    table.append(f"| model | pretraining | kNN | linear (ridge) | fine-tune {args.few * 100:g} % labels (mean ± std, "
                 f"{budget['seeds']} seeds) | fine-tune 100 % labels | LR / layer decay (sweep) |")
    table.append("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        p = r["probe"] or {}
        pre = f"{r['pretrain_epochs']} ep, {r['pretrain_min']} min" if "pretrain_epochs" in r else "–"
        few = f"{r['few_mean']:.1f} ± {r['few_std']:.1f}" if "few" in r else "–"
        table.append(f"| {label[name]} | {pre} | {fmt(p.get('knn'))} | {fmt(p.get('ridge'))} | {few} | "
                     f"{fmt(r.get('full'))} | {r.get('lr', '–')} / {r.get('layer_decay', '–')} |")
    hw = (torch.cuda.get_device_name() if budget["device"] == "cuda" else
          f"CPU, {os.cpu_count()} cores ({budget['jobs']} stages side by side)")
    times = {name: wall(out, name) for name in sorted(os.listdir(out)) if wall(out, name) is not None}
    total, groups = sum(times.values()), {}
    for name, t in times.items():  # pretraining per method; the sweep, final runs and probes as a whole
        key = name if name.startswith("pretrain") else name.split("_")[0]
        groups[key] = groups.get(key, 0) + t
    text = "\n".join([
        f"# Efficacy: pretraining vs from scratch (`--budget {args.budget}`, `--data {args.data}`)", "",
        f"{hw}; torch {torch.__version__}. ViT-Tiny/4, 6 blocks, {sizes['img_size']} px. Training images "
        f"{sizes['final_full']} (validation {sizes['val']} carved out of them for the sweep), test {sizes['test']}; "
        f"{args.few * 100:g} % labels = {sizes['final_few']} images. Test top-1 of the final epoch.", "", *table, "",
        f"Stage time, summed over the {budget['jobs']} stages run side by side: {total / 60:.0f} min (" +
        ", ".join(f"{k} {v / 60:.1f}" for k, v in groups.items()) + " min)."])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(budget=args.budget, data=args.data, sizes=sizes, rows=rows, wall_s=times), f, indent=1)
    plot(rows, label, os.path.join(out, "results.png"), args.few)
    print(text)


def plot(rows, label, path, few):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in rows if "few" in rows[n]]
    series = [(f"fine-tune {few * 100:g} %", [rows[n]["few_mean"] for n in names], [rows[n]["few_std"] for n in names]),
              ("fine-tune 100 %", [rows[n]["full"] for n in names], None),
              ("kNN", [(rows[n]["probe"] or {}).get("knn", 0) for n in names], None)]
    series = [x for x in series if None not in x[1]]  # a budget without 100 % runs
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    for k, (what, values, err) in enumerate(series):
        ax.bar(np.arange(len(names)) + (k - 1) * 0.27, values, 0.27, yerr=err, label=what, capsize=3)
    ax.axhline((rows["pixels"]["probe"] or {}).get("knn", 0), color="gray", ls="--", lw=1, label="kNN, raw pixels")
    ax.set_xticks(np.arange(len(names)), [label[n] for n in names], fontsize=8)
    ax.set_ylabel("test top-1 (%)"), ax.legend(fontsize=8), ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    if args.probe:  # run by a probe stage: --out is its folder, beside the data folder
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(probe(os.path.dirname(os.path.abspath(args.out)), args.probe), f)
        return
    budget = BUDGETS[args.budget]
    jobs = args.jobs or budget["jobs"]
    out = args.out
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    folder = os.path.join(out, "data")
    if not os.path.exists(os.path.join(folder, "sizes.json")):
        t0 = time.time()
        try:
            sizes = write_splits(args, budget, folder)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        with open(os.path.join(folder, "sizes.json"), "w") as f:
            json.dump(sizes, f)
        with open(os.path.join(folder, "done.json"), "w") as f:
            json.dump({"wall_s": round(time.time() - t0, 1)}, f)
    sizes = json.load(open(os.path.join(folder, "sizes.json")))
    print(f"data: {sizes}")
    threads = max(1, (os.cpu_count() or 1) // jobs) if budget["device"] == "cpu" else 4

    # pretraining (MaskAlign after MAE, its teacher), then probes, the sweep and the final runs
    stages = [(f"pretrain_{m}", ["pretrain_mae"] if m == "maskalign" else [], pretrain_argv(args, budget, m, out))
              for m in args.methods]
    models = ["scratch", *args.methods]
    encoders = [("pixels", "pixels", "data"), ("init", "init:" + os.path.join(out, "pretrain_mae", "encoder.pth"),
                                               "pretrain_mae")]
    encoders += [(m, os.path.join(out, f"pretrain_{m}", "encoder.pth"), f"pretrain_{m}") for m in args.methods]
    stages += [(f"probe_{name}", [dep] if dep != "data" else [],
                [os.path.join("bench", "efficacy.py"), "--probe", enc]) for name, enc, dep in encoders]
    grid = [(lr, ld) for lr in budget["sweep"]["lr"] for ld in budget["sweep"]["layer_decay"]]
    for m in models:
        dep = "pretrain_mae" if m == "scratch" else f"pretrain_{m}"
        stages += [(f"sweep_{m}_lr{lr}_ld{ld}", [dep], finetune_argv(args, budget, out, m, "sweep_few", lr, ld, 0))
                   for lr, ld in grid]
    choice = {}

    def chosen(m):  # the best final-epoch validation top-1 of the sweep; ties go to the first setting of the grid
        if m not in choice:
            scores = [(final_top1(os.path.join(out, f"sweep_{m}_lr{lr}_ld{ld}")), -k) for k, (lr, ld) in
                      enumerate(grid)]
            choice[m] = grid[-max(scores)[1]]
        return choice[m]
    for m in models:
        sweeps = [f"sweep_{m}_lr{lr}_ld{ld}" for lr, ld in grid]
        stages += [(f"{split}_{m}_seed{s}", sweeps,
                    lambda m=m, split=split, s=s: finetune_argv(args, budget, out, m, split, *chosen(m), s))
                   for split, s in final_runs(budget)]
    run_stages(stages, jobs, args.resume, out, threads)

    probes = {name: json.load(open(os.path.join(out, f"probe_{name}", "probe.json"))) for name, _, _ in encoders}
    finals = {(m, split, s): final_top1(os.path.join(out, f"{split}_{m}_seed{s}"))
              for m in models for split, s in final_runs(budget)}
    report(args, budget, out, sizes, probes, {m: chosen(m) for m in models}, finals)
    print(f"wall time {(time.time() - t_start) / 60:.1f} min (this invocation)")


if __name__ == "__main__":
    main()
