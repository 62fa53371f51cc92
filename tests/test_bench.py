"""bench/gpu.py and bench/pretrain.py on tiny models on the CPU: the same code the GPU runs. The analytic FLOPs
behind MFU agree with PyTorch's own count of the forward pass; a run writes its table."""
import json
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu  # noqa: E402


@pytest.mark.parametrize("name", list(gpu.CONFIGS))
def test_analytic_flops_match_the_counted_forward(name):
    torch.manual_seed(0)
    model, loss_fn, parts, batch = gpu.CONFIGS[name](True, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loss_fn()
    counted = counter.get_total_flops() / batch
    assert counted == pytest.approx(parts["trained"] + parts.get("frozen", 0), rel=0.08), (counted, parts)


def test_gpu_benchmark_runs_on_a_cpu_and_writes_its_table(tmp_path):
    gpu.main(["--device", "cpu", "--tiny", "--modes", "eager", "--methods", "mae_vit_b16,simmim_swin_b", "--steps",
              "1", "--warmup", "0", "--curve", "3", "--peak-tflops", "1", "--out", str(tmp_path)])
    result = json.load(open(tmp_path / "gpu.json"))
    assert [r["method"] for r in result["rows"]] == ["mae_vit_b16", "simmim_swin_b"]
    for r in result["rows"]:
        assert "error" not in r and r["img_per_s"] > 0 and r["mfu"] is not None and len(r["loss_curve"]) == 3
        assert sum(r["attention"].values()) > 0  # the kernels of the attention calls were seen
    assert "| mae_vit_b16 | eager |" in open(tmp_path / "gpu.md").read()
