"""How the monitor's overhead and ``compute()`` time scale: width, batch, a conv net, a ≥ 50M-parameter transformer.

Sweeps (SGD + cross-entropy, :class:`canonreg.CRHMonitor` with ``preprocess`` = each of ``--modes``, default
the library's ``normalized``; each point and mode times ``plain``, ``every1`` and ``every10`` in one process,
and with ``--idle`` also ``idle``: a monitor with ``every = 10**9``, whose only collected call is the warm-up
step, so every timed step is an inactive one: the cost of the hooks that fire and return):

* **width**: MLP ``40 → w → w → 10`` (``--width-hidden`` 2 hidden layers, so one ``w × w`` layer) for
  ``w`` in 256 … 8192, at a batch that shrinks with the width (``--width-batches``) to bound the run.
  The exact monitor keeps float64 ``d × d`` totals plus a float32 window per accumulated matrix (12
  bytes per entry; ``compute()`` needs about 1.5 times as much again while it builds the report); where
  that state would exceed ``--exact-max-gib``, or 2.5 times it 70% of the available memory, the point uses the sketched
  monitor (``CRHMonitor(sketch=k)``, ``--sketch``) instead, and from ``--sketch-from`` on both are
  timed, so the curves overlap. ``--kinds exact sketch`` (or either alone) times these kinds at every
  point instead of that rule (``exact`` still only where it fits).
* **batch**: MLP ``40 → 1024 × 4 → 10`` (the peers' point) at batch 128 … 4096.
* **conv**: three 3×3 convolutions (3→32→64→128, strides 1, 2, 2) + a Linear head on 3×32×32 inputs;
  every output position is a sample row, ``h_a`` is the ``C_in·9`` patch.
* **transformer**: a GPT-like decoder built from :class:`GPTConfig` (default 8 blocks, ``d_model`` 768,
  12 heads, MLP ×4, vocabulary 4096, tied embeddings: about 60M parameters), random init, random tokens,
  next-token loss; the monitor watches every Linear layer of the blocks (q/k/v, output projection,
  both MLP layers; the tied head and the embeddings are left out). Target: ``every10`` ≤ 1.1×.

``compute()`` is timed once per point on the ``every1`` monitor (or the ``every10`` one) after the
timing: with ``exponents=False, ranks=False`` always, and with ``ranks=False`` (exponents fitted) where
no monitored matrix is larger than ``--exponents-max-dim``; ``report.timings`` gives the split.

Timing: ``benchmarks/_harness.py`` (warm-up, interleaved rounds, rotated order, median of per-round
ratios, CPU and wall clocks; the CPU clock is the reported one: with one thread, other processes on a
shared machine disturb it less, though still by about ±8% per round at a load of 1–3: an A/A control on the
transformer, plain vs an identical copy, gave per-round ratios 0.94–1.09, median 1.005). Heavy points (≳ 20 GFLOP per
plain step) run ``--big-rounds`` rounds. The monitor folds its float32 windows into the float64 totals every 16
collected calls of a layer: the default ``--steps 2`` (1 warm-up + rounds × 2 collected calls) never times a fold;
``--steps 16`` puts exactly one in every round's every1 window (the long-run every1 cost;
``benchmarks/results/scaling_transformer_modes_fold.md``). Extra memory (torch CPU allocation events, minus the same
for ``plain``): ``held`` after building
the monitored copy, one collected step, ``compute()`` and another step (the steady state: float64
totals + a float32 window); the peak of those steps and the peak during ``compute()`` in the JSON.

    python benchmarks/scaling.py             # all sweeps, 1 thread (about 10 minutes on an idle core)
    python benchmarks/scaling.py --quick     # seconds: tiny widths, batches and transformer
    python benchmarks/scaling.py --sweeps width transformer --widths 1024 4096
    python benchmarks/scaling.py --merge w.json b.json t.json   # sweeps run as separate processes (--out w.json ...)
    python benchmarks/scaling.py --sweeps transformer --modes raw centered --kinds exact --idle   # modes, inactive steps

Writes ``benchmarks/results/scaling.json``, ``scaling.md`` and ``scaling.png`` (``scaling_quick.*`` with ``--quick``).
Reference: the monitor measures the CRH relations of Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import canonreg
from canonreg.stats import environment, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    Contender,
    Runner,
    available_bytes,
    fmt_ratio,
    given_options,
    interleaved,
    loadavg,
    markdown_table,
    memory_of,
    mib,
    mlp,
    sgd_step,
)

RESULTS = Path(__file__).resolve().parent / "results"
SWEEPS = ("width", "batch", "conv", "transformer")
MODES = ("raw", "centered", "normalized")
KINDS = ("exact", "sketch")
IDLE_EVERY = 10**9  # the ``idle`` contender: only its first (warm-up) call is collected
TARGET_TRANSFORMER_EVERY10 = 1.1
HEAVY_FLOPS = 2e10  # plain steps above this many multiply-adds (≈ 6·rows·params) run --big-rounds rounds


@dataclass(frozen=True)
class GPTConfig:
    """A GPT-like decoder: pre-norm blocks of causal self-attention and an MLP, tied embeddings."""

    vocab: int = 4096
    seq: int = 64
    d_model: int = 768
    n_layer: int = 8
    n_head: int = 12
    mlp_ratio: int = 4


@dataclass(frozen=True)
class Config:
    sweeps: tuple[str, ...] = SWEEPS
    modes: tuple[str, ...] = ("normalized",)
    kinds: tuple[str, ...] = ()  # empty: exact where it fits, sketch where not or at widths >= sketch_from
    idle: bool = False
    d_in: int = 40
    classes: int = 10
    widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    width_batches: tuple[int, ...] = (512, 512, 512, 256, 128, 128)  # one per width
    width_hidden: int = 2
    batches: tuple[int, ...] = (128, 512, 2048, 4096)
    batch_width: int = 1024
    batch_hidden: int = 4
    conv_batch: int = 32
    gpt: GPTConfig = GPTConfig()
    gpt_batch: int = 2
    exact_max_gib: float = 6.0
    sketch: int = 256
    sketch_from: int = 2048  # time the sketch too at widths >= this
    exponents_max_dim: int = 2048
    rounds: int = 3
    big_rounds: int = 2
    steps: int = 2  # timed steps per round (every10: a window of 10)
    warmup: int = 1
    threads: int = 1
    seed: int = 0
    figure: bool = True
    merge: tuple[str, ...] = ()
    out: str = str(RESULTS / "scaling.json")


QUICK: dict[str, Any] = dict(
    widths=(32, 64), width_batches=(32, 32), batches=(16, 64), batch_width=64, conv_batch=2,
    gpt=GPTConfig(vocab=64, seq=8, d_model=32, n_layer=2, n_head=4), sketch=8, sketch_from=64,
    rounds=1, big_rounds=1, steps=1, warmup=1,
)


def parse(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (seconds)")
    p.add_argument("--sweeps", nargs="+", choices=SWEEPS)
    p.add_argument("--modes", "--mode", dest="modes", nargs="+", choices=MODES, help="preprocess modes, each timed in turn")
    p.add_argument("--kinds", nargs="+", choices=KINDS, help="monitors timed at every point (default: exact where it "
                   "fits, sketch where not or at widths >= --sketch-from)")
    p.add_argument("--idle", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also time a monitor with every={IDLE_EVERY:.0e} (inactive steps only)")
    for name in ("widths", "width_batches", "batches"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, nargs="+")
    for name in ("width_hidden", "batch_width", "batch_hidden", "conv_batch", "gpt_batch", "sketch", "sketch_from",
                 "exponents_max_dim", "rounds", "big_rounds", "steps", "warmup", "threads", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    for name in ("vocab", "seq", "d_model", "n_layer", "n_head", "mlp_ratio"):
        p.add_argument(f"--gpt-{name.replace('_', '-')}", dest=f"gpt_{name}", type=int)
    p.add_argument("--exact-max-gib", dest="exact_max_gib", type=float)
    p.add_argument("--figure", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these result files (e.g. sweeps run as parallel "
                   "processes) into --out's JSON, table and figure; the first file's config heads the merged one")
    p.add_argument("--out")
    args = p.parse_args(argv)
    values = given_options(Config, args, QUICK, str(RESULTS / "scaling_quick.json"))
    gpt = {k: getattr(args, f"gpt_{k}") for k in ("vocab", "seq", "d_model", "n_layer", "n_head", "mlp_ratio")
           if getattr(args, f"gpt_{k}") is not None}
    values["gpt"] = dataclasses.replace(values.get("gpt", GPTConfig()), **gpt)
    if args.widths is not None and args.width_batches is None:
        default = dict(zip(Config.widths, Config.width_batches))
        values["width_batches"] = tuple(default.get(w, 128 if w > 2048 else 512) for w in args.widths)
    cfg = Config(**values)
    if len(cfg.width_batches) != len(cfg.widths):
        p.error(f"Expected one `--width-batches` entry per width ({len(cfg.widths)}), but got {len(cfg.width_batches)}")
    for name in ("width_hidden", "batch_width", "batch_hidden", "conv_batch", "gpt_batch", "sketch", "rounds", "big_rounds", "steps", "threads"):
        if getattr(cfg, name) < 1:
            p.error(f"Expected `--{name.replace('_', '-')}` to be a positive int, but got {getattr(cfg, name)}")
    if any(v < 1 for v in cfg.widths + cfg.width_batches + cfg.batches):
        p.error("Expected `--widths`, `--width-batches` and `--batches` to be positive ints")
    if cfg.gpt.d_model % cfg.gpt.n_head:
        p.error(f"Expected `--gpt-d-model` to be a multiple of `--gpt-n-head`, but got {cfg.gpt.d_model} and {cfg.gpt.n_head}")
    return cfg


# ----------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.fc = nn.Linear(c.d_model, c.mlp_ratio * c.d_model)
        self.fc2 = nn.Linear(c.mlp_ratio * c.d_model, c.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` :class:`Block` s, final LayerNorm, head tied to the token embedding."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Embedding(c.seq, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_cnn(classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )


def in_blocks(name: str, module: nn.Module) -> bool:
    """The transformer's monitored layers: the Linear layers inside its blocks."""
    return name.startswith("blocks.") and isinstance(module, nn.Linear)


