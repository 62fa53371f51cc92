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
import maskalign
import simmim

SHARED = {  # helper -> the method files that carry a copy
    "setup_distributed": (simmim, localmim, maskalign, finetune),
    "build_encoder": (simmim, localmim, maskalign, finetune),
    "peak_memory_mb": (simmim, localmim, maskalign, finetune),
    "param_groups": (simmim, localmim, maskalign, finetune),
    "atomic_save": (simmim, localmim, maskalign, finetune),
    "trim_log": (simmim, localmim, maskalign, finetune),
    "mae_lr": (localmim, maskalign, finetune),
    "simmim_lr": (simmim, finetune),
}


def source(fn):
    return ast.dump(ast.parse(inspect.getsource(fn)))  # formatting and comments aside


@pytest.mark.parametrize("name", SHARED)
def test_copies_are_identical(name):
    first, *others = SHARED[name]
    for module in others:
        assert source(getattr(module, name)) == source(getattr(first, name)), f"{module.__name__}.{name} drifted"


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


def test_param_groups_and_atomic_save(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.register_parameter("mask_token", nn.Parameter(torch.zeros(1, 1, 4)))
    decay, no_decay = simmim.param_groups(model, 0.05, skip=("mask_token",))
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # bias, LN weight/bias, mask token
    path = str(tmp_path / "ckpt.pt")
    simmim.atomic_save({"step": 1}, path)
    simmim.atomic_save({"step": 2}, path)
    assert torch.load(path)["step"] == 2 and not os.path.exists(path + ".tmp")


def test_trim_log_keeps_the_records_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3, 4, 4, 5)) + '{"step": 6, "lo')
    simmim.trim_log(str(log), 3)
    assert [json.loads(line)["step"] for line in log.open()] == [1, 2, 3]
    simmim.trim_log(str(tmp_path / "absent.jsonl"), 3)  # a first run has no log yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
