"""The main job (``python -m canonreg demo``) runs end to end and writes what it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from canonreg import RELATIONS
from canonreg.cli import DemoConfig, main


def test_demo_small_run_writes_report_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--steps", "60", "--window", "30", "--width", "32", "--num-samples", "1000", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for rel in RELATIONS:
        assert rel in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 60
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    alignment = summary["report"]["alignment"]
    assert set(alignment) == {"0", "2", "4", "6"}
    for layer in alignment.values():
        assert set(layer) == set(RELATIONS)
        for v in layer.values():
            assert v is None or -1.0 <= v <= 1.0
    assert summary["history_steps"] == [30, 60]
    assert (out / "crh_report.png").stat().st_size > 1000
    assert (out / "alignment_history.png").stat().st_size > 1000
    report = json.loads((out / "report.json").read_text())
    assert report["preprocess"] == "normalized" and report["metric"] == "pearson"
    assert all(math.isfinite(b["noise_share"]) for b in report["balance"].values())


def test_demo_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="`steps`"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="`window`"):
        DemoConfig(steps=10, window=20)


def test_module_entry_point_help() -> None:
    res = subprocess.run([sys.executable, "-m", "canonreg", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "--weight-decay" in res.stdout
