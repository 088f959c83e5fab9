"""Kernels and host syncs per layer and step that the monitor's hooks add: the cost that bounds it on a GPU.

On an accelerator each ATen op that writes a tensor is (at least) one kernel launch of ~5–10 µs of
host time, and each ``.item()``/``bool(tensor)`` a host–device sync; at widths of about 1024 a plain
step is a few dozen launches, so the hooks' op count, not their flops, sets the ratio there. This
script counts both on the CPU, at the dispatcher (``TorchDispatchMode``), so it needs no GPU and gives
the same count on any machine:

* kernels: ops that produce or write a tensor (views, ``empty``, ``detach``, no-op ``.to`` and the
  host-side 0-d tensors of Python scalars, ``scalar_tensor``, left out);
* syncs: ``aten::_local_scalar_dense`` (every ``.item()``, ``float(t)``, ``bool(t)``).

Model: an MLP of ``--depth`` hidden layers of ``--width`` (+ a 10-way head), batch ``--batch``, SGD.
Contenders: a plain step, then ``CRHMonitor(preprocess=mode, defer_checks=defer)`` for each mode and
``defer_checks`` in ``False`` (checks in the hook, the CPU default) and ``True`` (the accelerator path: no
sync in the hooks); with ``--others`` (default) also ``AlignmentLoss`` (f-RWA + b-RWA on every layer,
exact and ``hutchinson`` with 16 probes; the double backward included) and ``NoiseCalibrated(SGD)``. Counted over ``--steps`` steps after two warm-up steps (folds included, every
16 calls); printed per layer and step, the plain step's own count for scale. ``--route accelerator``
(default) counts the code path a GPU takes: canonreg's CPU route (:data:`canonreg.moments._CPU_ROUTE`:
Grams in row panels, float32 row norms whose range is read on the host, 2 syncs per norm) is switched
off in this process; ``--route cpu`` counts what the CPU runs.

``--baseline-rev REV`` counts the same contenders with canonreg from git revision ``REV`` (extracted
to a temporary folder, run in a subprocess) in the same run, for before/after tables.

    python benchmarks/launches.py
    python benchmarks/launches.py --width 1024 --batch 512 --baseline-rev HEAD~3
    python benchmarks/launches.py --device cuda --width 1024 --batch 512      # on a GPU: its own route
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import extract_package, markdown_table, mlp, sgd_step  # noqa: E402

_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "lift_fresh", "detach", "alias", "scalar_tensor"})


class OpCount(TorchDispatchMode):
    """Counts kernel-like ATen ops and host syncs dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: collections.Counter[str] = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        name = func.overloadpacket.__name__
        returns = func._schema.returns
        view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        if name == "_local_scalar_dense":
            self.syncs += 1
        elif not view and name not in _NO_KERNEL:
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _accelerator_route() -> Iterator[None]:
    """Within: this process's canonreg takes its accelerator route on the CPU (one matmul per Gram, no host
    range check of the float32 row norms); revisions before ``moments._CPU_ROUTE`` get their float64 norm
    route (their Grams stay panelled). Restored on exit."""
    import canonreg.moments as moments
    import canonreg.monitor as monitor

    saved = getattr(moments, "_CPU_ROUTE", None), monitor._row_norm2
    if saved[0] is not None:
        moments._CPU_ROUTE = ()
    else:  # older revisions: their _row_norm2 returned the float64 squares of its non-CPU branch
        monitor._row_norm2 = lambda x: torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square_()
    try:
        yield
    finally:
        if saved[0] is not None:
            moments._CPU_ROUTE = saved[0]
        monitor._row_norm2 = saved[1]


