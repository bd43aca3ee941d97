"""bench/adaptation.py at a trivially small budget: it runs the arms, reads retention, and prints the table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import adaptation  # noqa: E402


def test_summary_gain_share_is_relative_to_full_fine_tuning():
    base = {"bbox_mAP50": 0.2, "segm_mAP50": 0.1, "source_bbox_mAP50": 0.6, "neg_fp_rate": 0.1, "gain_share": 0.0,
            "trainable_pct": 0.0, "wall_s": 1.0}
    run = {"segm_mAP50": 0.3, "source_bbox_mAP50": 0.5, "neg_fp_rate": 0.0, "wall_s": 2.0}
    runs = {"full": [{**run, "bbox_mAP50": 0.6}, {**run, "bbox_mAP50": 0.4}],
            "lora": [{**run, "bbox_mAP50": 0.5}, {**run, "bbox_mAP50": 0.3}]}
    summary = adaptation.summarize(runs, base, {"full": 100.0, "lora": 3.0})
    # per seed: (0.5-0.2)/(0.6-0.2) = 0.75 and (0.3-0.2)/(0.4-0.2) = 0.5
    assert summary["lora"]["gain_share"] == pytest.approx((0.625, 0.125))
    assert summary["full"]["bbox_mAP50"] == pytest.approx((0.5, 0.1))
    table = adaptation.markdown(summary)
    assert "| lora | 0.400 ± 0.100 |" in table and "62% ± 13" in table


def test_bench_runs_end_to_end_at_a_tiny_budget(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench/adaptation.py"), "--arms", "full,lora", "--seeds", "0", "--epochs", "1",
         "--num-train", "8", "--num-eval", "4", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
         "--json", str(tmp_path / "study.json"), "data.num_workers=0", "data.persistent_workers=false"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| zero_shot |" in result.stdout and "| lora |" in result.stdout
    study = json.loads((tmp_path / "study.json").read_text())
    assert set(study["runs"]) == {"full", "lora"}
    lora = study["runs"]["lora"][0]
    assert 0 < lora["trainable_pct"] < study["runs"]["full"][0]["trainable_pct"] <= 100
    assert {"source_bbox_mAP50", "neg_fp_rate", "segm_mAP50"} <= set(lora)
