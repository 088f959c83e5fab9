"""A catalogue of bad inputs and faults for both command-line tools and the ablation runner.

Documented outcomes (``canonreg.cli``, ``canonreg.ablate``):

* a bad flag, config or file: exit status 2 and exactly one line on stderr, ``<prog>: error: …``,
  naming the flag (or key, file, line) — before anything trains or is written; no traceback
  unless ``--debug`` is given;
* a failure while training (e.g. divergence): exit status 1, one line;
* a damaged ``results.jsonl``: every complete, valid record is kept; each damaged line is moved to
  ``results.rejected.jsonl`` with a warning naming its line number, and its run is recomputed;
* SIGTERM: the runner stops its workers and exits with status 143, leaving no process behind.

Everything runs in-process through ``main([...])`` with tiny configs, except the SIGTERM case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from canonreg import ablate
from canonreg.ablate import load_results, run_ablation
from canonreg.cli import DemoConfig, main
from canonreg.experiment import TrialConfig, config_id

ROOT = Path(__file__).resolve().parents[1]
FIXED = {"dataset": "digits", "width": 8, "depth": 3, "batch_size": 32, "steps": 8, "eval_every": 4, "n_bootstrap": 0}


pytestmark = pytest.mark.usefixtures("single_thread")  # trials run single-threaded, as in the workers


def one_line_error(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    """The single stderr line of a rejected command (asserting there is exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ====================================================================== demo flags (issue 10, item 10)
DEMO_BAD_FLAGS: list[tuple[list[str], str, str]] = [
    # (arguments, the flag the message must name, a fragment of the expectation)
    (["--momentum", "1.0"], "--momentum", "[0, 1)"),  # crashed after 500 steps with ZeroDivisionError
    (["--momentum", "1.5"], "--momentum", "[0, 1)"),  # blamed the learning rate
    (["--momentum", "-0.1"], "--momentum", "[0, 1)"),
    (["--lr", "nan"], "--lr", "positive"),  # reported non-finite activations
    (["--lr", "0"], "--lr", "positive"),
    (["--lr", "inf"], "--lr", "positive"),
    (["--weight-decay", "-1e-3"], "--weight-decay", "non-negative"),
    (["--weight-decay", "inf"], "--weight-decay", "non-negative"),
    (["--batch-size", "100000", "--num-samples", "300"], "--batch-size", "240"),  # trained on 240, recorded 100000
    (["--batch-size", "0"], "--batch-size", "positive"),
    (["--steps", "0"], "--steps", "positive"),
    (["--steps", "100", "--window", "500"], "--window", "--steps"),
    (["--width", "0"], "--width", "positive"),
    (["--width", "abc"], "--width", "int"),
    (["--depth", "2"], "--depth", ">= 3"),  # the demo compares inner layers: it needs one
    (["--num-samples", "0"], "--num-samples", "positive"),
    (["--seed", "-1"], "--seed", "non-negative"),
    (["--threads", "-2"], "--threads", "non-negative"),
    (["--preprocess", "whitened"], "--preprocess", "normalized"),
    (["--metric", "spearman"], "--metric", "pearson"),
    (["--lr"], "--lr", "expected one argument"),
    (["--bogus", "1"], "--bogus", "unrecognized"),
]


@pytest.mark.parametrize("args, flag, expected", DEMO_BAD_FLAGS, ids=[" ".join(a) for a, _, _ in DEMO_BAD_FLAGS])
def test_demo_rejects_bad_flag_up_front(args: list[str], flag: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    rc = main(["demo", *args, "--out", str(out), "--no-progress"])
    elapsed = time.perf_counter() - t0
    assert rc == 2
    line = one_line_error(capsys, "canonreg demo")
    assert flag in line and expected in line, line
    assert not out.exists()  # rejected before anything was generated, trained or written
    assert elapsed < 5.0  # no training (the fastest real run takes longer)


def test_demo_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    assert main(["demo", "--out", str(a_file), "--no-progress"]) == 2
    line = one_line_error(capsys, "canonreg demo")
    assert "--out" in line and "taken" in line
    assert a_file.read_text() == "not a folder"


def test_top_level_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "command" in one_line_error(capsys, "canonreg")
    assert main(["train"]) == 2
    assert "invalid choice" in one_line_error(capsys, "canonreg")


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    # With --debug the error propagates with its traceback instead of becoming one line.
    with pytest.raises(ValueError, match="--momentum"):
        main(["demo", "--momentum", "1.0", "--out", str(tmp_path / "d"), "--debug"])
    with pytest.raises(ValueError, match="--momentum"):
        main(["--debug", "demo", "--momentum", "1.0", "--out", str(tmp_path / "d")])  # before the command, too
    with pytest.raises(ValueError, match="--workers"):
        main(["ablate", str(tmp_path / "cfg.toml"), "--workers", "-1", "--debug"])


def test_demo_config_names_fields_in_library_use() -> None:
    # The CLI's messages come from DemoConfig's checks, which name the field for library users.
    with pytest.raises(ValueError, match="`momentum`"):
        DemoConfig(momentum=1.0)
    with pytest.raises(ValueError, match="`batch_size`.*240"):
        DemoConfig(batch_size=100000, num_samples=300)
    with pytest.raises(ValueError, match="`lr`"):
        DemoConfig(lr=float("nan"))
    with pytest.raises(TypeError, match="`progress`"):
        DemoConfig(progress=1)  # type: ignore[arg-type]


def test_demo_training_failure_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A valid but absurd learning rate diverges during training: not a usage error (exit 1), one line.
    args = ["demo", "--lr", "1e6", "--steps", "20", "--window", "10", "--width", "16", "--num-samples", "500"]
    rc = main([*args, "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 1
    line = one_line_error(capsys, "canonreg demo")
    assert "diverged" in line and "--lr" in line and "TrialConfig(" not in line, line  # short, and says what to change


# ====================================================================== ablate flags and configs
def toml_text(grid: dict[str, list[Any]] | None = None, quick: dict[str, Any] | None = None) -> str:
    def val(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = ['[ablation]\nname = "rel"\nmetrics = ["test_acc", "mean_alpha"]\n', "[fixed]"]
    lines += [f"{k} = {val(v)}" for k, v in FIXED.items()]
    lines.append("\n[grid]")
    lines += [f"{k} = {val(v)}" for k, v in (grid or {"arm": ["baseline", "noise"], "seed": [0]}).items()]
    if quick:
        lines.append("\n[quick]")
        lines += [f"{k} = {val(v)}" for k, v in quick.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "abl.toml"
    p.write_text(toml_text())
    return p


ABLATE_BAD: list[tuple[str, list[str], str]] = [
    # (case, extra arguments, a fragment the message must contain); {cfg} is the config path
    ("missing config", ["{tmp}/nope.toml"], "nope.toml"),
    ("config is a folder", ["{tmp}"], "is a folder"),
    ("negative workers", ["{cfg}", "--workers", "-1"], "--workers"),
    ("non-int workers", ["{cfg}", "--workers", "two"], "--workers"),
    ("unknown backend", ["{cfg}", "--backend", "dask"], "--backend"),
    ("out is a file", ["{cfg}", "--out", "{tmp}/abl.toml"], "--out"),
    ("quick without [quick]", ["{cfg}", "--quick"], "[quick]"),
    ("unknown flag", ["{cfg}", "--threads", "3"], "--threads"),
    ("no config", [], "config"),
]


@pytest.mark.parametrize("case, args, fragment", ABLATE_BAD, ids=[c for c, _, _ in ABLATE_BAD])
def test_ablate_rejects_bad_arguments(case: str, args: list[str], fragment: str, cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmp = cfg_file.parent
    argv = [a.replace("{cfg}", str(cfg_file)).replace("{tmp}", str(tmp)) for a in args]
    before = sorted(p.name for p in tmp.iterdir())
    assert main(["ablate", *argv, "--no-progress"]) == 2
    line = one_line_error(capsys, "canonreg ablate")
    assert fragment in line, line
    assert sorted(p.name for p in tmp.iterdir()) == before  # nothing was written


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[grid]\nseed = [0, 1\n", "Invalid TOML"),  # syntax error: names the file and position
        (b"[grid]\nseed = [0]\n# \xff\xfe\n", "UTF-8"),  # not text
        ('[grid]\narm = ["baseline"]\nwidht = [8]\n', "grid.widht"),  # unknown factor
        ('[fixed]\nsteps = -3\n[grid]\nseed = [0]\n', "`steps`"),  # bad value
        ('[grid]\nseed = [0]\n[search]\nlr = [1]\n', "search"),  # unknown table
    ],
    ids=["syntax", "binary", "unknown-factor", "bad-value", "unknown-table"],
)
def test_ablate_rejects_bad_toml(text: str | bytes, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.toml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    out = tmp_path / "o"
    assert main(["ablate", str(p), "--out", str(out), "--no-progress"]) == 2
    line = one_line_error(capsys, "canonreg ablate")
    assert fragment in line and "bad.toml" in line, line
    assert not out.exists()


# ====================================================================== damaged results files (item 11)
def run(cfg: str | Path, out: Path, **kw: Any) -> ablate.AblationResult:
    return run_ablation(cfg, out=out, workers=0, progress=False, plots=False, **kw)


def strip_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ablate.TIMING_KEYS}


@pytest.fixture(autouse=True)
def _fixed_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other work may change canonreg's sources between two runs of one test: keep "stale code" warnings out.
    monkeypatch.setattr(ablate, "code_fingerprint", lambda: "c0de" * 4)


@pytest.fixture
def finished(cfg_file: Path, tmp_path: Path) -> tuple[Path, list[bytes]]:
    """An ablation whose two runs finished: its folder and the raw lines of results.jsonl."""
    out = tmp_path / "out"
    res = run(cfg_file, out)
    assert res.new_runs == 2
    return out, (out / "results.jsonl").read_bytes().splitlines(keepends=True)


def test_damaged_config_in_a_valid_record_is_quarantined(finished: tuple[Path, list[bytes]], cfg_file: Path) -> None:
    out, lines = finished
    rec = json.loads(lines[1])
    del rec["config"]["arm"]  # valid JSON, damaged config (used to raise KeyError: 'arm' on every resume)
    (out / "results.jsonl").write_bytes(lines[0] + (json.dumps(rec) + "\n").encode())
    with pytest.warns(RuntimeWarning, match=r"line 2 .*results\.jsonl"):
        res = run(cfg_file, out)
    assert (res.new_runs, res.skipped_runs) == (1, 1)  # the damaged run is recomputed, the other kept
    assert sorted(r["config"]["arm"] for r in res.records.values()) == ["baseline", "noise"]
    kept = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    recomputed, original = (strip_timing(json.loads(x)["result"]) for x in (kept[1], lines[1]))
    assert kept[0] == lines[0] and recomputed == original  # the same numbers again
    rejected = [json.loads(x) for x in (out / "results.rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2] and json.loads(rejected[0]["text"]) == rec
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second resume is clean
        assert run(cfg_file, out).new_runs == 0


def test_complete_last_record_without_newline_is_kept(finished: tuple[Path, list[bytes]], cfg_file: Path) -> None:
    out, lines = finished
    body = b"".join(lines)
    (out / "results.jsonl").write_bytes(body[:-1])  # only the final newline is missing
    res = run(cfg_file, out)
    assert (res.new_runs, res.skipped_runs) == (0, 2)  # not deleted as partial, not recomputed
    assert (out / "results.jsonl").read_bytes() == body  # the newline is restored, nothing else changed
    assert len(load_results(out / "results.jsonl")) == 2


def test_partial_last_line_is_dropped_with_a_warning(finished: tuple[Path, list[bytes]], cfg_file: Path) -> None:
    out, lines = finished
    partial = lines[1][: len(lines[1]) // 2]
    (out / "results.jsonl").write_bytes(lines[0] + partial)
    with pytest.warns(RuntimeWarning, match="line 2.*incomplete"):
        res = run(cfg_file, out)
    assert (res.new_runs, res.skipped_runs) == (1, 1)
    assert (out / "results.jsonl").read_bytes().splitlines(keepends=True)[0] == lines[0]
    rejected = [json.loads(x) for x in (out / "results.rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["line"] == 2 and rejected[0]["text"].encode() == partial  # kept aside, not lost


@pytest.mark.parametrize(
    "damage",
    ["not json {", "[1, 2, 3]", '{"run_id": "x"}', "swap-id", "config-not-a-dict", "result-not-a-dict"],
)
def test_any_damaged_line_is_quarantined_not_fatal(damage: str, finished: tuple[Path, list[bytes]], cfg_file: Path) -> None:
    out, lines = finished
    rec = json.loads(lines[0])
    if damage == "swap-id":  # a record filed under another run's id would be summarised under the wrong factors
        rec["run_id"] = json.loads(lines[1])["run_id"]
        rec["config"]["seed"] = 7
        bad = json.dumps(rec)
    elif damage == "config-not-a-dict":
        rec["config"] = "baseline"
        bad = json.dumps(rec)
    elif damage == "result-not-a-dict":
        rec["result"] = [0.5]
        bad = json.dumps(rec)
    else:
        bad = damage
    (out / "results.jsonl").write_bytes(lines[0] + bad.encode() + b"\n" + lines[1])
    with pytest.warns(RuntimeWarning, match="line 2"):
        res = run(cfg_file, out)
    assert (res.new_runs, res.skipped_runs) == (0, 2)  # the two good records are intact
    assert (out / "results.jsonl").read_bytes() == lines[0] + lines[1]
    assert json.loads((out / "results.rejected.jsonl").read_text())["text"] == bad


def test_cli_reports_quarantine_as_one_warning_line(finished: tuple[Path, list[bytes]], cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, lines = finished
    (out / "results.jsonl").write_bytes(lines[0] + b"garbage\n" + lines[1])
    assert main(["ablate", str(cfg_file), "--out", str(out), "--workers", "0", "--no-progress", "--no-plots"]) == 0
    captured = capsys.readouterr()
    warn = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("canonreg ablate: warning: ") and "line 2" in warn[0], captured.err
    assert "0 run now, 2 already finished" in captured.out


def test_load_results_without_repair_skips_and_leaves_the_file(finished: tuple[Path, list[bytes]]) -> None:
    out, lines = finished
    damaged = lines[0] + b"garbage\n" + lines[1][:-1]
    (out / "results.jsonl").write_bytes(damaged)
    with pytest.warns(RuntimeWarning, match="line 2"):
        recs = load_results(out / "results.jsonl")
    assert set(recs) == {json.loads(x)["run_id"] for x in lines}
    assert (out / "results.jsonl").read_bytes() == damaged


def test_record_ids_match_their_configs(finished: tuple[Path, list[bytes]]) -> None:
    out, _ = finished
    for rid, rec in load_results(out / "results.jsonl").items():
        assert config_id(TrialConfig.from_dict(rec["config"])) == rid


# ====================================================================== signals (item 11)
def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _spawned_worker_in_group(pgid: int) -> bool:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the worker")
def test_sigterm_leaves_no_worker_or_resource_tracker(tmp_path: Path) -> None:
    cfg = tmp_path / "long.toml"
    long = dict(FIXED, steps=200000, eval_every=100000)  # minutes of work: it must be stopped, not finish
    cfg.write_text(toml_text(grid={"seed": [0]}).replace(f"steps = {FIXED['steps']}", f"steps = {long['steps']}")
                   .replace(f"eval_every = {FIXED['eval_every']}", f"eval_every = {long['eval_every']}"))  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "canonreg", "ablate", str(cfg), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    pgid = proc.pid
    try:
        deadline = time.monotonic() + 60
        while not _spawned_worker_in_group(pgid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        time.sleep(1.0)  # inside the trial
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        gone = time.monotonic() + 5
        while _group_alive(pgid) and time.monotonic() < gone:
            time.sleep(0.05)
        assert not _group_alive(pgid), "a worker or the resource tracker outlived the parent"
        assert proc.returncode == 128 + signal.SIGTERM
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in err, err
    finally:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
