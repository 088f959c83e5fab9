"""canonreg's monitor beside the libraries that compute related second-order statistics, in one run.

Contenders (each on its own copy of one initialised MLP, the same batch, SGD; cross-entropy):

* ``plain``: forward, backward, ``opt.step()``; the reference of every ratio.
* ``canonreg/<mode>/every1`` and ``/every10``: the same step with :class:`canonreg.CRHMonitor`
  (``preprocess`` raw, centered, normalized) collecting on every step or on every 10th (the per-step
  mean over a window of 10 steps).
* ``backpack/KFAC``, ``/KFLR``, ``/BatchGrad``, ``/SumGradSquared``: the step's backward pass inside
  ``with backpack(extension)`` on an ``extend``-ed model and loss (BackPACK, Dangel et al., ICLR 2020).
* ``curvlinops/KFAC-empirical``: the plain step, then ``KFACLinearOperator(fisher_type="empirical")
  .compute_kronecker_factors()`` on the same batch (its own forward and backward pass, as the library
  works).
* ``opacus/GradSampleModule``: the step through Opacus' per-sample-gradient wrapper.
* ``torch.func/vmap(grad)``: per-sample gradients ``vmap(grad(ℓ_i))`` replace the backward pass; their
  mean is the step's gradient.

What each computes per Linear layer ``h_b = W h_a + b`` (``g_b = −∂ℓ_i/∂h_b`` per sample):

* canonreg: ``H_a = E[h̃_a h̃_aᵀ]``, ``H_b``, ``G_a``, ``G_b`` (exact moments over every sample row;
  raw/centered accumulate ``H_a, G_b`` and get ``H_b = W H_a Wᵀ``, ``G_a = Wᵀ G_b W`` exactly, normalized
  accumulates all four) and, at ``compute()``, ``Z_a = WᵀW``, ``Z_b = WWᵀ`` and the six alignments.
* K-FAC factors: ``A = E[h_a h_aᵀ]`` (the raw ``H_a``) and an output factor ``B``: BackPACK KFAC samples
  one label per input from the model (MC Fisher), KFLR backpropagates the exact GGN's ``C`` columns,
  curvlinops' empirical K-FAC uses the true labels (``B`` = raw ``G_b`` up to scale).
* per-sample gradients (BatchGrad, Opacus, torch.func): ``∇_θ ℓ_i`` for every sample, ``n × |θ|``
  numbers; SumGradSquared: ``Σ_i (∇_θ ℓ_i)²`` (the empirical Fisher's diagonal).

Agreement: on one batch the script compares every output factor with canonreg's raw ``G_b`` of the
same layer (cosine of the matrices; per-sample tools through their per-sample *bias* gradients, which
are ``g_b/n``) and every ``A`` with the raw ``H_a``, so the table shows what is exact and what is sampled.

Timing and memory: ``benchmarks/_harness.py`` (interleaved rounds, rotated order, warm-up, median
ratio per clock; extra memory from the profiler's allocation events, minus the same for ``plain``: the
peak of building the contender and a few steps, the last at a monitor's steady state; what stays held;
the peak of canonreg's ``compute()``). Per-sample contenders
are skipped (with a printed line) when their ``n·|θ|`` float32 gradients would exceed
``--per-sample-max-gib`` or half the available memory.

    python benchmarks/peers.py             # MLP 40→1024×4→10, batch 512, 1 thread (a few minutes)
    python benchmarks/peers.py --quick     # seconds: width 64, batch 32
    python benchmarks/peers.py --width 2048 --batch 256 --threads 2 --rounds 3

Peers are optional (``pip install canonreg[bench]``); an absent one is skipped with a printed line.
Writes ``benchmarks/results/peers.json`` and ``peers.md`` (``peers_quick.*`` with ``--quick``).
Reference: the monitor measures the CRH relations of Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import sys
import time
import warnings
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
    Memory,
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
MODES = ("raw", "centered", "normalized")
PEERS = {"backpack": "backpack", "curvlinops": "curvlinops", "opacus": "opacus"}  # label: import name
COMPUTES = {
    "plain": "∇θL (the step)",
    "canonreg/raw": "H_a, G_b accumulated; H_b, G_a exact by identity; Z_a, Z_b + 6 alignments at compute()",
    "canonreg/centered": "as raw, centred covariances",
    "canonreg/normalized": "H_a, H_b, G_a, G_b of row-normalised vectors accumulated; Z_a, Z_b + 6 alignments at compute()",
    "backpack/KFAC": "A = H_a (raw), B = sampled-label Fisher factor (1 MC sample)",
    "backpack/KFLR": "A = H_a (raw), B = exact GGN factor (C backprops)",
    "backpack/BatchGrad": "per-sample gradients (n × #params)",
    "backpack/SumGradSquared": "Σ_i (∇θ ℓ_i)² (diagonal empirical Fisher)",
    "curvlinops/KFAC-empirical": "A = H_a (raw), B = G_b (raw, true labels); own forward+backward",
    "opacus/GradSampleModule": "per-sample gradients (n × #params)",
    "torch.func/vmap(grad)": "per-sample gradients (n × #params), replacing backward",
}


@dataclass(frozen=True)
class Config:
    width: int = 1024
    hidden: int = 4  # hidden layers of `width` units (hidden + 1 Linear layers)
    d_in: int = 40
    classes: int = 10
    batch: int = 512
    threads: int = 1
    rounds: int = 5
    steps: int = 3  # timed steps per round (every10: a window of 10)
    slow_rounds: int = 2  # rounds for the per-sample contenders (1 timed step each)
    warmup: int = 2
    modes: tuple[str, ...] = MODES
    peers: tuple[str, ...] = ("backpack", "curvlinops", "opacus", "torch.func")
    per_sample_max_gib: float = 8.0
    memory: bool = True
    agreement: bool = True
    seed: int = 0
    out: str = str(RESULTS / "peers.json")


QUICK: dict[str, Any] = dict(width=64, hidden=2, batch=32, rounds=2, steps=1, slow_rounds=1, warmup=1)


def parse(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="width 64, 2 hidden layers, batch 32, 2 rounds (seconds)")
    for name in ("width", "hidden", "d_in", "batch", "threads", "rounds", "steps", "slow_rounds", "warmup", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    p.add_argument("--per-sample-max-gib", dest="per_sample_max_gib", type=float)
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--peers", nargs="*", choices=Config.peers, help="which peer libraries to run (default all installed)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None, help="measure extra peak memory")
    p.add_argument("--agreement", action=argparse.BooleanOptionalAction, default=None, help="compare factors with canonreg's")
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = Config(**given_options(Config, args, QUICK, str(RESULTS / "peers_quick.json")))
    for name in ("width", "hidden", "d_in", "batch", "threads", "rounds", "steps", "slow_rounds"):
        if getattr(cfg, name) < 1:
            p.error(f"Expected `--{name.replace('_', '-')}` to be a positive int, but got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        p.error(f"Expected `--warmup` to be a non-negative int, but got {cfg.warmup}")
    return cfg


def make_mlp(cfg: Config) -> nn.Sequential:
    return mlp(cfg.d_in, cfg.width, cfg.hidden, cfg.classes)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def available(peer: str) -> bool:
    name = PEERS.get(peer)
    return name is None or importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- contenders
class Bench:
    """The base model, batch and the builders of every contender."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.base = make_mlp(cfg)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.x = torch.randn(cfg.batch, cfg.d_in, generator=g)
        self.y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
        self.n_params = sum(p.numel() for p in self.base.parameters())

    def copy(self) -> tuple[nn.Sequential, torch.optim.Optimizer]:
        model = copy.deepcopy(self.base)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3)

    def plain(self) -> Runner:
        model, opt = self.copy()
        return Runner(sgd_step(model, opt, self.x, self.y))

    def canonreg(self, mode: str, every: int) -> Runner:
        model, opt = self.copy()
        monitor = canonreg.CRHMonitor(model, preprocess=mode, every=every).attach()  # type: ignore[arg-type]

        def close() -> dict[str, Any]:
            report = monitor.compute(exponents=False, ranks=False)
            monitor.detach()
            return {"samples": report.samples, "mean_alignment": report.mean_alignment(on_nan="omit")}

        step = sgd_step(model, opt, self.x, self.y)

        return Runner(step, close=close, fold=partial(monitor.compute, exponents=False, ranks=False))

    def backpack(self, extension: str) -> Runner:
        import backpack
        from backpack import extensions

        model, opt = self.copy()
        backpack.extend(model)
        lossfunc = backpack.extend(nn.CrossEntropyLoss())
        ext = getattr(extensions, extension)()

        def step() -> None:
            loss = lossfunc(model(self.x), self.y)
            opt.zero_grad(set_to_none=True)
            with backpack.backpack(ext):
                loss.backward()
            opt.step()

        seen: dict[str, Any] = {"savefield": ext.savefield}

        def release() -> None:  # what the last step produced is recorded, then dropped
            for n, p in model.named_parameters():
                if hasattr(p, ext.savefield):
                    seen[n] = _shapes(getattr(p, ext.savefield))
                    delattr(p, ext.savefield)

        def close() -> dict[str, Any]:
            release()
            return seen

        return Runner(step, release, close)

    def curvlinops(self) -> Runner:
        from curvlinops import KFACLinearOperator

        model, opt = self.copy()
        params = [p for p in model.parameters() if p.requires_grad]
        kfac = KFACLinearOperator(
            model, nn.CrossEntropyLoss(), params, [(self.x, self.y)], fisher_type="empirical", check_deterministic=False
        )

        plain = sgd_step(model, opt, self.x, self.y)

        def step() -> None:
            plain()
            kfac.compute_kronecker_factors()

        def close() -> dict[str, Any]:
            return {"A": {k: list(v.shape) for k, v in kfac._input_covariances.items()},
                    "B": {k: list(v.shape) for k, v in kfac._gradient_covariances.items()}}

        return Runner(step, close=close)

    def opacus(self) -> Runner:
        from opacus import GradSampleModule

        model, opt = self.copy()
        wrapped = GradSampleModule(model)

        def step() -> None:
            loss = F.cross_entropy(wrapped(self.x), self.y)
            wrapped.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seen: dict[str, Any] = {}

        def release() -> None:  # what the last step produced is recorded, then dropped
            for n, p in model.named_parameters():
                if getattr(p, "grad_sample", None) is not None:
                    seen[n] = list(p.grad_sample.shape)  # type: ignore[attr-defined]
            wrapped.zero_grad(set_to_none=True)  # also drops p.grad_sample

        def close() -> dict[str, Any]:
            release()
            wrapped._close()
            return {"grad_sample": seen}

        return Runner(step, release, close)

    def torch_func(self) -> Runner:
        from torch.func import functional_call, grad, vmap

        model, opt = self.copy()
        params = dict(model.named_parameters())
        held: list[dict[str, Tensor]] = []

        def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

        def step() -> None:
            detached = {k: v.detach() for k, v in params.items()}
            grads = per_sample(detached, self.x, self.y)
            for k, v in params.items():
                v.grad = grads[k].mean(0)
            held[:] = [grads]  # the product a user of per-sample gradients consumes (the last step's)
            opt.step()

        seen: dict[str, Any] = {}

        def release() -> None:  # what the last step produced is recorded, then dropped
            if held:
                seen.update({k: list(v.shape) for k, v in held[-1].items()})
            held.clear()

        def close() -> dict[str, Any]:
            release()
            return {"per_sample": seen}

        return Runner(step, release, close)

    def contenders(self) -> list[Contender]:
        cfg = self.cfg
        per_sample_bytes = 4 * cfg.batch * self.n_params
        out = [Contender("plain", COMPUTES["plain"], self.plain, steps=cfg.steps)]
        for mode in cfg.modes:
            for every in (1, 10):
                out.append(Contender(
                    f"canonreg/{mode}/every{every}", COMPUTES[f"canonreg/{mode}"] if every == 1 else "the same, on every 10th step",
                    partial(self.canonreg, mode, every), steps=cfg.steps if every == 1 else 10,
                ))
        slow = dict(steps=1, rounds=cfg.slow_rounds, warmup=min(cfg.warmup, 1))
        too_big = per_sample_bytes > cfg.per_sample_max_gib * 2**30 or per_sample_bytes > 0.5 * available_bytes()
        for peer in cfg.peers:
            if not available(peer):
                print(f"skipped {peer}: not installed (pip install canonreg[bench])")
                continue
            if peer == "backpack":
                for ext in ("KFAC", "KFLR", "SumGradSquared"):
                    out.append(Contender(f"backpack/{ext}", COMPUTES[f"backpack/{ext}"], partial(self.backpack, ext), steps=cfg.steps))
            if peer == "curvlinops":
                out.append(Contender("curvlinops/KFAC-empirical", COMPUTES["curvlinops/KFAC-empirical"], self.curvlinops, steps=cfg.steps))
            per_sample = {"backpack": ("backpack/BatchGrad", partial(self.backpack, "BatchGrad")),
                          "opacus": ("opacus/GradSampleModule", self.opacus),
                          "torch.func": ("torch.func/vmap(grad)", self.torch_func)}
            if peer in per_sample:
                name, build = per_sample[peer]
                if too_big:
                    print(f"skipped {name}: its per-sample gradients need {per_sample_bytes / 2**30:.1f} GiB "
                          f"(limit --per-sample-max-gib {cfg.per_sample_max_gib}, available {available_bytes() / 2**30:.1f} GiB)")
                    continue
                out.append(Contender(name, COMPUTES[name], build, **slow))  # type: ignore[arg-type]
        return out

    # ------------------------------------------------------------------------- agreement
    def agreement(self) -> dict[str, dict[str, float]]:
        """Cosine of each K-FAC factor to canonreg's raw ``H_a`` (``A``) or ``G_b`` (``B``), per Linear layer, one batch.

        Every library sees a fresh copy of the base model and the same batch. The per-sample tools are
        exact by construction and not compared.
        """
        model, _ = self.copy()
        names = linear_names(model)
        monitor = canonreg.CRHMonitor(model, preprocess="raw")
        with monitor:
            F.cross_entropy(model(self.x), self.y).backward()
        report = monitor.compute(exponents=False, ranks=False)
        ours = {n: report.matrices(n) for n in names}
        result: dict[str, dict[str, float]] = {}

        def record(key: str, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
            for layer, (a, b) in factors.items():
                result.setdefault(key, {})[f"A[{layer}]"] = _cosine(a, ours[layer]["H_a"])
                result[key][f"B[{layer}]"] = _cosine(b, ours[layer]["G_b"])

        if "backpack" in self.cfg.peers and available("backpack"):
            import backpack
            from backpack import extensions

            for ext in ("KFAC", "KFLR"):
                m2, _ = self.copy()
                backpack.extend(m2)
                loss = backpack.extend(nn.CrossEntropyLoss())(m2(self.x), self.y)
                with backpack.backpack(getattr(extensions, ext)()):
                    loss.backward()
                # a Linear weight's factors are [B (out × out), A (in × in)]
                record(f"backpack/{ext}", {n: (getattr(m.weight, ext.lower())[1], getattr(m.weight, ext.lower())[0])
                                           for n, m in m2.named_modules() if isinstance(m, nn.Linear)})
        if "curvlinops" in self.cfg.peers and available("curvlinops"):
            from curvlinops import KFACLinearOperator

            m3, _ = self.copy()
            kfac = KFACLinearOperator(m3, nn.CrossEntropyLoss(), list(m3.parameters()), [(self.x, self.y)],
                                      fisher_type="empirical", check_deterministic=False)
            kfac.compute_kronecker_factors()
            record("curvlinops/KFAC-empirical", {n: (kfac._input_covariances[n], kfac._gradient_covariances[n]) for n in names})
        return result


def _shapes(v: Tensor | list[Tensor]) -> list[Any]:
    return [list(t.shape) for t in v] if isinstance(v, list) else list(v.shape)


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))



