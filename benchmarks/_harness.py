"""Shared timing and memory harness of ``benchmarks/peers.py`` and ``benchmarks/scaling.py``.

Timing protocol (made for a shared, loaded machine): every contender is built once (its own model
copy, hooks, optimizer); ``warmup`` untimed steps each; then ``rounds`` rounds that time every contender
in turn, the order rotated by one each round, so load drift hits all of them alike. A contender's time
per step in a round is the mean over its ``steps`` timed steps; its ratio is the median over rounds of
``time / reference time`` of the same round. Both clocks are kept: wall time and process CPU time (with
one torch thread the CPU clock is barely disturbed by other processes; the wall clock is what a user sees
on an idle machine).

Memory: :func:`peak_bytes` runs a callable under ``torch.profiler`` with ``profile_memory=True`` and
replays the CPU allocator's allocation and free events in time order: the peak of the running sum is
the most memory torch tensors held at once *beyond what was allocated before the call* (tensors freed
during the call that existed before count negative). This is torch's own allocation accounting, exact to
the byte for tensor storage; it does not see Python objects or allocator caching (there is none on CPU).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile


@dataclass
class Runner:
    """One contender, built and ready: ``step()`` is one training step (timed); ``release()`` drops
    products held between steps that a user would consume at once (per-sample gradients), outside the
    timing; ``close()`` checks that it computed what it claims and returns a summary (JSON-able);
    ``fold()`` brings its state to steady size for the memory pass (a monitor: ``compute()``, which
    folds its window into the float64 totals; the next step opens a new window)."""

    step: Callable[[], None]
    release: Callable[[], None] = lambda: None
    close: Callable[[], dict[str, Any]] = lambda: {}
    fold: Callable[[], object] = lambda: None


@dataclass
class Contender:
    """A named way to train with (or without) some second-order statistic.

    ``build`` returns a fresh :class:`Runner` (called once for timing, once more for memory);
    ``steps`` is the number of timed steps per round (10 for an ``every=10`` window: its time per step
    is the window's mean); ``rounds`` caps the rounds it takes part in (slow contenders); ``computes``
    says what it produces, for the table.
    """

    name: str
    computes: str
    build: Callable[[], Runner]
    steps: int = 1
    rounds: int | None = None
    warmup: int | None = None  # None: the harness default
    info: dict[str, Any] = field(default_factory=dict)


def mlp(d_in: int, width: int, hidden: int, classes: int) -> nn.Sequential:
    """``d_in → width (× hidden, ReLU) → classes``: ``hidden + 1`` Linear layers."""
    dims = [d_in] + [width] * hidden
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], classes))


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The plain training step every contender starts from: cross-entropy, backward, ``opt.step()``.

    ``y`` holds class indices of ``model(x)``'s last dimension (token models: ``(B, T)`` targets).
    """

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def given_options(cls: type, args: Any, quick: dict[str, Any] | None, quick_out: str) -> dict[str, Any]:
    """Config field values: ``quick`` (and ``out = quick_out``) when ``args.quick``, then every field of the
    dataclass ``cls`` given on the command line (``args.<field>`` not None; lists become tuples)."""
    values: dict[str, Any] = {**quick, "out": quick_out} if quick is not None and args.quick else {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return values


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def available_bytes() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (infinity where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _timed(step: Callable[[], None], n: int, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of ``step``, device work finished before each clock read."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def interleaved(
    contenders: list[Contender],
    *,
    rounds: int,
    warmup: int,
    reference: str = "plain",
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Time ``contenders`` in interleaved rounds; see the module docstring.

    Returns ``{name: {"wall": [s per step per round], "cpu": [...], "rounds": [round indices],
    "ratio_wall": median ratio, "ratio_cpu": ..., "seconds_wall": median s/step, "seconds_cpu": ...,
    "check": close() summary}}``; ratios are to ``reference`` (which must take part in every round).
    """
    device = device or torch.device("cpu")
    names = [c.name for c in contenders]
    if reference not in names:
        raise ValueError(f"Expected `reference` to be one of {names}, but got {reference!r}")
    runners: dict[str, Runner] = {}
    for c in contenders:
        runners[c.name] = c.build()
        for _ in range(warmup if c.warmup is None else c.warmup):
            runners[c.name].step()
        runners[c.name].release()
    times: dict[str, dict[str, list[Any]]] = {c.name: {"wall": [], "cpu": [], "rounds": []} for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            if c.rounds is not None and r >= c.rounds and c.name != reference:
                continue
            wall, cpu = _timed(runners[c.name].step, c.steps, device)
            runners[c.name].release()
            times[c.name]["wall"].append(wall)
            times[c.name]["cpu"].append(cpu)
            times[c.name]["rounds"].append(r)
        log(f"  round {r + 1}/{rounds} done, load {loadavg()}")
    out: dict[str, dict[str, Any]] = {}
    ref = times[reference]
    for c in contenders:
        t = times[c.name]
        res: dict[str, Any] = dict(t)
        for clock in ("wall", "cpu"):
            ratios = [v / ref[clock][r] for v, r in zip(t[clock], t["rounds"]) if ref[clock][r] > 0]
            res[f"seconds_{clock}"] = statistics.median(t[clock]) if t[clock] else None
            res[f"ratio_{clock}"] = statistics.median(ratios) if ratios else None
        try:  # a failing check is reported, never allowed to lose the timings
            res["check"] = runners[c.name].close()
        except Exception as exc:  # noqa: BLE001
            res["check"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {c.name}: close() failed: {res['check']['error']}")
        out[c.name] = res
    runners.clear()
    gc.collect()
    return out


def peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """``(peak, net)`` bytes of torch CPU tensor storage allocated while ``fn()`` runs, relative to its start.

    ``peak`` is the maximum of the running sum of the allocator's events in time order; ``net`` the sum
    at the end (what ``fn`` left allocated, e.g. accumulators and ``.grad``).
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak, cur


@dataclass(frozen=True)
class Memory:
    """Torch CPU allocation of one contender on a fresh copy (bytes, relative to before it was built).

    ``step_peak``: the most held at once while building it and running ``steps + 1`` training steps
    (a monitor folds its window with ``fold()`` before the last one, so that step runs at the steady
    state); ``held``: still allocated after them (model copy, gradients, the contender's state);
    ``fold_peak``: the most held at once during ``fold()`` (a monitor's ``compute()``; 0 otherwise).
    """

    step_peak: int
    held: int
    fold_peak: int


def memory_of(contender: Contender, steps: int) -> Memory | None:
    """Measure :class:`Memory` of ``contender``: build, ``steps`` steps, ``fold()``, one more step, each profiled.

    None (with a printed line) when that fails: a broken contender must not lose the other measurements.
    """
    holder: list[Runner] = []

    def run() -> None:
        holder.append(contender.build())
        for _ in range(steps):
            holder[0].step()

    try:
        peak_a, net_a = peak_bytes(run)
        peak_b, net_b = peak_bytes(holder[0].fold)
        peak_c, net_c = peak_bytes(holder[0].step)
        return Memory(step_peak=max(peak_a, net_a + net_b + peak_c), held=net_a + net_b + net_c, fold_peak=net_a + peak_b)
    except Exception as exc:  # noqa: BLE001
        print(f"  {contender.name}: memory pass failed: {type(exc).__name__}: {exc}")
        return None
    finally:
        try:
            if holder:
                holder[0].release()
                holder[0].close()
        except Exception:  # noqa: BLE001  (the timing pass reports a failing close())
            pass
        holder.clear()


def mib(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (first column left-aligned, the others right-aligned)."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def extract_package(rev: str, dest: Path) -> Path:
    """canonreg's package as it was at git revision ``rev`` (``git archive``), extracted to ``dest/canonreg``;
    returns ``dest`` (put it first on a path, or import ``dest/canonreg`` under another name)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "canonreg"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest
