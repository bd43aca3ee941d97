"""bench/transient_peaks.py: a component's freed transient shows as its peak; the bench prints the table."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import torch
from torch import nn

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from transient_peaks import TransientPeaks  # noqa: E402

MB = 2**20


class Transient(nn.Module):
    """Allocates and touches `mb` MB, then returns a small result: nothing of it stays resident."""

    def __init__(self, mb: int):
        super().__init__()
        self.mb = mb

    def forward(self, x):
        big = torch.ones(self.mb * MB // 4)  # ones: the pages are written, so they count in RSS
        return x + big[:1].sum()


def test_each_component_reports_its_own_freed_transient_and_phases_too():
    model = nn.Sequential(Transient(8), Transient(300), Transient(8))
    meter = TransientPeaks({"small": model[0], "large": model[1], "last": model[2]}, torch.device("cpu"))
    with meter.watching():
        out = model(torch.zeros(1))
        with meter.phase("after"):
            torch.ones(120 * MB // 4).sum()
    rows = {label: above for label, above, _ in meter.rows()}
    assert list(rows) == ["small", "large", "last", "after"]
    assert 290 <= rows["large"] < 330, rows
    assert 110 <= rows["after"] < 150, rows
    assert rows["small"] < 40 and rows["last"] < 40, rows
    assert meter.overall / MB >= max(absolute for *_, absolute in meter.rows()) and out.shape == (1,)


def test_lora_cost_peaks_table_at_tiny_size(tmp_path):
    out = tmp_path / "cost.json"
    result = subprocess.run([sys.executable, "bench/lora_cost.py", "--modes", "lora", "--steps", "1", "--warmup",
                             "0", "--peaks", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("transient peak of the first step")[1]
    for component in ("ViT", "DETR encoder", "DETR decoder", "mask head", "loss", "backward"):
        assert f"| {component} |" in table, table
    absolute_peaks = [float(cell.split("/")[1].replace(",", "")) for cell in re.findall(r"\| ([\d,]+ / [\d,]+) \|", table)]
    # the step's reported peak includes every component's (the meter's resets must not hide them)
    assert len(absolute_peaks) >= 6 and json.loads(out.read_text())["lora"]["peak_mb"] >= max(absolute_peaks) - 1


def test_lora_cost_interleaved_inference_times_both_pairs_in_one_process():
    import argparse

    import lora_cost

    args = argparse.Namespace(mode="interleaved", model="sam3_tiny", resolution=112, precision=None, malloc="default",
                              images=1, prompts=2, instances=2, steps=2, warmup=0)
    result = lora_cost.worker_infer(args)
    assert set(result) == {"adapters_off", "unmerged", "base", "merged"} and all(t > 0 for t in result.values())


def test_lora_cost_alternation_flips_the_order_and_drops_the_warm_up():
    import argparse

    import lora_cost

    calls, clock = [], iter(range(1, 100))
    timed = {name: (lambda name=name: calls.append(name) or next(clock)) for name in ("a", "b")}
    result = lora_cost._alternate(timed["a"], timed["b"], ("a", "b"), argparse.Namespace(warmup=1, steps=3))
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    # a took 1 (warm-up), 4, 5, 8 -> median of (4, 5, 8) = 5; b took 2 (warm-up), 3, 6, 7 -> 6
    assert result == {"a": 5, "b": 6}
