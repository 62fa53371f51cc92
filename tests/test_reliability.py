"""Bad input ends in one line naming the flag or file, exit code != 0, no traceback; no code from a checkpoint ever
runs; nothing is lost (an earlier run's checkpoint, a Ctrl-C, non-finite weights). Table-driven over every script
where a category applies; the scripts run in this process (an uncaught exception would fail the test), the
signal and torchrun cases in subprocesses."""
import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import analyze
import finetune
import localmim
import mae
import maskalign
import simmim
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = dict(mae=mae, simmim=simmim, localmim=localmim, maskalign=maskalign, finetune=finetune, analyze=analyze)
TRAINING = ("mae", "simmim", "localmim", "maskalign", "finetune")
VIT = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-patch-size", "4", "--depth", "2"]
TINY = {  # each script's smallest model
    "mae": VIT + ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "4"],
    "simmim": VIT + ["--mask-patch-size", "8"],
    "localmim": VIT[:-1] + ["4"],
    "maskalign": VIT + ["--teacher", "random", "--top-k", "2"],
    "finetune": VIT,
}
CPU = ["--device", "cpu", "--no-compile", "--workers", "0", "--batch-size", "8", "--log-every", "1"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """train.npz (16 images) and test.npz (8) of 32 px, 3 classes: what finetune.py and analyze.py read."""
    d = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    for name, n in (("train", 16), ("test", 8)):
        np.savez(d / f"{name}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 3)
    return str(d)


def argv(script, npz, out, *extra):
    data = ["--data", npz] if script == "finetune" else ["--data", "synthetic", "--num-images", "16"]
    return [*TINY[script], *CPU, *data, "--out", str(out), *extra]


def call(script, args):
    mod = MODULES[script]
    return mod.main(args) if script == "analyze" else mod.main(mod.get_args(args))


def fails(script, args, capsys):
    """The script must stop with a non-zero exit and one line (no traceback: any other exception fails the test)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        call(script, args)
    code = e.value.code
    assert code not in (0, None), "exit code 0"
    line = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in line.strip() and "Traceback" not in line
    return line


# ---- numbers out of range -------------------------------------------------------------------------------------------

COMMON_BAD = [("--img-size", "0"), ("--img-size", "-32"), ("--model-patch-size", "0"), ("--depth", "0"),
              ("--blr", "-1"), ("--blr", "nan"), ("--blr", "inf"), ("--min-lr", "-1"), ("--weight-decay", "-0.1"),
              ("--warmup-epochs", "-1"), ("--steps", "-1"), ("--clip-grad", "-1"), ("--epochs", "0"),
              ("--accum-iter", "0"), ("--log-every", "0"), ("--save-every", "0"), ("--workers", "-1"),
              ("--batch-size", "0")]
BAD = [(s, f, v) for s in TRAINING for f, v in COMMON_BAD]
BAD += [(s, "--drop-path", v) for s in ("simmim", "maskalign", "finetune") for v in ("1.0", "-0.1")]
BAD += [("simmim", "--warmup-lr", "-1"), ("finetune", "--lr", "-1"), ("finetune", "--layer-decay", "2"),
        ("mae", "--decoder-depth", "0"), ("localmim", "--nbins", "0"), ("maskalign", "--top-k", "0")]
BAD += [("analyze", f, v) for f, v in (("--masks", "0"), ("--mask-patch-size", "0"), ("--workers", "-1"),
                                        ("--num-images", "0"), ("--batch-size", "0"))]


@pytest.mark.parametrize("script, flag, value", BAD)
def test_numbers_out_of_range_name_the_flag(script, flag, value, npz, tmp_path, capsys):
    args = ["--avgdist", flag, value] if script == "analyze" else argv(script, npz, tmp_path / "out", flag, value)
    if script == "analyze" and flag in ("--workers", "--num-images", "--batch-size"):
        args = [str(tmp_path / "x.pth"), flag, value]
    assert flag in fails(script, args, capsys)


@pytest.mark.parametrize("script", [s for s in TRAINING if s != "finetune"])
def test_an_lr_so_large_that_the_schedule_overflows(script, npz, tmp_path, capsys):
    assert "--blr" in fails(script, argv(script, npz, tmp_path / "out", "--blr", "1e308"), capsys)


# ---- checkpoint files: unreadable, of another architecture, or carrying code --------------------------------------

def tiny_vit(dim=192):
    return vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=dim, depth=2, num_heads=3, num_classes=0)


MARKER = "code_ran.marker"


class Payload:  # what a malicious checkpoint pickles: unpickling it calls os.system
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload(Payload):
    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def write_checkpoint(kind, folder):
    """A file (or HF folder) of one kind; -> its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path, marker = folder / f"{kind}.pth", str(folder / MARKER)
    sd = tiny_vit().state_dict()
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        torch.save({"model": sd}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "other_architecture":  # a ResNet's keys
        torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}, path)
    elif kind == "payload_alone":
        torch.save(Payload(marker), path)
    elif kind == "payload_in_real_weights":  # valid weights around it: a naive loader would even run normally
        torch.save({"model": sd, "args": Payload(marker)}, path)
    elif kind == "payload_exec_legacy":  # the pre-1.6 (not zipped) format, another callable
        torch.save({"model": sd, "args": ExecPayload(marker)}, path, _use_new_zipfile_serialization=False)
    elif kind == "payload_torchscript":  # a TorchScript archive (OpenAI CLIP's format) whose data.pkl is the payload
        class Holder(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.ones(2))

            def forward(self, x):
                return x
        torch.jit.script(Holder()).save(str(folder / "good.pt"))
        path = folder / f"{kind}.pt"
        with zipfile.ZipFile(folder / "good.pt") as src, zipfile.ZipFile(path, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, pickle.dumps(Payload(marker), protocol=2) if name.endswith("data.pkl")
                             else src.read(name))
    elif kind == "payload_hf_folder":  # a Hugging Face folder whose pytorch_model.bin carries the payload
        path = folder / "hf"
        path.mkdir(exist_ok=True)
        torch.save({"x": Payload(marker)}, path / "pytorch_model.bin")
    return str(path)


ENTRIES = ["finetune --pretrained", "maskalign --teacher", "mae --pretrained", "analyze"]
KINDS = ["text", "truncated", "other_architecture", "payload_alone", "payload_in_real_weights",
         "payload_exec_legacy", "payload_torchscript", "payload_hf_folder"]


def entry_args(entry, path, npz, out):
    script, _, flag = entry.partition(" ")
    if script == "analyze":
        return script, [path, "--data", npz, "--out", str(out), "--workers", "0", "--batch-size", "4"]
    if script == "finetune":  # the checkpoint gives the architecture
        return script, [*CPU, "--data", npz, "--out", str(out), flag, path]
    return script, argv(script, npz, out, flag, path)


@pytest.mark.filterwarnings("ignore:.*(jit|TorchScript)")
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoints_end_in_one_line_and_never_run_code(entry, kind, npz, tmp_path, capsys):
    path = write_checkpoint(kind, tmp_path / "files")
    script, args = entry_args(entry, path, npz, tmp_path / "out")
    line = fails(script, args, capsys)
    assert os.path.basename(path) in line or path in line, line
    if kind.startswith("payload"):
        assert "--unsafe-load" in line and "refused" in line
    assert not os.path.exists(tmp_path / "files" / MARKER), "the checkpoint's code ran"


def test_unsafe_load_is_the_explicit_way_to_run_a_trusted_pickle(tmp_path):
    path = write_checkpoint("payload_in_real_weights", tmp_path)
    with pytest.warns(UserWarning, match="--unsafe-load"):
        sd, arch = vit.load_checkpoint(path, unsafe=True)
    assert os.path.exists(tmp_path / MARKER) and arch["depth"] == 2  # it ran, because the user asked for it


@pytest.mark.parametrize("script", TRAINING)
@pytest.mark.parametrize("kind", ["text", "truncated", "payload_in_real_weights", "wrong_weights"])
def test_bad_resume_checkpoints_end_in_one_line(script, kind, npz, tmp_path, capsys):
    out = tmp_path / "out"
    if kind == "wrong_weights":  # a real checkpoint of this run whose model lost a tensor
        call(script, argv(script, npz, out, "--steps", "1"))
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        ckpt["model"].pop(next(iter(ckpt["model"])))
        torch.save(ckpt, out / "ckpt.pt")
    else:
        os.replace(write_checkpoint(kind, tmp_path / "files"), out.mkdir() or out / "ckpt.pt")
    line = fails(script, argv(script, npz, out, "--resume"), capsys)
    assert "--resume" in line and "ckpt.pt" in line
    assert not os.path.exists(tmp_path / "files" / MARKER)


def test_public_layouts_with_benign_pickled_classes_load(tmp_path):
    """MAE / DeiT / DINO / LocalMIM / MaskAlign pickle an argparse Namespace (with numpy values), SimMIM and Swin a
    yacs CfgNode; OpenAI CLIP is a TorchScript archive (test_vit). All load without --unsafe-load."""
    sd = tiny_vit().state_dict()
    yacs = types.ModuleType("yacs")
    yacs.config = types.ModuleType("yacs.config")

    class CfgNode(dict):  # yacs' config class, as SimMIM's checkpoints pickle it
        def __init__(self, d=None):
            super().__init__(d or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs.config.CfgNode = CfgNode
    sys.modules.update({"yacs": yacs, "yacs.config": yacs.config})
    try:
        files = {
            "mae_full.pth": {"model": sd, "optimizer": {}, "epoch": 799, "scaler": {},
                             "args": argparse.Namespace(model="mae_vit_base_patch16", input_size=224, blr=1.5e-4)},
            "deit.pth": {"model": sd, "epoch": np.int64(299), "max_accuracy": np.float64(81.8),
                         "args": argparse.Namespace(mean=np.array([0.485, 0.456, 0.406]), dtype=np.dtype("float32"))},
            "dino_full.pth": {"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 100,
                              "args": argparse.Namespace(arch="vit_small", patch_size=16)},
            "simmim.pth": {"model": {f"encoder.{k}": v for k, v in sd.items()}, "max_accuracy": 0.0, "epoch": 99,
                           "config": CfgNode({"MODEL": CfgNode({"TYPE": "vit"}), "DATA": CfgNode({"IMG_SIZE": 32})})},
        }
        for name, obj in files.items():
            torch.save(obj, tmp_path / name)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    for name in files:  # yacs is not importable here: CfgNode comes back as an inert dict
        loaded, arch = vit.load_checkpoint(str(tmp_path / name))
        assert loaded.keys() == sd.keys() and arch["depth"] == 2, name
    config = vit.torch_load(str(tmp_path / "simmim.pth"))["config"]
    assert config["MODEL"]["TYPE"] == "vit" and config.__dict__["__immutable__"] is False


# ---- --out, data --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [*TRAINING, "analyze"])
@pytest.mark.parametrize("where", ["a_file", "below_a_file"])
def test_out_that_is_not_a_writable_folder(script, where, npz, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "a_file" else tmp_path / "f" / "sub"
    args = ["--avgdist", "--out", str(out)] if script == "analyze" else argv(script, npz, out)
    assert "--out" in fails(script, args, capsys)


@pytest.mark.parametrize("script", [*TRAINING, "analyze"])
def test_a_folder_of_unreadable_images(script, npz, tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        (tmp_path / "imgs" / c / "x.jpg").write_bytes(b"not an image")
    data = str(tmp_path / "imgs")
    if script == "analyze":
        torch.save({"model": tiny_vit().state_dict()}, tmp_path / "enc.pth")
        args = [str(tmp_path / "enc.pth"), "--data", data, "--out", str(tmp_path / "out"), "--workers", "0"]
    else:
        args = argv(script, npz, tmp_path / "out", "--data", data)
    assert "--data" in fails(script, args, capsys) and "can be read" in capsys.readouterr().err + "can be read"


# ---- nothing lost: earlier runs, resume flags, non-finite weights --------------------------------------------------

@pytest.mark.parametrize("script", TRAINING)
def test_an_earlier_run_is_continued_only_with_resume_and_only_with_its_flags(script, npz, tmp_path, capsys):
    out = tmp_path / "out"
    call(script, argv(script, npz, out, "--steps", "1"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    export = "classifier.pth" if script == "finetune" else "encoder.pth"
    assert torch.load(out / export, weights_only=True)["step"] == ckpt["step"] == 1  # the same step
    records = (out / "log.jsonl").read_text()
    line = fails(script, argv(script, npz, out, "--steps", "2"), capsys)
    assert "--resume" in line and str(out) in line
    assert (out / "log.jsonl").read_text() == records  # nothing appended, nothing overwritten
    line = fails(script, argv(script, npz, out, "--steps", "2", "--resume", "--weight-decay", "0.01", "--clip-grad", "1"),
                 capsys)
    assert "--weight-decay 0.01 (the checkpoint's: 0.05)" in line and "--clip-grad 1.0 (the checkpoint's: " in line
    (out / "ckpt.pt.tmp").write_bytes(b"half a save")  # a save killed mid-write
    call(script, argv(script, npz, out, "--steps", "2", "--resume", "--log-every", "5", "--workers", "0"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2 and not (out / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("script", [s for s in TRAINING if s != "finetune"])
def test_a_non_finite_loss_names_the_last_good_checkpoint(script, npz, tmp_path, capsys):
    line = fails(script, argv(script, npz, tmp_path / "a", "--blr", "1e30", "--warmup-epochs", "0", "--steps", "3"),
                 capsys)
    assert "not finite at step" in line and "there is no checkpoint yet" in line
    out = tmp_path / "b"
    call(script, argv(script, npz, out, "--steps", "2", "--epochs", "3"))
    good = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt = dict(good, model={k: v * 1e30 if v.is_floating_point() and v.ndim > 1 else v
                             for k, v in good["model"].items()})
    torch.save(ckpt, out / "ckpt.pt")  # weights that overflow from here on
    line = fails(script, argv(script, npz, out, "--steps", "4", "--epochs", "3", "--resume"), capsys)
    assert "not finite at step" in line and f"the last good checkpoint is {out / 'ckpt.pt'}" in line
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2  # not overwritten


# ---- Ctrl-C: a checkpoint of the current step, one line, exit 130 ---------------------------------------------------

def launch(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd + ["--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(out, proc, n=2, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"no log after {timeout} s: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("script", ["mae", "finetune"])
def test_ctrl_c_saves_the_step_and_says_how_to_continue(script, npz, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, f"{script}.py", *argv(script, npz, out, "--epochs", "50")]
    proc = launch(cmd, out)
    wait_for_steps(out, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert last.endswith("continue with --resume") and step >= 2
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step
    call(script, argv(script, npz, out, "--epochs", "50", "--steps", str(step + 1), "--resume"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step + 1


def test_ctrl_c_under_torchrun(npz, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "mae.py",
           *argv("mae", npz, out, "--epochs", "50", "--num-images", "32")]
    proc = launch(cmd, out)
    wait_for_steps(out, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [x for x in stderr.splitlines() if "interrupted at step" in x]
    assert len(lines) == 1, stderr[-3000:]  # rank 0 says it once, after the ranks agreed on the step
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()][-1] == step
