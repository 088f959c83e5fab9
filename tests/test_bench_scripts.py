"""Smoke tests of the benchmark scripts (``peers.py``, ``scaling.py``, ``launches.py``, …) at tiny sizes.

Peers that are not installed (BackPACK, curvlinops, Opacus: the optional ``[bench]`` extra) are skipped
by the script with a printed line; the test asserts that line instead of their rows.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_peers_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_threads: None) -> None:
    peers = _load("peers")
    out = tmp_path / "peers.json"
    width, hidden, batch = 16, 2, 8
    result = peers.main(["--quick", "--width", str(width), "--hidden", str(hidden), "--batch", str(batch), "--rounds", "1",
                         "--warmup", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["n_params"] == result["n_params"] == sum(p.numel() for p in peers.make_mlp(peers.Config(width=width, hidden=hidden)).parameters())
    assert out.with_suffix(".md").read_text().count("\n| ") == len(saved["results"]) + 2  # header, rule, one row each
    rows = {r["contender"]: r for r in saved["results"]}

    assert rows["plain"]["ratio_cpu"] == 1.0 and rows["plain"]["extra_peak_bytes"] == 0
    for mode in peers.MODES:
        for every, calls in ((1, 1), (10, 10)):  # --quick: 1 timed step per round; every10 times a window of 10
            r = rows[f"canonreg/{mode}/every{every}"]
            assert math.isfinite(r["ratio_cpu"]) and r["ratio_cpu"] > 0 and r["seconds_cpu"] > 0
            # rows seen by the monitor: the timed calls it collected (every k-th forward call from the first)
            collected = len(range(0, calls, every))
            assert set(r["check"]["samples"].values()) == {batch * collected}
            assert r["extra_held_bytes"] > 0  # its accumulators

    per_sample = {"backpack": "backpack/BatchGrad", "opacus": "opacus/GradSampleModule", "torch.func": "torch.func/vmap(grad)"}
    for peer, names in {"backpack": ["backpack/KFAC", "backpack/KFLR", "backpack/SumGradSquared"],
                        "curvlinops": ["curvlinops/KFAC-empirical"], "opacus": [], "torch.func": []}.items():
        names = names + ([per_sample[peer]] if peer in per_sample else [])
        if peers.available(peer):
            for name in names:
                assert name in rows and rows[name]["ratio_cpu"] > 0
        else:
            assert f"skipped {peer}: not installed" in printed
            assert not any(name in rows for name in names)
    for name in per_sample.values():
        if name in rows:  # per-sample gradients stay held after the step: n · #params float32 at least
            assert rows[name]["extra_held_bytes"] >= 4 * batch * saved["n_params"]
            check = rows[name]["check"]
            shapes = check.get("grad_sample") or check.get("per_sample") or check
            assert shapes["0.weight"] == [batch, width, 40] and shapes["0.bias"] == [batch, width]
    # Agreement with an independent implementation: every K-FAC input factor is canonreg's raw H_a (up to
    # scale); curvlinops' empirical output factor is canonreg's raw G_b (both from the true labels).
    for name in ("backpack/KFAC", "backpack/KFLR", "curvlinops/KFAC-empirical"):
        if name in rows:
            cos = rows[name]["agreement"]
            assert all(v > 1 - 1e-6 for k, v in cos.items() if k.startswith("A[")), cos
            if name.startswith("curvlinops"):
                assert all(v > 1 - 1e-6 for k, v in cos.items() if k.startswith("B[")), cos


def test_scaling_quick(tmp_path: Path, restore_threads: None) -> None:
    scaling = _load("scaling")
    out = tmp_path / "scaling.json"
    result = scaling.main(["--quick", "--widths", "16", "32", "--width-batches", "8", "8", "--batches", "8",
                           "--batch-width", "16", "--sketch-from", "32", "--no-figure", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["sweep"] for r in saved["results"]] == ["width", "width", "batch", "conv", "transformer"]
    for r in saved["results"]:
        kinds = ["exact"] + (["sketch"] if r["sweep"] == "width" and r["x"] >= 32 else [])
        assert r["kinds"] == kinds
        for kind in kinds:
            for every in ("every1", "every10"):
                assert r["ratio_cpu"][f"{every}/{kind}"] > 0
        assert r["compute"]["exact"]["seconds"] > 0
        # measured steady state (profiler allocation events) against the closed form: 12 bytes (float64 total +
        # float32 window) per entry of every accumulated d × d matrix, plus O(d) vectors (sums, origins)
        held, est = r["extra_held_bytes"]["every1/exact"], r["exact_state_bytes_estimate"]
        assert 0.3 * est <= held <= est + 100 * sum(a + b for a, b in r["layer_dims"]), (held, est)
    assert len(result["verdict"]) == 1 and "below 50M" in result["verdict"][0]
    merged = scaling.main(["--merge", str(out), "--no-figure", "--out", str(tmp_path / "merged.json")])
    assert merged["results"] == saved["results"] and merged["table"] == saved["table"]


def test_transformer_config() -> None:
    """The default GPTConfig has ≥ 50M parameters; the model is causal (a later token never changes earlier logits)."""
    scaling = _load("scaling")
    with torch.device("meta"):
        big = scaling.GPT(scaling.GPTConfig())
    assert sum(p.numel() for p in big.parameters()) >= 50_000_000
    torch.manual_seed(0)
    small = scaling.GPT(scaling.GPTConfig(vocab=32, seq=6, d_model=16, n_layer=2, n_head=2)).eval()
    idx = torch.randint(0, 32, (1, 6))
    changed = idx.clone()
    changed[0, 4] = (idx[0, 4] + 1) % 32
    with torch.no_grad():
        a, b = small(idx), small(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    names = [n for n, m in small.named_modules() if scaling.in_blocks(n, m)]
    assert names == [f"blocks.{i}.{k}" for i in range(2) for k in ("qkv", "proj", "fc", "fc2")]


def test_peers_absent_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                  restore_threads: None) -> None:
    """Without the optional peers (as in CI) the run prints one line per missing library and times the rest."""
    peers = _load("peers")
    for name in ("backpack", "curvlinops", "opacus"):
        monkeypatch.setitem(sys.modules, name, None)  # importlib.util.find_spec(name) is then None: not installed
    result = peers.main(["--quick", "--width", "8", "--batch", "4", "--rounds", "1", "--warmup", "0", "--modes", "raw",
                         "--no-memory", "--no-agreement", "--out", str(tmp_path / "p.json")])
    printed = capsys.readouterr().out
    for name in ("backpack", "curvlinops", "opacus"):
        assert f"skipped {name}: not installed" in printed
    assert [r["contender"] for r in result["results"]] == ["plain", "canonreg/raw/every1", "canonreg/raw/every10", "torch.func/vmap(grad)"]


def test_attention_overhead_quick(capsys: pytest.CaptureFixture[str], restore_threads: None) -> None:
    bench = _load("attention_overhead")
    bench.main(["--d-model", "16", "--heads", "2", "--batch", "2", "--seq", "3", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "contender" not in line and ":---" not in line}
    assert set(rows) == {"plain", "opened", "monitor", "monitor-no-attn"}
    assert "'calls': 12" in rows["opened"]  # 3 steps (2 warm-up, 1 timed) × the four sub-layers
    assert "block.self_attn[q]" in rows["monitor"] and "self_attn" not in rows["monitor-no-attn"]


def test_scaling_modes_kinds_idle(tmp_path: Path, restore_threads: None) -> None:
    """``--modes`` times each mode in turn, ``--kinds`` forces the sketch where the automatic rule gives exact only,
    ``--idle`` times a monitor whose only collected call is the warm-up step (every timed step inactive)."""
    scaling = _load("scaling")
    assert scaling.parse(["--mode", "raw"]).modes == ("raw",)  # the old single-mode spelling
    assert scaling.parse([]).kinds == () and scaling.parse([]).idle is False
    out = tmp_path / "modes.json"
    result = scaling.main(["--quick", "--sweeps", "transformer", "--modes", "raw", "centered", "--kinds", "sketch", "--idle",
                           "--warmup", "1", "--rounds", "1", "--big-rounds", "1", "--steps", "2", "--no-figure", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["mode"] for r in saved["results"]] == ["raw", "centered"]
    layers = [f"blocks.{i}.{k}" for i in range(2) for k in ("qkv", "proj", "fc", "fc2")]
    for r in saved["results"]:
        assert r["kinds"] == ["sketch"]  # the transformer is no width point: without --kinds it is exact only
        assert set(r["ratio_cpu"]) == {"plain", "every1/sketch", "every10/sketch", "idle/sketch"}
        assert all(v > 0 for v in r["ratio_cpu"].values())
        # every1: the warm-up step and the 2 timed steps; idle: the warm-up step only
        assert r["steps_collected"]["every1/sketch"] == dict.fromkeys(layers, 3)
        assert r["steps_collected"]["idle/sketch"] == dict.fromkeys(layers, 1)
        assert "idle/sketch" not in r["extra_held_bytes"]  # no memory pass for it (the every1 monitor's state)
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| gpt")]
    assert [row.split("|")[3].strip() for row in rows] == ["raw", "centered"]
    assert len(result["verdict"]) == 2 and "every10/sketch (raw)" in result["verdict"][0]


def test_launches_counts_kernels_and_syncs_and_restores_the_cpu_route(capsys: pytest.CaptureFixture[str]) -> None:
    """Counts at the dispatcher (no timing): on the accelerator route deferred checks make no host sync in the
    hooks (only the flag reads every 16 calls), immediate ones one per half of a layer call; the CPU route's
    host range check is switched back on afterwards."""
    import canonreg.moments as moments

    launches = _load("launches")
    result = launches.main(["--width", "8", "--d-in", "6", "--batch", "4", "--depth", "1", "--steps", "16", "--modes", "raw", "normalized"])
    rows = {r["contender"]: r for r in result["rows"]}
    assert rows["plain step"]["syncs"] == 0 and rows["plain step"]["kernels"] > 0
    for mode in ("raw", "normalized"):  # one read per half of a call: h_a (+ h_b), then g_b (+ g_a)
        assert rows[f"monitor {mode}, defer_checks=False"]["syncs"] == 2
        # one read of the window-opening call's flag and one of the 16 calls' flags per 16 calls
        assert rows[f"monitor {mode}, defer_checks=True"]["syncs"] == 2 / 16
        assert rows[f"monitor {mode}, defer_checks=True"]["kernels"] > 0
    assert moments._CPU_ROUTE == ("cpu",)
    assert "accelerator route" in capsys.readouterr().out