def layer_dims(model: nn.Module, layers: Callable[[str, nn.Module], bool] | None) -> list[tuple[int, int]]:
    """``(d_a, d_b)`` of every monitored Linear/Conv2d layer (``d_a = C_in·k²`` for a convolution)."""
    dims = []
    for name, m in model.named_modules():
        if layers is not None and not layers(name, m):
            continue
        if isinstance(m, nn.Linear):
            dims.append((m.in_features, m.out_features))
        elif isinstance(m, nn.Conv2d):
            dims.append((m.in_channels * math.prod(m.kernel_size), m.out_channels))
    return dims


def exact_state_bytes(dims: list[tuple[int, int]], mode: str) -> int:
    """The exact monitor's accumulators: 12 bytes (float64 total + float32 window) per matrix entry.

    Raw/centred accumulate ``H_a`` (``d_a²``) and ``G_b`` (``d_b²``); normalized also ``H_b`` and ``G_a``.
    """
    per = 2 if mode == "normalized" else 1
    return sum(12 * per * (a * a + b * b) for a, b in dims)


# ----------------------------------------------------------------------------- one point
@dataclass
class Point:
    sweep: str
    label: str
    x: float  # the swept value (width, batch; 0 for single points)
    build: Callable[[], nn.Module]
    inputs: Tensor
    targets: Tensor
    rows: int  # sample rows per step through the biggest layer (for the flop estimate)
    layers: Callable[[str, nn.Module], bool] | None = None
    width: int | None = None