def count(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per contender: kernels and syncs per layer-step (and the plain step's totals)."""
    emulate = args.route == "accelerator" and torch.device(args.device).type == "cpu"
    with _accelerator_route() if emulate else contextlib.nullcontext():
        return _count(args)


def _count(args: argparse.Namespace) -> list[dict[str, Any]]:
    import canonreg

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.d_in, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    model = mlp(args.d_in, args.width, args.depth, 10).to(device)
    layers = sum(isinstance(m, nn.Linear) for m in model.modules())
    step = sgd_step(model, torch.optim.SGD(model.parameters(), lr=1e-3), x, y)
    step()
    step()
    with OpCount() as plain:
        for _ in range(args.steps):
            step()
    base_k = sum(plain.kernels.values()) / args.steps
    rows: list[dict[str, Any]] = [
        {"contender": "plain step", "kernels": base_k, "syncs": plain.syncs / args.steps, "per": "step"}
    ]

    def added(contender: str, run: Callable[[], None]) -> None:
        run()
        run()
        with OpCount() as c:
            for _ in range(args.steps):
                run()
        rows.append({
            "contender": contender,
            "kernels": (sum(c.kernels.values()) / args.steps - base_k) / layers,
            "syncs": (c.syncs - plain.syncs) / args.steps / layers,
            "per": "layer-step",
            "top": [(k, round(v / args.steps / layers, 2)) for k, v in _added(c.kernels, plain.kernels, args.steps)],
        })

    for mode in args.modes:
        for defer in (False, True):
            with canonreg.CRHMonitor(model, preprocess=mode, defer_checks=defer):
                added(f"monitor {mode}, defer_checks={defer}", step)
    if args.others:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for label, kw in (("exact", {}), ("hutchinson, probes=16", {"estimator": "hutchinson", "probes": 16})):
            align = canonreg.AlignmentLoss(model, relations=("f-RWA", "b-RWA"), **kw)

            def loss_step(align: Any = align) -> None:
                task = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                (task + align(task)).backward()
                opt.step()

            added(f"AlignmentLoss f-RWA + b-RWA, {label}", loss_step)
            align.detach()
        wrapped = canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=1e-3), model, weight_decay=1e-4, noise="auto")
        added("NoiseCalibrated(SGD), noise='auto'", sgd_step(model, wrapped, x, y))
        wrapped.detach()
    return rows


def _added(with_hooks: collections.Counter[str], plain: collections.Counter[str], steps: int) -> list[tuple[str, int]]:
    """The ops the hooks added over ``steps`` steps, most frequent first (at most 8)."""
    added = collections.Counter({k: v - plain.get(k, 0) * steps for k, v in with_hooks.items()})
    return [(k, v) for k, v in added.most_common(8) if v > 0]


def count_at(rev: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """:func:`count` of the same model and contenders with canonreg from ``rev`` (a subprocess with that
    package first on the path)."""
    argv = [
        "--width", str(args.width), "--depth", str(args.depth), "--d-in", str(args.d_in), "--batch", str(args.batch),
        "--steps", str(args.steps), "--modes", *args.modes, "--route", args.route, "--device", args.device,
        "--others" if args.others else "--no-others",
    ]
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
        extract_package(rev, Path(src))
        target = Path(out) / "rows.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, __file__, *argv, "--json", str(target)], check=True, env=env)
        return json.loads(target.read_text())


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4, help="hidden layers")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="counted steps (two folds of 16 calls)")
    p.add_argument("--modes", nargs="+", default=["raw", "centered", "normalized"], choices=["raw", "centered", "normalized"])
    p.add_argument(
        "--route", choices=["cpu", "accelerator"], default="accelerator",
        help="accelerator (default): canonreg's non-CPU code paths, counted on the CPU; cpu: the CPU's own",
    )
    p.add_argument("--others", action=argparse.BooleanOptionalAction, default=True,
                   help="also count AlignmentLoss (exact, hutchinson) and NoiseCalibrated")
    p.add_argument("--device", default="cpu", help="where the model runs (a GPU counts its own route; --route is then moot)")
    p.add_argument("--baseline-rev", default=None, help="also count canonreg at this git revision")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # rows for --baseline-rev's subprocess
    p.add_argument("--out", default=None, help="write the rows (and the baseline's) as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    rows = count(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
        return {"rows": rows}
    before = count_at(args.baseline_rev, args) if args.baseline_rev else None
    header = ["contender", "per", "kernels", "syncs"]
    if before is not None:
        header += [f"kernels at {args.baseline_rev}", f"syncs at {args.baseline_rev}"]
    table = []
    for i, r in enumerate(rows):
        line = [r["contender"], r["per"], f"{r['kernels']:.1f}", f"{r['syncs']:.2f}"]
        if before is not None:
            line += [f"{before[i]['kernels']:.1f}", f"{before[i]['syncs']:.2f}"]
        table.append(line)
    print(
        f"MLP {args.depth} × {args.width} (d_in {args.d_in}, batch {args.batch}), {args.steps} counted steps, "
        f"on {args.device}" + (f", {args.route} route" if torch.device(args.device).type == "cpu" else "")
        + f", torch {torch.__version__}"
    )
    print(markdown_table(header, table))
    for r in rows[1:]:
        print(f"{r['contender']}: {r['top']}")
    result = {"args": vars(args), "rows": rows, "baseline": before}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
