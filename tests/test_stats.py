"""canonreg.stats: Student-t intervals against closed forms and tables, paired differences, run metadata, JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from canonreg import stats


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 30, 2.042), (0.95, 4, 2.132), (0.995, 5, 4.032)],
)
def test_t_quantile_matches_printed_table(p: float, df: int, table: float) -> None:
    assert stats.t_quantile(p, df) == pytest.approx(table, abs=5e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_closed_forms_df1_df2(p: float) -> None:
    # ν = 1 is the Cauchy distribution: t_p = tan(π(p − 1/2)); ν = 2: t_p = (2p − 1)/√(2p(1 − p)).
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_t_quantile_rejects_bad_arguments() -> None:
    for p in (0.0, 1.0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="`p`"):
            stats.t_quantile(p, 3)  # type: ignore[arg-type]
    for df in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`df`"):
            stats.t_quantile(0.975, df)  # type: ignore[arg-type]


def test_mean_ci_by_hand() -> None:
    # 1..5: m = 3, s² = 10/4 = 2.5, s/√n = √0.5; t_{0.975, 4} = 2.7764451 (table) → h = 1.9632432.
    iv = stats.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert iv.n == 5 and iv.mean == 3.0
    assert iv.half_width == pytest.approx(2.7764451 * math.sqrt(0.5), rel=1e-7)
    assert (iv.low, iv.high) == pytest.approx((3.0 - 1.9632432, 3.0 + 1.9632432), abs=1e-6)
    # 90% interval of (2, 4): m = 3, s = √2, s/√2 = 1, t_{0.95, 1} = tan(0.45π) = 6.3137515.
    assert stats.mean_ci([2, 4], level=0.9).half_width == pytest.approx(math.tan(0.45 * math.pi), rel=1e-10)


def test_mean_ci_drops_non_finite_and_degenerate_sizes() -> None:
    iv = stats.mean_ci([1.0, None, math.nan, math.inf, 3.0, np.float32(2.0), torch.tensor(4.0)])
    ref = stats.mean_ci([1.0, 3.0, 2.0, 4.0])
    assert iv == ref and iv.n == 4
    one = stats.mean_ci([7.0, math.nan])
    assert one.n == 1 and one.mean == 7.0 and math.isnan(one.half_width) and not one.excludes_zero()
    none = stats.mean_ci([math.nan])
    assert none.n == 0 and math.isnan(none.mean)
    m, h = stats.mean_half_width([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(stats.t_quantile(0.975, 2) / math.sqrt(3), rel=1e-12)
    with pytest.raises(ValueError, match="`level`"):
        stats.mean_ci([1.0, 2.0], level=1.0)


def test_paired_difference_removes_the_shared_seed_offset() -> None:
    # Per-seed offsets of ±10 shared by both arms: the unpaired interval covers 0, the paired one does not.
    offsets = [10.0, -10.0, 5.0, -5.0]
    arm = [o + 1.0 + 0.1 * i for i, o in enumerate(offsets)]
    base = [o for o in offsets]
    d = stats.paired_differences(arm, base, scale=100.0)
    assert d == pytest.approx([100.0, 110.0, 120.0, 130.0])
    iv = stats.paired_ci(arm, base)
    assert iv.mean == pytest.approx(1.15) and iv.excludes_zero()
    assert not stats.mean_ci([a - b for a, b in zip(arm, [0.0] * 4)]).excludes_zero()
    with pytest.raises(ValueError, match="equal length"):
        stats.paired_differences([1.0], [1.0, 2.0])


def test_formatting() -> None:
    assert stats.fmt_ci([1.0, 2.0, 3.0, 4.0, 5.0], digits=2) == "3.00 ± 1.96"
    assert stats.fmt_ci([0.5], digits=1, scale=100) == "50.0"
    assert stats.fmt_ci([], digits=1) == "nan"
    assert stats.fmt_diff([3.0, 4.0, 5.0], [1.0, 1.0, 1.0], digits=2) == f"+3.00 ± {stats.t_quantile(0.975, 2) / math.sqrt(3):.2f} *"
    assert stats.fmt_diff([1.0, 2.0, 6.0], [0.0, 0.0, 0.0], digits=2) == "+3.00 ± 6.57"  # h = 4.303·√7/√3: covers 0, no mark
    assert stats.fmt_diff([1.0, -1.0], [0.0, 0.0], digits=1) == "+0.0 ± 12.7"
    assert stats.format_interval(stats.mean_ci([1234.0, 1236.0]), 3, significant=True) == "1.24e+03 ± 13"


@dataclasses.dataclass(frozen=True)
class _Cfg:
    lr: float
    path: Path
    seeds: tuple[int, ...]


def test_jsonable_round_trips_through_strict_json(tmp_path: Path) -> None:
    obj = {
        "cfg": _Cfg(0.1, Path("/a/b"), (1, 2)),
        "t": torch.tensor([1.5, float("nan")]),
        "s": torch.tensor(2),
        "np": np.arange(3, dtype=np.int64),
        "f": np.float64("inf"),
        1: {2.0, 1.0},
    }
    want = {"cfg": {"lr": 0.1, "path": "/a/b", "seeds": [1, 2]}, "t": [1.5, None], "s": 2, "np": [0, 1, 2], "f": None, "1": [1.0, 2.0]}
    assert stats.jsonable(obj) == want
    stats.write_json(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text()) == want


def test_environment_keys_and_values() -> None:
    env = stats.environment(git=False)
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["torch_threads"] == torch.get_num_threads() and env["git"] is None
    assert env["code"] == stats.code_fingerprint() and len(env["code"]) == 16
    json.dumps(env, allow_nan=False)  # strict JSON as is
    commit = stats.git_commit(Path(__file__).parent)
    assert commit is None or len(commit.split("+")[0]) == 40


def test_progress_bar_off_is_a_no_op() -> None:
    bar = stats.progress_bar(10, enabled=False, desc="x")
    assert isinstance(bar, stats.NoBar)
    with bar as b:
        b.update(3)
        b.set_postfix(loss=1.0)
        b.set_postfix_str("a")
    bar.close()