def measure(point: Point, cfg: Config, mode: str) -> dict[str, Any]:
    """Time plain / every1 / every10 (/ idle) of the ``mode`` monitor (exact and/or sketched) on ``point``; ``compute()`` time; memory."""
    torch.manual_seed(cfg.seed)
    base = point.build()
    n_params = sum(p.numel() for p in base.parameters())
    dims = layer_dims(base, point.layers)
    state = exact_state_bytes(dims, mode)
    # compute() builds the report's float64 matrices beside the state: 2.5× the state at its peak (measured on the transformer)
    exact_fits = state <= cfg.exact_max_gib * 2**30 and 2.5 * state <= 0.7 * available_bytes()
    if cfg.kinds:
        kinds = [k for k in KINDS if k in cfg.kinds and (k != "exact" or exact_fits)]
    else:
        use_sketch = (not exact_fits or (point.width is not None and point.width >= cfg.sketch_from))
        kinds = (["exact"] if exact_fits else []) + (["sketch"] if use_sketch else [])
    notes = []
    if not exact_fits and (not cfg.kinds or "exact" in cfg.kinds):
        notes.append(f"exact state {state / 2**30:.1f} GiB > --exact-max-gib {cfg.exact_max_gib}, or 2.5 times it > 70% of the available memory "
                     f"({available_bytes() / 2**30:.1f} GiB): exact skipped"
                     + (f", sketch k={cfg.sketch} only" if "sketch" in kinds else ""))
    for note in notes:
        print(f"  {point.label}: {note}")
    max_dim = max(max(a, b) for a, b in dims)
    compute_times: dict[str, dict[str, Any]] = {}

    def runner(kind: str, every: int) -> Runner:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        if kind == "plain":
            return Runner(sgd_step(model, opt, point.inputs, point.targets))
        extra: dict[str, Any] = {"sketch": cfg.sketch} if kind == "sketch" else {}
        monitor = canonreg.CRHMonitor(model, point.layers, preprocess=mode, every=every, **extra).attach()  # type: ignore[arg-type]

        def close() -> dict[str, Any]:
            out: dict[str, Any] = {}
            if every == IDLE_EVERY:  # what the inactive steps collected: nothing beyond the warm-up call
                out["steps"] = monitor.compute(exponents=False, ranks=False).steps
            elif kind not in compute_times:  # the first monitor of each kind to close (every1) is timed
                t0, c0 = time.perf_counter(), time.process_time()
                report = monitor.compute(exponents=False, ranks=False)
                times = {"seconds": time.process_time() - c0, "seconds_wall": time.perf_counter() - t0, "timings": report.timings}
                if kind == "exact" and max_dim <= cfg.exponents_max_dim:  # a sketch has no exponents
                    t0, c0 = time.perf_counter(), time.process_time()
                    rep2 = monitor.compute(ranks=False)
                    times.update(seconds_exponents=time.process_time() - c0, seconds_exponents_wall=time.perf_counter() - t0,
                                 timings_exponents=rep2.timings)
                compute_times[kind] = times
                out["alignment"] = report.alignment
                out["steps"] = report.steps
            monitor.detach()
            return out

        step = sgd_step(model, opt, point.inputs, point.targets)

        return Runner(step, close=close, fold=partial(monitor.compute, exponents=False, ranks=False))

    heavy = 6 * point.rows * n_params > HEAVY_FLOPS
    rounds = cfg.big_rounds if heavy else cfg.rounds
    plain = Contender("plain", "", partial(runner, "plain", 1), steps=cfg.steps)
    monitored = []
    for kind in kinds:
        monitored.append(Contender(f"every1/{kind}", "", partial(runner, kind, 1), steps=cfg.steps))
        monitored.append(Contender(f"every10/{kind}", "", partial(runner, kind, 10), steps=10))
        if cfg.idle:  # the warm-up step is its one collected call (so at least one warm-up step)
            monitored.append(Contender(f"idle/{kind}", "", partial(runner, kind, IDLE_EVERY), steps=cfg.steps, warmup=max(1, cfg.warmup)))
    # every contender of a session lives until its end: big exact states are timed one monitor at a time
    split = exact_fits and state * len(monitored) > cfg.exact_max_gib * 2**30
    sessions = [[plain, c] for c in monitored] if split else [[plain, *monitored]]
    load0 = loadavg()
    t0 = time.perf_counter()
    timing: dict[str, dict[str, Any]] = {}
    plain_by_session = []
    for session in sessions:
        got = interleaved(session, rounds=rounds, warmup=cfg.warmup, log=lambda s: None)
        timing.setdefault("plain", got["plain"])
        timing.update({k: v for k, v in got.items() if k != "plain"})
        plain_by_session.append({c: got["plain"][c] for c in ("wall", "cpu", "rounds")})
    contenders = [plain, *monitored]
    memory = {c.name: memory_of(c, steps=1) for c in contenders if not c.name.startswith(("every10", "idle"))}
    ref = memory.get("plain")
    # every1 copies train identically (same init, batches, steps), so exact and sketched α see the same samples
    alphas = {k: timing[f"every1/{k}"]["check"].get("alignment") for k in kinds}  # None where close() failed
    sketch_error = None
    if alphas.get("exact") and alphas.get("sketch"):
        ex, sk = alphas["exact"], alphas["sketch"]
        sketch_error = max(abs(sk[n][r] - ex[n][r]) for n in ex for r in ex[n] if math.isfinite(ex[n][r]) and math.isfinite(sk[n][r]))
    res: dict[str, Any] = {
        "sweep": point.sweep, "label": point.label, "mode": mode, "x": point.x, "params": n_params, "rows_per_step": point.rows,
        "layer_dims": dims, "exact_state_bytes_estimate": state, "kinds": kinds, "notes": notes, "rounds": rounds,
        "sessions": [[c.name for c in ss] for ss in sessions], "plain_by_session": plain_by_session,
        "seconds_per_step_cpu": {k: v["seconds_cpu"] for k, v in timing.items()},
        "seconds_per_step_wall": {k: v["seconds_wall"] for k, v in timing.items()},
        "ratio_cpu": {k: v["ratio_cpu"] for k, v in timing.items()},
        "ratio_wall": {k: v["ratio_wall"] for k, v in timing.items()},
        "extra_held_bytes": {k: m.held - ref.held for k, m in memory.items() if k != "plain" and m and ref},
        "extra_peak_bytes": {k: m.step_peak - ref.step_peak for k, m in memory.items() if k != "plain" and m and ref},
        "compute_peak_bytes": {k: m.fold_peak - ref.held for k, m in memory.items() if k != "plain" and m and ref},
        "compute": compute_times, "alignment": alphas,
        "steps_collected": {k: v["check"]["steps"] for k, v in timing.items() if "steps" in v.get("check", {})}, "sketch_max_abs_error": sketch_error, "load_start": load0, "load_end": loadavg(), "seconds": time.perf_counter() - t0,
        "raw": {k: {c: v[c] for c in ("wall", "cpu", "rounds")} for k, v in timing.items()},
    }
    r = res["ratio_cpu"]
    print(f"  {point.label:<28} {mode:<10} params {n_params:>11,}  plain {res['seconds_per_step_cpu']['plain']:.4f} s  "
          + "  ".join(f"{k} {fmt_ratio(r[k])}x" for k in r if k != "plain")
          + "  compute " + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in compute_times.items())
          + f"  load {res['load_end']}", flush=True)
    return res