# ----------------------------------------------------------------------------- run and report
def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    # BackPACK and Opacus hook layers whose inputs need no gradient (the first layer): harmless, said once per call
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    bench = Bench(cfg)
    contenders = bench.contenders()
    load_start = loadavg()
    print(f"MLP {cfg.d_in}→{cfg.width}×{cfg.hidden}→{cfg.classes} ({bench.n_params:,} parameters), batch {cfg.batch}, "
          f"{cfg.threads} thread(s), {len(contenders)} contenders, load {load_start}")
    t0 = time.perf_counter()
    timing = interleaved(contenders, rounds=cfg.rounds, warmup=cfg.warmup)
    load_timing = loadavg()
    memory: dict[str, Memory] = {}
    if cfg.memory:
        for c in contenders:  # every10: steps 1 and 11 collect, so the measured last step is a collected one
            got = memory_of(c, steps=1 if c.rounds is not None else 10 if c.name.endswith("every10") else 2)
            if got is not None:
                memory[c.name] = got
    agreement = bench.agreement() if cfg.agreement else {}
    env = environment()
    env.update(load_start=load_start, load_after_timing=load_timing, load_end=loadavg(), wall_seconds=time.perf_counter() - t0,
               command=" ".join(["python benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)]))
    rows = []
    for c in contenders:
        t = timing[c.name]
        mem, ref = memory.get(c.name), memory.get("plain")
        rows.append({
            "contender": c.name, "computes": c.computes, "timed_steps_per_round": c.steps, "rounds": len(t["rounds"]),
            "seconds_cpu": t["seconds_cpu"], "seconds_wall": t["seconds_wall"],
            "ratio_cpu": t["ratio_cpu"], "ratio_wall": t["ratio_wall"],
            "memory": dataclasses.asdict(mem) if mem else None,
            "extra_peak_bytes": mem.step_peak - ref.step_peak if mem and ref else None,
            "extra_held_bytes": mem.held - ref.held if mem and ref else None,
            "compute_peak_bytes": mem.fold_peak - ref.held if mem and ref and c.name.startswith("canonreg") else None,
            "agreement": agreement.get(c.name), "check": t["check"], "raw": {k: t[k] for k in ("wall", "cpu", "rounds")},
        })
    table = format_table(rows, cfg, bench.n_params, env)
    print(table)
    out = {"config": dataclasses.asdict(cfg), "environment": env, "n_params": bench.n_params, "results": rows, "table": table}
    write_json(cfg.out, out)
    Path(cfg.out).with_suffix(".md").write_text(table + "\n")
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.md')}")
    return out


def _agree(a: dict[str, float] | None, what: str) -> str:
    if not a:
        return "—"
    vals = [v for k, v in a.items() if k.startswith(what)]
    return f"{min(vals):.3f}–{max(vals):.3f}" if vals else "—"


def format_table(rows: list[dict[str, Any]], cfg: Config, n_params: int, env: dict[str, Any]) -> str:
    head = [
        f"`{env['command']}`",
        "",
        f"MLP {cfg.d_in}→{cfg.width}×{cfg.hidden}→{cfg.classes} ({n_params:,} parameters), batch {cfg.batch}, "
        f"{cfg.threads} thread(s), SGD + cross-entropy, torch {env['torch']}, {env['cpu']}.",
        f"Load average (1/5/15 min) at start {env['load_start']}, after timing {env['load_after_timing']}: "
        "measured on a shared, loaded machine.",
        f"Ratios: median over {cfg.rounds} interleaved rounds ({cfg.slow_rounds} for per-sample tools) of "
        "the step's time over the plain step's time in the same round; CPU clock (process time) and wall clock.",
        "Extra memory (torch's CPU allocation events, minus the same for plain): peak while building the contender and "
        "running 2 steps (1 for per-sample tools, 10 for every10) and one more (canonreg: after compute(), at its steady "
        "state); held = still allocated after them; compute() = canonreg's peak during compute().",
        "cos A / cos B: cosine of the contender's K-FAC factors to canonreg's raw H_a / G_b, over the Linear layers (one batch).",
        "",
    ]
    header = ["contender", "computes", "s/step (cpu)", "× plain (cpu)", "× plain (wall)", "extra peak MiB", "held MiB",
              "compute() peak MiB", "cos A", "cos B"]
    body = []
    for r in rows:
        body.append([
            r["contender"], r["computes"], f"{r['seconds_cpu']:.4f}" if r["seconds_cpu"] is not None else "—",
            fmt_ratio(r["ratio_cpu"]), fmt_ratio(r["ratio_wall"]), mib(r["extra_peak_bytes"]), mib(r["extra_held_bytes"]),
            mib(r["compute_peak_bytes"]),
            _agree(r["agreement"], "A"), _agree(r["agreement"], "B"),
        ])
    return "\n".join(head) + "\n" + markdown_table(header, body)


if __name__ == "__main__":
    main()
