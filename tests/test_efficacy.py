"""bench/efficacy.py on a few synthetic images: every stage runs, the table and JSON are written, the splits are
honest (validation carved out of the training images, stratified subsets), a finished stage is skipped on rerun."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import efficacy  # noqa: E402


def test_stratified_subsets_keep_every_class():
    labels = np.repeat(np.arange(5), 40)
    idx = efficacy.stratified(labels, 0.1, seed=0)
    assert len(idx) == 20 and (np.bincount(labels[idx]) == 4).all() and (np.diff(idx) > 0).all()
    assert not np.array_equal(idx, efficacy.stratified(labels, 0.1, seed=1))


def test_probes_by_hand():
    train, test = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]]), torch.tensor([[1.0, 0.05], [0.05, 1]])
    y, yt = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])
    assert efficacy.knn(train, y, test, yt, k=2) == 100.0
    assert efficacy.knn(train, y, test, torch.tensor([1, 0]), k=2) == 0.0
    assert efficacy.ridge(train, y, test, yt, 1e-3) == 100.0


def test_final_runs_of_each_budget():
    assert efficacy.final_runs(efficacy.BUDGETS["cpu"]) == [("final_full", 0), ("final_few", 0), ("final_few", 1)]
    assert efficacy.final_runs(efficacy.BUDGETS["cpu_small"]) == [("final_few", 0), ("final_few", 1)]  # no 100 %


def test_maskalign_distils_the_mae_encoder_of_the_same_run(tmp_path):
    args = efficacy.get_args(["--out", str(tmp_path), "--methods", "mae,maskalign"])
    argv = efficacy.pretrain_argv(args, efficacy.BUDGETS["cpu"], "maskalign", str(tmp_path))
    assert argv[argv.index("--teacher") + 1] == os.path.join(str(tmp_path), "pretrain_mae", "encoder.pth")
    assert argv[argv.index("--data") + 1].endswith(os.path.join("data", "pretrain"))  # the images, no labels used
    with pytest.raises(SystemExit):
        efficacy.get_args(["--methods", "maskalign"])  # its teacher would be missing


def test_the_whole_benchmark_on_synthetic_images(tmp_path, monkeypatch):
    out = str(tmp_path / "eff")
    argv = ["--data", "synthetic", "--budget", "smoke", "--methods", "mae", "--out", out]
    monkeypatch.setitem(efficacy.BUDGETS["smoke"], "sweep", dict(lr=(1e-3,), layer_decay=(0.75,)))  # one setting
    efficacy.main(argv)
    result = json.load(open(os.path.join(out, "results.json")))
    rows = result["rows"]
    assert set(rows) == {"pixels", "init", "scratch", "mae"}
    assert len(rows["scratch"]["few"]) == 2 and 0 <= rows["mae"]["full"] <= 100 and rows["mae"]["probe"]["knn"] >= 0
    table = open(os.path.join(out, "results.md")).read()
    assert "| MAE |" in table and "| from scratch |" in table and os.path.exists(os.path.join(out, "results.png"))
    index = np.load(os.path.join(out, "data", "index.npz"))
    assert not set(index["val"]) & set(index["part"]) and set(index["sweep_few"]) <= set(index["part"])
    stamp = os.path.getmtime(os.path.join(out, "final_few_mae_seed1", "done.json"))
    efficacy.main(argv)  # everything is finished: nothing runs again
    assert os.path.getmtime(os.path.join(out, "final_few_mae_seed1", "done.json")) == stamp


def test_an_interrupted_stage_needs_resume(tmp_path):
    out = tmp_path / "eff"
    os.makedirs(out / "pretrain_mae")
    torch.save({}, out / "pretrain_mae" / "ckpt.pt")  # a stage killed after its first checkpoint
    with pytest.raises(SystemExit, match="pretrain_mae was interrupted.*--resume"):
        efficacy.main(["--data", "synthetic", "--budget", "smoke", "--methods", "mae", "--out", str(out)])
