"""CRHMonitor under DistributedDataParallel: 2 processes (gloo), each sees half of every batch.

``compute()`` must return, on every rank, what one process that saw the whole batch computes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_case
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import canonreg

WORLD = 2
SCENARIOS = [("mlp", "raw"), ("mlp", "normalized"), ("conv1d", "centered")]
LR, WD = 0.1, 1e-3


def _data(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Even batch sizes: equal halves make DDP's averaged gradient the full-batch mean."""
    g = torch.Generator().manual_seed(7)
    shape = (5,) if name == "mlp" else (2, 11)
    return [
        (torch.randn(b, *shape, dtype=torch.float64, generator=g), torch.randint(0, 3, (b,), generator=g))
        for b in (8, 6)
    ]


def _train(name: str, preprocess: str, rank: int | None) -> dict[str, object]:
    """Two SGD steps under a monitor; ``rank=None`` is the single process seeing whole batches."""
    case = make_case(name)
    model = case.model if rank is None else DDP(case.model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    monitor = canonreg.CRHMonitor(model, preprocess=preprocess)
    with monitor:
        for x, y in _data(name):
            if rank is not None:
                half = x.shape[0] // WORLD
                x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
            opt.zero_grad()
            case.loss(model(x), y).backward()
            opt.step()
    report = monitor.compute(lr=LR, weight_decay=WD, batch_size=8, n_bootstrap=20, bootstrap_seed=1)
    return {
        "layers": report.layers,
        "matrices": {n: report.matrices(n) for n in report.layers},
        "alignment": report.alignment,
        "samples": report.samples,
        "steps": report.steps,
        "exponents": {n: {r: f.exponent for r, f in e.items()} for n, e in report.exponents.items()},
        "balance": {n: b.to_dict() for n, b in report.balance.items()},
    }


def _measure_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(30, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (30,), generator=g)


def _measure(x: torch.Tensor, y: torch.Tensor, *, sync_dist: bool) -> dict[str, object]:
    model = make_case("mlp").model
    report = canonreg.measure_crh(model, x, y, batch_size=7, preprocess="centered", sync_dist=sync_dist)
    return {"alignment": report.alignment, "samples": report.samples, "H_a": report.matrices(report.layers[0])["H_a"]}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, object] = {f"{n}-{p}": _train(n, p, rank) for n, p in SCENARIOS}
        # measure_crh is collective by default: every rank calls it, here rank 1 with an empty shard
        x, y = _measure_data()
        shard = (x, y) if rank == 0 else (x[:0], y[:0])
        results["measure-collective"] = _measure(*shard, sync_dist=True)
        # sync_dist=False: rank 0 alone measures everything while rank 1 waits (a collective call would hang)
        if rank == 0:
            results["measure-local"] = _measure(x, y, sync_dist=False)
        # NoiseCalibrated refuses noise under DDP when it is made (it raised at the first step only)
        model = make_case("mlp").model
        for noise in (0.5, "auto"):
            try:
                canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=1e-3, noise=noise)
                results[f"nc-{noise}"] = "accepted"
            except canonreg.CanonRegError as e:
                results[f"nc-{noise}"] = str(e)
        canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, weight_decay=1e-3).detach()
        dist.barrier()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_two_ranks_equal_one_process(tmp_path, single_thread) -> None:
    tests_dir = str(Path(__file__).parent)
    if tests_dir not in sys.path:  # the spawned children import this module and conftest by name
        sys.path.insert(0, tests_dir)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        assert "does not support data-parallel" in r["nc-0.5"] and "does not support data-parallel" in r["nc-auto"]
    want = _measure(*_measure_data(), sync_dist=False)
    for got in (ranks[0]["measure-collective"], ranks[1]["measure-collective"], ranks[0]["measure-local"]):
        assert got["samples"] == want["samples"]  # the data once, not once per rank
        assert_close(got["H_a"], want["H_a"])
        for n, rels in want["alignment"].items():
            for r, a in rels.items():
                assert got["alignment"][n][r] == pytest.approx(a, abs=1e-10)
    for name, preprocess in SCENARIOS:
        single = _train(name, preprocess, None)
        for got in (r[f"{name}-{preprocess}"] for r in ranks):
            assert got["layers"] == [f"module.{n}" for n in single["layers"]]  # DDP's prefix
            for n in single["layers"]:
                m = f"module.{n}"
                for k, v in single["matrices"][n].items():
                    assert_close(got["matrices"][m][k], v, msg=lambda s, n=n, k=k: f"{name}/{preprocess} {n} {k}: {s}")
                assert got["samples"][m] == single["samples"][n]
                assert got["steps"][m] == single["steps"][n] == 2
                for r, a in single["alignment"][n].items():
                    assert got["alignment"][m][r] == pytest.approx(a, abs=1e-10)
                assert_close(
                    torch.tensor(list(got["exponents"][m].values())),
                    torch.tensor(list(single["exponents"][n].values())),
                    rtol=1e-6, atol=1e-9, equal_nan=True,  # eigen-decompositions of equal-to-round-off matrices
                )
                for key, val in single["balance"][n].items():
                    assert got["balance"][m][key] == pytest.approx(val, rel=1e-9, abs=1e-14, nan_ok=True)