def points(cfg: Config) -> list[Point]:
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def cls(n: int) -> Tensor:
        return torch.randint(0, cfg.classes, (n,), generator=g)

    out: list[Point] = []
    if "width" in cfg.sweeps:
        for w, n in zip(cfg.widths, cfg.width_batches):
            out.append(Point("width", f"mlp width {w} (batch {n})", w, partial(mlp, cfg.d_in, w, cfg.width_hidden, cfg.classes),
                             torch.randn(n, cfg.d_in, generator=g), cls(n), n, width=w))
    if "batch" in cfg.sweeps:
        for n in cfg.batches:
            out.append(Point("batch", f"mlp {cfg.batch_width}x{cfg.batch_hidden} batch {n}", n,
                             lambda: mlp(cfg.d_in, cfg.batch_width, cfg.batch_hidden, cfg.classes),
                             torch.randn(n, cfg.d_in, generator=g), cls(n), n))
    if "conv" in cfg.sweeps:
        n = cfg.conv_batch
        out.append(Point("conv", f"cnn 3-32-64-128 batch {n}", 0, lambda: make_cnn(cfg.classes),
                         torch.randn(n, 3, 32, 32, generator=g), cls(n), n * 32 * 32))
    if "transformer" in cfg.sweeps:
        c, n = cfg.gpt, cfg.gpt_batch
        tokens = torch.randint(0, c.vocab, (n, c.seq + 1), generator=g)
        out.append(Point("transformer", f"gpt {c.n_layer}x{c.d_model} tokens {n}x{c.seq}", 0, lambda: GPT(c),
                         tokens[:, :-1], tokens[:, 1:], n * c.seq, layers=in_blocks))
    return out


