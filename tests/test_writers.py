"""canonreg.writers: the long-format records, the CSV writer and the TensorBoard writer (read back)."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import canonreg
from canonreg.functional import balance_terms
from canonreg.writers import CSVWriter, TensorBoardWriter, balance_records, repair_partial_line, report_records


@pytest.fixture(scope="module")
def report() -> canonreg.CRHReport:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    monitor = canonreg.CRHMonitor(model)
    with monitor:
        for _ in range(3):
            x = torch.randn(64, 6)
            nn.functional.cross_entropy(model(x), torch.randint(0, 4, (64,))).backward()
    return monitor.compute(lr=0.1, weight_decay=1e-3, batch_size=64, n_bootstrap=20)


@pytest.fixture()
def balance() -> dict[str, canonreg.BalanceTerms]:
    return {
        "0": balance_terms(2.0, 0.1, 3.0, lr=0.1, weight_decay=1e-3, batch_size=32),
        "2": balance_terms(1.5, -0.2, 0.5, lr=0.1, weight_decay=0.0, batch_size=32),  # rho = inf, share = inf
    }


pytestmark = pytest.mark.usefixtures("single_thread")  # trials run single-threaded, as in the workers



def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_records_carry_the_report_values(report: canonreg.CRHReport) -> None:
    rows = report_records(report)
    table = {(layer, metric): value for layer, metric, value in rows}
    assert len(table) == len(rows)  # no duplicate (layer, metric)
    assert table[("*", "mean_alpha")] == report.mean_alignment()
    for layer in report.layers:
        for r in canonreg.RELATIONS:
            assert table[(layer, f"alpha/{r}")] == report.alignment[layer][r]
            fit = report.exponents[layer][r]
            assert _same(table[(layer, f"kappa/{r}")], fit.exponent)
            assert _same(table[(layer, f"kappa_ci_high/{r}")], fit.ci_high)
        assert table[(layer, "participation/H_a")] == report.effective_rank[layer]["H_a"]["participation"]
        assert table[(layer, "samples")] == report.samples[layer]
        assert table[(layer, "monitor_balance/noise")] == report.balance[layer].noise
    short = report_records(report, exponents=False, ranks=False)
    assert not any(m.startswith(("kappa", "participation")) for _, m, _ in short)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_balance_records_and_type_errors(balance: dict[str, canonreg.BalanceTerms]) -> None:
    rows = balance_records(balance, prefix="opt")
    table = {(layer, m): v for layer, m, v in rows}
    assert table[("0", "opt/decay")] == balance["0"].decay
    assert table[("0", "opt/rho")] == pytest.approx(0.1 / (1e-3 * 32))
    assert math.isinf(table[("2", "opt/rho")])
    assert len(rows) == 2 * 6
    with pytest.raises(TypeError, match=r"balance\['0'\]"):
        balance_records({"0": {"decay": 1.0}})  # type: ignore[dict-item]


def test_csv_writer_long_format_round_trip(tmp_path: Path, report: canonreg.CRHReport, balance: dict) -> None:
    path = tmp_path / "sub" / "crh.csv"
    with CSVWriter(path, fields={"run": "r1", "seed": 3}) as log:
        log.log_report(10, report)
        log.log_balance(10, balance)
        log.log_scalars(20, {"train_loss": 0.25})
    rows = _read(path)
    assert list(rows[0]) == ["run", "seed", "step", "layer", "metric", "value"]
    assert path.read_text().count("run,seed,step") == 1
    expected = [(10, *r) for r in report_records(report)] + [(10, *r) for r in balance_records(balance)] + [(20, "*", "train_loss", 0.25)]
    assert len(rows) == len(expected)
    for row, (step, layer, metric, value) in zip(rows, expected):
        assert (row["run"], row["seed"], int(row["step"]), row["layer"], row["metric"]) == ("r1", "3", step, layer, metric)
        assert _same(float(row["value"]), value)  # full precision, nan/inf included


def test_csv_writer_appends_under_one_header_and_checks_it(tmp_path: Path, balance: dict) -> None:
    path = tmp_path / "b.csv"
    with CSVWriter(path) as log:
        log.log_balance(1, balance)
    with CSVWriter(path) as log:
        log.log_balance(2, balance)
    rows = _read(path)
    assert [int(r["step"]) for r in rows] == [1] * 12 + [2] * 12
    assert path.read_text().count("step,layer,metric,value") == 1
    with pytest.raises(ValueError, match="header"):
        CSVWriter(path, fields={"run": "x"})
    with CSVWriter(path, append=False) as log:
        log.log_balance(3, balance)
    assert [int(r["step"]) for r in _read(path)] == [3] * 12
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.log_balance(4, balance)
    with pytest.raises(ValueError, match="`fields`"):
        CSVWriter(tmp_path / "c.csv", fields={"step": 1})
    with pytest.raises(ValueError, match="`step`"):
        CSVWriter(tmp_path / "d.csv").log_scalars(-1, {"a": 1.0})


def test_an_incomplete_row_from_a_crash_is_dropped_on_reopen(tmp_path: Path, balance: dict) -> None:
    path = tmp_path / "crash.csv"
    with CSVWriter(path) as log:
        log.log_balance(1, balance)
    good = path.read_text()
    with open(path, "a") as f:
        f.write("2,0,balance/dec")  # a row cut short
    with CSVWriter(path) as log:
        log.log_balance(2, balance)
    text = path.read_text()
    assert text.startswith(good) and "balance/dec\n" not in text and "2,0,balance/dec2" not in text
    assert [int(r["step"]) for r in _read(path)] == [1] * 12 + [2] * 12
    assert repair_partial_line(path) == 0
    assert repair_partial_line(tmp_path / "missing.csv") == 0


def test_tensorboard_tags() -> None:
    assert TensorBoardWriter.tag("2", "alpha/f-RWA") == "alpha/2/f-RWA"
    assert TensorBoardWriter.tag("2", "samples") == "samples/2"
    assert TensorBoardWriter.tag("*", "mean_alpha") == "mean_alpha"


def test_tensorboard_writer_without_tensorboard_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"canonreg\[tensorboard\]"):
        TensorBoardWriter(tmp_path)


def test_tensorboard_event_files_hold_the_records(tmp_path: Path, report: canonreg.CRHReport, balance: dict) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoardWriter is optional: pip install 'canonreg[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardWriter(tmp_path / "tb") as log:
        log.log_report(5, report)
        log.log_balance(5, {"0": balance["0"]})
        log.log_scalars(7, {"train_loss": 0.5})
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {TensorBoardWriter.tag(layer, m): v for layer, m, v in report_records(report)}
    expected.update({TensorBoardWriter.tag(layer, m): v for layer, m, v in balance_records({"0": balance["0"]})})
    expected["train_loss"] = 0.5
    assert tags == set(expected)
    for tag, value in expected.items():
        (event,) = acc.Scalars(tag)
        assert event.step == (7 if tag == "train_loss" else 5)
        if math.isnan(value):
            assert math.isnan(event.value)
        else:
            assert event.value == pytest.approx(value, rel=1e-6)  # stored as float32
    assert acc.Scalars("alpha/0/f-RWA")[0].value == pytest.approx(report.alignment["0"]["f-RWA"], rel=1e-6)
