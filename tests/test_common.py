"""The training helpers every method file repeats on purpose (so each file stands alone, as nanoGPT keeps get_lr in
train.py) must stay identical: same source, hence same behaviour. Also their behaviour on hand-computed values."""
import ast
import inspect
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import finetune
import localmim
import mae
import maskalign
import simmim

METHODS = (mae, simmim, localmim, maskalign, finetune)
SHARED = {  # helper -> the method files that carry a copy
    **{name: METHODS for name in ("HelpFormatter", "parse", "setup_distributed", "build_encoder", "prepare_out",
                                  "resume_from", "trim_log", "save_files", "last_good", "catch_signals",
                                  "stop_requested", "finish", "peak_memory_mb", "param_groups")},
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