# ----------------------------------------------------------------------------- report
def format_table(results: list[dict[str, Any]], cfg: Config, env: dict[str, Any]) -> str:
    head = [
        f"`{env.get('command', '?')}`",
        "",
        f"Monitor (`preprocess` {', '.join(repr(m) for m in _modes(results, cfg))}) overhead per training step, ratio to the plain step in the same run "
        f"(CPU clock, median over interleaved rounds), {cfg.threads} thread(s), torch {env['torch']}, {env['cpu']}; "
        "measured on a shared, loaded machine (load average = 1-min load at the end of each point).",
        "`exact`: float64 d×d moments; `sketch k`: `CRHMonitor(sketch=k)`. compute(): CPU seconds with "
        "`exponents=False, ranks=False` (with exponents, ranks skipped, in brackets where measured). "
        "state: torch allocation held after a collected step, compute() and another step (float64 totals + float32 "
        "window), beyond the plain step's; peak in the JSON. idle: a monitor with every=10**9 after its one "
        "collected (warm-up) call: the cost of inactive steps (`--idle`).",
        "",
    ]
    header = ["point", "params", "mode", "monitor", "plain s", "every1 ×", "every10 ×", "idle ×", "state MiB", "compute() s", "load", "rounds"]
    rows = []
    for r in results:
        for kind in r["kinds"] or ["—"]:
            q = r["ratio_cpu"]
            ct = r["compute"].get(kind, {})
            cs = "—" if not ct else f"{ct['seconds']:.2f}" + (f" ({ct['seconds_exponents']:.2f})" if "seconds_exponents" in ct else "")
            rows.append([
                r["label"], f"{r['params'] / 1e6:.1f}M", r.get("mode", cfg.modes[0]), kind if kind != "sketch" else f"sketch {cfg.sketch}",
                f"{r['seconds_per_step_cpu']['plain']:.4f}", fmt_ratio(q.get(f"every1/{kind}")), fmt_ratio(q.get(f"every10/{kind}"), 3),
                fmt_ratio(q.get(f"idle/{kind}"), 3),
                mib(r["extra_held_bytes"].get(f"every1/{kind}")), cs, f"{r['load_end'][0]:.1f}" if r["load_end"] else "—",
                str(r["rounds"]),
            ])
    return "\n".join(head) + markdown_table(header, rows)


