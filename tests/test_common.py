"""The training helpers every method file repeats on purpose (so each file stands alone, as nanoGPT keeps get_lr in
train.py) must stay identical: same source, hence same behaviour. Also their behaviour on hand-computed values."""
import ast
import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import finetune
import localmim
import mae
import maskalign
import simmim
import swin
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = (mae, simmim, localmim, maskalign, finetune)
SHARED = {  # helper -> the method files that carry a copy
    **{name: METHODS for name in ("HelpFormatter", "parse", "setup_distributed", "build_encoder", "prepare_out",
                                  "resume_from", "trim_log", "save_files", "last_good", "catch_signals",
                                  "stop_requested", "finish", "blocks_of", "check_memory", "peak_memory_mb",
                                  "time_left", "param_groups")},
    "mae_lr": (mae, localmim, maskalign, finetune),
    "simmim_lr": (simmim, finetune),
}
CONSTANTS = ("AT_LEAST_ONE", "NON_NEGATIVE", "FREE_FLAGS")


def source(fn):
    return ast.dump(ast.parse(inspect.getsource(fn)))  # formatting and comments aside


@pytest.mark.parametrize("name", SHARED)
def test_copies_are_identical(name):
    first, *others = SHARED[name]
    for module in others:
        assert source(getattr(module, name)) == source(getattr(first, name)), f"{module.__name__}.{name} drifted"


@pytest.mark.parametrize("name", CONSTANTS)
def test_shared_tables_are_identical(name):
    assert all(getattr(m, name) == getattr(mae, name) for m in METHODS)


def test_time_left_from_the_pace_so_far():
    class Bar:  # tqdm's numbers for a run of 130 steps resumed at step 10, 20 steps and 30 s later
        format_dict = dict(n=30, initial=10, total=130, elapsed=30.0)
    assert mae.time_left(Bar()) == "20 steps in 30 s: about 2.5 min for the 100 steps left"


def test_mae_lr_warmup_then_half_cosine():
    lr = maskalign.mae_lr
    assert lr(0, 100, 10, 1.0, 0.1) == 0.0 and lr(5, 100, 10, 1.0, 0.1) == 0.5  # linear from 0
    assert lr(10, 100, 10, 1.0, 0.1) == 1.0  # the peak at the end of the warmup
    assert lr(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_simmim_lr_cosine_from_step_zero_and_multistep():
    lr = simmim.simmim_lr
    assert lr(0, 100, 10, 1.0, 0.01, 0.1) == 0.01  # warmup starts at WARMUP_LR, not 0
    expect = 0.1 + 0.45 * (1 + math.cos(math.pi * 10 / 100))  # the cosine is measured from step 0
    assert lr(10, 100, 10, 1.0, 0.01, 0.1) == pytest.approx(expect)
    assert lr(69, 100, 10, 1.0, 0.01, 0.1, milestones=[70]) == 1.0
    assert lr(70, 100, 10, 1.0, 0.01, 0.1, milestones=[70]) == pytest.approx(0.1)


def test_param_groups_and_save_files(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.register_parameter("mask_token", nn.Parameter(torch.zeros(1, 1, 4)))
    decay, no_decay = simmim.param_groups(model, 0.05, skip=("mask_token",))
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # bias, LN weight/bias, mask token
    ckpt, export = str(tmp_path / "ckpt.pt"), str(tmp_path / "encoder.pth")
    for step in (1, 2):
        simmim.save_files({export: {"model": {"w": torch.ones(2)}, "step": step},
                           ckpt: {"model": {"w": torch.ones(2)}, "step": step}}, step, ckpt)
    assert torch.load(ckpt)["step"] == torch.load(export)["step"] == 2 and not os.listdir(tmp_path).count("ckpt.pt.tmp")
    with pytest.raises(SystemExit, match="not finite at step 3; nothing saved .the last good checkpoint is"):
        simmim.save_files({ckpt: {"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 3}}, 3, ckpt)
    assert torch.load(ckpt)["step"] == 2


def test_trim_log_keeps_the_records_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3, 4, 4, 5)) + '{"step": 6, "lo')
    simmim.trim_log(str(log), 3)
    assert [json.loads(line)["step"] for line in log.open()] == [1, 2, 3]
    simmim.trim_log(str(tmp_path / "absent.jsonl"), 3)  # a first run has no log yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_blocks_of_vit_and_swin():
    arch = vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, num_classes=0).arch
    assert mae.blocks_of(arch) == [(65, 192, 3, 65)] * 3 and mae.blocks_of(arch, 17)[0] == (17, 192, 3, 17)
    arch = swin.create_model("swin_tiny_patch4_window7_224", num_classes=0).arch  # 56 / 28 / 14 / 7 tokens a side
    assert mae.blocks_of(arch) == [(3136, 96, 3, 49)] * 2 + [(784, 192, 6, 49)] * 2 + [(196, 384, 12, 49)] * 6 + \
        [(49, 768, 24, 49)] * 2


@pytest.mark.parametrize("script, flags", [
    ("mae", ["--decoder-dim", "128", "--decoder-depth", "2", "--decoder-heads", "4", "--amp", "bf16"]),
    ("simmim", ["--mask-patch-size", "4", "--amp", "none"])])
def test_memory_estimate_is_near_the_measured_peak(script, flags, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, f"{script}.py", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-patch-size",
           "4", "--depth", "6", "--batch-size", "96", "--steps", "3", "--num-images", "192", "--device", "cpu",
           "--no-compile", "--workers", "0", "--log-every", "1", "--out", str(out), *flags]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    estimate = float(r.stdout.split("memory: about ")[1].split(" MB")[0])
    peak = json.loads(open(out / "log.jsonl").read().splitlines()[-1])["peak_mem_mb"]
    assert abs(estimate - peak) < 0.3 * peak, (estimate, peak)


def test_a_run_that_cannot_fit_stops_before_its_first_step(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "100000")  # 100 000 processes to share this machine's RAM
    with pytest.raises(SystemExit) as e:
        mae.main(mae.get_args(["--preset", "tiny", "--workers", "0", "--out", str(tmp_path)]))
    assert "GB free per process; use --preset tiny, or a smaller --batch-size with --accum-iter" in str(e.value)
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("module", [*METHODS, "analyze"])
def test_help_teaches_every_option_and_ends_with_examples(module, capsys):
    import analyze
    mod = analyze if module == "analyze" else module
    with pytest.raises(SystemExit):
        mod.get_args(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and text.count("python ") + text.count("torchrun ") >= 2
    parser_actions = [a for a in _parser(mod)._actions if a.dest != "help"]
    assert all(a.help for a in parser_actions), [a.dest for a in parser_actions if not a.help]


def _parser(mod):
    """The ArgumentParser a get_args builds (captured at parse time)."""
    import argparse
    seen = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = capture
    try:
        mod.get_args([])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen[0]


def test_a_run_talks_in_one_based_epochs_and_ends_with_what_it_wrote(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "mae.py", "--preset", "tiny", "--num-images", "64", "--epochs", "2",
                        "--workers", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch 1/2" in r.stderr and "epoch 2/2" in r.stderr and "epoch 0/" not in r.stderr
    last = r.stdout.strip().splitlines()
    assert last[-2].startswith("done: 2 steps") and "ckpt.pt, encoder.pth, log.jsonl, loss.png" in last[-2]
    assert last[-1].startswith("fine-tune: python finetune.py --recipe mae --pretrained") and (out / "loss.png").exists()
    assert [json.loads(x)["epoch"] for x in open(out / "log.jsonl")] == [1.0, 2.0]