def _modes(results: list[dict[str, Any]], cfg: Config) -> list[str]:
    """The preprocess modes of ``results`` in order of appearance (``cfg.modes`` for results that predate the field)."""
    return list(dict.fromkeys(r.get("mode", cfg.modes[0]) for r in results)) or list(cfg.modes)


def verdict(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if r["sweep"] != "transformer":
            continue
        for kind in r["kinds"]:
            q = r["ratio_cpu"].get(f"every10/{kind}")
            ok = q is not None and q <= TARGET_TRANSFORMER_EVERY10
            mode = f" ({r['mode']})" if "mode" in r else ""
            lines.append(f"target transformer every10/{kind}{mode} <= {TARGET_TRANSFORMER_EVERY10}x: {'met' if ok else 'MISSED'} "
                         f"({fmt_ratio(q, 3)}x, {r['params'] / 1e6:.1f}M parameters{'' if r['params'] >= 50e6 else ', below 50M'})")
    return lines


def figure(results: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = _modes(results, cfg)
    tag = {m: f"{m} " if len(modes) > 1 else "" for m in modes}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, sweep, xlabel in ((axes[0], "width", "width w (MLP 40→w→w→10)"), (axes[1], "batch", f"batch (MLP 40→{cfg.batch_width}×{cfg.batch_hidden}→10)")):
        for mode, marker in zip(modes, "os^"):
            rs = [r for r in results if r["sweep"] == sweep and r.get("mode", cfg.modes[0]) == mode]
            for kind, style in (("exact", "-"), ("sketch", "--")):
                for every, color in (("every1", "C0"), ("every10", "C1")):
                    pts = [(r["x"], r["ratio_cpu"][f"{every}/{kind}"]) for r in rs if f"{every}/{kind}" in r["ratio_cpu"]]
                    if pts:
                        ax.plot(*zip(*pts), style, marker=marker, color=color,
                                label=f"{tag[mode]}{every} {kind if kind == 'exact' else f'sketch {cfg.sketch}'}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(1.1, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time / plain step (CPU clock)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes[2]
    rs = [r for r in results if r["sweep"] == "width"]
    for kind, style in (("exact", "-"), ("sketch", "--")):
        pts = [(r["x"], r["compute"][kind]["seconds"]) for r in rs if kind in r["compute"]]
        if pts:
            ax.plot(*zip(*pts), style, marker="o", color="C2", label=f"{kind}: no exponents, no ranks")
        pts = [(r["x"], r["compute"][kind]["seconds_exponents"]) for r in rs if "seconds_exponents" in r["compute"].get(kind, {})]
        if pts:
            ax.plot(*zip(*pts), style, marker="s", color="C3", label=f"{kind}: exponents, no ranks")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width w")
    ax.set_ylabel("compute() seconds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[3]
    bars = [(f"{r['sweep']}\n{tag.get(r.get('mode', ''), '')}{kind}\n{every}", r["ratio_cpu"][f"{every}/{kind}"])
            for r in results if r["sweep"] in ("conv", "transformer") for kind in r["kinds"] for every in ("every1", "every10")]
    if bars:
        ax.bar(range(len(bars)), [b[1] for b in bars], color=["C0", "C1"] * (len(bars) // 2))
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
        ax.axhline(1.1, color="grey", lw=0.8, ls=":")
        ax.set_ylabel("step time / plain step")
    ax.set_title("conv net, transformer", fontsize=9)
    fig.suptitle(f"CRHMonitor(preprocess={' / '.join(modes)}) overhead, {cfg.threads} thread(s), CPU clock, shared machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv)
    if cfg.merge:
        parts = [json.loads(Path(f).read_text()) for f in cfg.merge]
        order = {s: i for i, s in enumerate(SWEEPS)}
        results = sorted((r for part in parts for r in part["results"]), key=lambda r: (order[r["sweep"]], r["x"]))
        cfg = dataclasses.replace(Config(**{**_config_from_json(parts[0]["config"]), "merge": cfg.merge}), out=cfg.out,
                                  figure=cfg.figure)
        env = {**parts[0]["environment"], "merged_from": {f: p["environment"] for f, p in zip(cfg.merge, parts)},
               "command": "; ".join(p["environment"].get("command", "?") for p in parts)}
        return report(results, cfg, env)
    torch.set_num_threads(cfg.threads)
    load_start = loadavg()
    t0 = time.perf_counter()
    results = []
    for point in points(cfg):
        for mode in cfg.modes:
            results.append(measure(point, cfg, mode))
    env = environment()
    env.update(load_start=load_start, load_end=loadavg(), wall_seconds=time.perf_counter() - t0,
               command=" ".join(["python benchmarks/scaling.py", *(sys.argv[1:] if argv is None else argv)]))
    return report(results, cfg, env)


def _config_from_json(d: dict[str, Any]) -> dict[str, Any]:
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in {f.name for f in dataclasses.fields(Config)}}
    values["gpt"] = GPTConfig(**d["gpt"])
    if "mode" in d and "modes" not in d:  # results written before --modes
        values["modes"] = (d["mode"],)
    return values


def report(results: list[dict[str, Any]], cfg: Config, env: dict[str, Any]) -> dict[str, Any]:
    """Print and write the JSON, the markdown table and (``cfg.figure``) the figure of ``results``."""
    table = format_table(results, cfg, env)
    lines = verdict(results)
    print(table)
    for line in lines:
        print(line)
    out = {"config": dataclasses.asdict(cfg), "environment": env, "verdict": lines, "results": results, "table": table}
    write_json(cfg.out, out)
    Path(cfg.out).with_suffix(".md").write_text(table + "\n\n" + "\n".join(lines) + "\n")
    written = [cfg.out, str(Path(cfg.out).with_suffix(".md"))]
    if cfg.figure:
        figure(results, cfg, Path(cfg.out).with_suffix(".png"))
        written.append(str(Path(cfg.out).with_suffix(".png")))
    print("wrote " + ", ".join(written))
    return out


if __name__ == "__main__":
    main()
