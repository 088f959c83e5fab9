"""Robustness recipe: are canonical representations more robust to task-irrelevant transformations?

An MLP on MNIST-1D is trained under the four arms of :mod:`canonreg.experiment` (baseline,
AlignmentLoss, NoiseCalibrated, both; same data, initialisation, batch order and number of steps per
seed), then probed in three ways.

1. **Accuracy drop** ``Δacc(T) = acc(clean) − acc(T)`` (percentage points), on

   * test sets *regenerated* with mnist1d's own generator (``canonreg.data.mnist1d``, seed
     ``test_seed`` ≠ the training seed, normalised with the TRAINING mean and std) with one nuisance
     argument made stronger — ``max_translation`` (shift), ``scale_coeff`` (scale),
     ``iid_noise_scale``, ``corr_noise_scale``, ``shear_scale`` — or all of them at once; ``clean`` is
     the same generator with the default arguments and the same seed;
   * Gaussian input noise ``x + σ ε``, ``ε ~ N(0, I)``, on the clean set (σ in units of the
     normalised input, whose standard deviation is 1);
   * FGSM (Goodfellow, Shlens & Szegedy, arXiv:1412.6572):
     ``x_adv = x + ε · sign(∇_x CE(f(x), y))`` on the clean set, ε swept.

2. **Invariance score** of every hidden representation ``h`` (theory §6, Ziyin et al.,
   arXiv:2410.03006): ``I_T(h) = E‖h(Tx) − h(x)‖² / E‖h(x) − h(x′)‖²`` (0 = invariant, ≈ 1 = the
   transform moves ``h`` as far as replacing the input by another sample), from
   :func:`canonreg.functional.invariance_score`. It needs *pairs*: ``x`` and ``Tx`` must be the same
   underlying sample. The mnist1d generator draws every nuisance of a sample from one RNG stream, so
   two calls with different arguments give unrelated samples. We therefore re-express its
   ``transform`` with the random draws made explicit (:class:`Nuisance`: padding, scale, shift,
   correlated noise, iid noise, shear — drawn per sample in exactly the generator's order, so that
   :func:`render` reproduces ``mnist1d.transform`` bit for bit; the test checks this), and build
   ``Tx`` by *redrawing one factor* from the stronger setting while keeping every other draw
   (template, padding, the other noises) of ``x``. Marginally ``Tx`` follows the generator with that
   one argument overridden — the regenerated test set of part 1 — and ``x``, ``Tx`` differ only in
   the nuisance. Gaussian input noise is applied to ``x`` directly. The score of the input itself
   (``I_T(x)``) is reported as the reference a representation should improve on.

3. The mean CRH alignment ``α`` over layers and relations and its minimum over the inner layers,
   measured after training over the whole training set with the task loss's gradient only
   (:func:`canonreg.measure_crh`), to read robustness against how canonical each arm's
   representations became.

Every arm × seed is one run of the ablation runner (:func:`canonreg.ablate.run_ablation`, ``--workers``
processes): :func:`canonreg.experiment.run_trial` trains it with the loop every recipe and ablation
shares and measures accuracy and α; :func:`measure_run`, this recipe's measurement, probes the trained
model in the same worker (the test sets and pairs are rebuilt there from the config, once per worker).
Finished runs are kept in ``--out``/``runs`` (a second start trains only unfinished runs;
``--no-resume`` trains all again).

Each number is a mean with a 95% Student-t interval over seeds (drops and scores are computed per
seed, then summarised). Run::

    python recipes/robustness.py --quick --out /tmp/robustness     # CI setting, < 1 minute
    python recipes/robustness.py                                     # full: 4 arms × 3 seeds

Outputs in ``--out``: ``results.md`` (tables), ``results.json`` (resolved config, environment,
per-seed records, summaries), ``robustness.png``, ``invariance.png`` and ``runs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    ARM_COLORS,
    ablation_spec,
    check_arms,
    check_seeds,
    config_from_args,
    finished_runs,
    hidden_representations,
    markdown_table,
    recipe_parser,
    trial_config,
)
from torch import Tensor, nn

from canonreg.ablate import run_ablation
from canonreg.data import Split, mnist1d, mnist1d_args
from canonreg.experiment import ARMS, TrainedTrial, load_data
from canonreg.functional import invariance_score
from canonreg.stats import environment, fmt_ci, fmt_diff, mean_half_width, write_json

#: nuisance name → the mnist1d generator argument that sets its strength.
NUISANCES: dict[str, str] = {
    "shift": "max_translation",
    "scale": "scale_coeff",
    "iid_noise": "iid_noise_scale",
    "corr_noise": "corr_noise_scale",
    "shear": "shear_scale",
}


@dataclass(frozen=True)
class RobustnessConfig:
    """The robustness study (defaults: full mode, about 6 CPU-minutes with one thread).

    Training fields have the meaning of :class:`canonreg.experiment.TrialConfig` and are shared by
    all arms. Evaluation: ``test_seed`` (generator seed of every test set; must differ from
    ``data_seed``), ``n_test`` samples per regenerated test set, ``n_pairs`` clean/transformed pairs
    for the invariance score, the stronger generator arguments (mnist1d defaults in brackets:
    ``max_translation`` [48; at most 72, the length the generator shifts within], ``scale_coeff``
    [0.4], ``iid_noise_scale`` [0.02], ``corr_noise_scale`` [0.25], ``shear_scale`` [0.75]),
    ``gauss_sigmas`` and ``fgsm_eps`` (normalised input units). ``loss_weight``: the λ of the loss arms
    (None: each arm's default, 0.1 for ``loss``/``both``, the :func:`canonreg.crh_loss` preset's for
    ``crh``). ``workers``: runner processes (0 = in this process; every run trains with one thread, the
    numbers do not depend on it); ``resume``: keep finished runs of ``out/runs``; ``threads``: torch
    threads of this process (0 = keep).
    """

    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 5000
    data_seed: int = 42
    width: int = 128
    depth: int = 4
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    noise: float | str = "auto"
    loss_weight: float | None = None
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    batch_size: int = 128
    steps: int = 2000
    eval_every: int = 200
    monitor_every: int = 5
    preprocess: str = "normalized"
    metric: str = "pearson"
    test_seed: int = 1234
    n_test: int = 2000
    n_pairs: int = 1000
    max_translation: int = 72
    scale_coeff: float = 1.2
    iid_noise_scale: float = 0.1
    corr_noise_scale: float = 0.5
    shear_scale: float = 2.5
    gauss_sigmas: tuple[float, ...] = (0.25, 0.5)
    fgsm_eps: tuple[float, ...] = (0.02, 0.05, 0.1)
    workers: int = 2
    resume: bool = True
    threads: int = 1
    out: str = "results/robustness"
    quick: bool = False

    def __post_init__(self) -> None:
        check_arms(self.arms)
        check_seeds(self.seeds)
        if self.test_seed == self.data_seed:
            raise ValueError(f"Expected `test_seed` to differ from `data_seed` ({self.data_seed}), but got {self.test_seed}")
        for name in ("n_test", "n_pairs"):
            if getattr(self, name) < 10:
                raise ValueError(f"Expected `{name}` to be an int >= 10, but got {getattr(self, name)!r}")
        length = _shift_length()
        if not 1 <= self.max_translation <= length:
            raise ValueError(f"Expected `max_translation` in [1, {length}], but got {self.max_translation!r}")
        for name in ("scale_coeff", "iid_noise_scale", "corr_noise_scale", "shear_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"Expected `{name}` to be a non-negative float, but got {getattr(self, name)!r}")
        for name in ("gauss_sigmas", "fgsm_eps"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"Expected `{name}` to hold positive floats, but got {getattr(self, name)!r}")
        if self.threads < 0 or self.workers < 0:
            raise ValueError(f"Expected `threads` and `workers` to be non-negative ints, but got {self.threads!r}, {self.workers!r}")
        trial_config(self, self.arms[0], self.seeds[0])  # validates the training fields early

    def strong_args(self) -> dict[str, float | int]:
        """``{mnist1d argument: stronger value}`` of every nuisance."""
        return {arg: getattr(self, arg) for arg in NUISANCES.values()}


#: ``--quick``: the CI setting (< 1 minute).
QUICK: dict[str, Any] = dict(
    seeds=(0, 1), num_samples=2000, width=64, steps=100, eval_every=50, n_test=400, n_pairs=200,
    gauss_sigmas=(0.5,), fgsm_eps=(0.05,), out="results/robustness-quick",
)  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> RobustnessConfig:
    p = recipe_parser(__doc__, arms=ARMS, mlp=True)
    p.add_argument("--n-test", type=int)
    p.add_argument("--n-pairs", type=int)
    p.add_argument("--gauss-sigmas", nargs="+", type=float)
    p.add_argument("--fgsm-eps", nargs="+", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction)
    return config_from_args(RobustnessConfig, p, argv, QUICK)


# ---------------------------------------------------------------------- paired nuisances
def _shift_length() -> int:
    """Length of the signal mnist1d shifts (``template_len + padding[1]``, 72 by default)."""
    a = mnist1d_args()
    return int(a["template_len"]) + int(a["padding"][1])  # type: ignore[index, call-overload]


@dataclass(frozen=True)
class Nuisance:
    """The random draws mnist1d's ``transform`` makes for ``n`` samples, made explicit.

    Attributes (per sample): ``label``; ``pad`` zeros appended to the template; ``u_scale`` ∈ [0, 1)
    (amplitude ``1 + scale_coeff·(u − ½)``); ``shift`` (circular shift, ``< max_translation``);
    ``z_corr`` and ``z_iid``, standard normal ``(n, L)`` (correlated noise
    ``gaussian_filter(corr_noise_scale·z, 2)`` where the signal is zero; iid noise
    ``iid_noise_scale·z``); ``u_shear`` ∈ [0, 1) (slope ``shear_scale·(u − ½)``).
    """

    label: np.ndarray
    pad: np.ndarray
    u_scale: np.ndarray
    shift: np.ndarray
    z_corr: np.ndarray
    z_iid: np.ndarray
    u_shear: np.ndarray


def draw_nuisance(labels: np.ndarray, rng: np.random.RandomState, args: dict[str, Any]) -> Nuisance:
    """Draw every sample's nuisances in the order of ``mnist1d.transform.transform``.

    Per sample: ``pad = lo + ⌊U·(hi − lo + 1)⌋``, ``u_scale = U``, ``shift = choice(max_translation)``,
    ``z_corr = N(0, I_L)``, ``z_iid = N(0, I_L)``, ``u_shear = U`` — so ``np.random.seed(s)`` followed
    by ``transform`` and ``RandomState(s)`` followed by this function give the same sample.
    """
    lo, hi = args["padding"]
    length = int(args["template_len"]) + int(hi)
    n = len(labels)
    pad, shift = np.empty(n, np.int64), np.empty(n, np.int64)
    u_scale, u_shear = np.empty(n), np.empty(n)
    z_corr, z_iid = np.empty((n, length)), np.empty((n, length))
    for i in range(n):
        pad[i] = lo + int(rng.rand() * (hi - lo + 1))
        u_scale[i] = rng.rand()
        shift[i] = rng.choice(int(args["max_translation"]))
        z_corr[i] = rng.randn(length)
        z_iid[i] = rng.randn(length)
        u_shear[i] = rng.rand()
    return Nuisance(np.asarray(labels, np.int64), pad, u_scale, shift, z_corr, z_iid, u_shear)


def redraw(nu: Nuisance, factor: str, rng: np.random.RandomState, args: dict[str, Any]) -> Nuisance:
    """``nu`` with the draws of one nuisance ``factor`` (a key of :data:`NUISANCES`) replaced by
    fresh ones for the generator arguments ``args``; every other draw is kept."""
    n, length = nu.z_iid.shape
    if factor == "shift":
        return dataclasses.replace(nu, shift=rng.randint(0, int(args["max_translation"]), size=n))
    if factor == "scale":
        return dataclasses.replace(nu, u_scale=rng.rand(n))
    if factor == "iid_noise":
        return dataclasses.replace(nu, z_iid=rng.randn(n, length))
    if factor == "corr_noise":
        return dataclasses.replace(nu, z_corr=rng.randn(n, length))
    if factor == "shear":
        return dataclasses.replace(nu, u_shear=rng.rand(n))
    raise ValueError(f"Expected `factor` to be one of {list(NUISANCES)}, but got {factor!r}")


def render(nu: Nuisance, args: dict[str, Any]) -> np.ndarray:
    """The mnist1d signals of the draws ``nu`` under generator arguments ``args`` (unnormalised).

    Per sample, as ``mnist1d.transform.transform``: template ``+ 1e-8``, append ``pad`` zeros,
    linearly resample to ``L``, multiply by ``1 + scale_coeff·(u_scale − ½)``, shift circularly by
    ``shift``, put ``gaussian_filter(corr_noise_scale·z_corr, 2)`` where the signal is exactly 0, add
    ``iid_noise_scale·z_iid``, subtract ``shear_scale·(u_shear − ½)·linspace(−½, ½, L)``, resample
    to ``final_seq_length``.

    Returns:
        ``(n, final_seq_length)`` float64 array.
    """
    from mnist1d.data import get_templates
    from scipy.ndimage import gaussian_filter1d

    templates = get_templates()["x"]
    length = int(args["template_len"]) + int(args["padding"][1])
    grid = np.linspace(0.0, 1.0, length)
    final = np.linspace(0.0, 1.0, int(args["final_seq_length"]))
    ramp = np.linspace(-0.5, 0.5, length)
    out = np.empty((len(nu.label), len(final)))
    for i in range(len(nu.label)):
        x = np.concatenate([templates[nu.label[i]] + 1e-8, np.zeros(nu.pad[i])])
        x = np.interp(grid, np.linspace(0.0, 1.0, len(x)), x)
        x = x * (1 + args["scale_coeff"] * (nu.u_scale[i] - 0.5))
        x = np.roll(x, nu.shift[i])
        mask = x != 0
        x = mask * x + (1 - mask) * gaussian_filter1d(args["corr_noise_scale"] * nu.z_corr[i], 2)
        x = x + args["iid_noise_scale"] * nu.z_iid[i]
        x = x - args["shear_scale"] * (nu.u_shear[i] - 0.5) * ramp
        out[i] = np.interp(final, grid, x)
    return out


def paired_sets(cfg: RobustnessConfig, mean: float, std: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Clean inputs ``x`` (default generator arguments, seed ``test_seed``), labels, and for every
    transform ``T`` the paired ``Tx`` (normalised with the training ``mean``, ``std``).

    Transforms: each nuisance redrawn at its stronger setting, all of them (``"all"``), and
    Gaussian input noise ``x + σε`` for every σ (``"gauss σ"``).
    """
    base = mnist1d_args()
    strong = {**base, **cfg.strong_args()}
    rng = np.random.RandomState(cfg.test_seed)
    nu = draw_nuisance(np.arange(cfg.n_pairs) % 10, rng, base)

    def norm(a: np.ndarray) -> Tensor:
        return torch.as_tensor((a - mean) / std, dtype=torch.float32)

    x = norm(render(nu, base))
    pairs: dict[str, Tensor] = {}
    nu_all = nu
    for k, (factor, arg) in enumerate(NUISANCES.items()):
        one = {**base, arg: strong[arg]}  # only this factor's argument is stronger
        pairs[factor] = norm(render(redraw(nu, factor, np.random.RandomState([cfg.test_seed, k + 1]), one), one))
        nu_all = redraw(nu_all, factor, np.random.RandomState([cfg.test_seed, k + 1]), strong)
    pairs["all"] = norm(render(nu_all, strong))
    gen = torch.Generator().manual_seed(cfg.test_seed)
    for sigma in cfg.gauss_sigmas:
        pairs[f"gauss {sigma:g}"] = x + sigma * torch.randn(x.shape, generator=gen)
    return x, torch.as_tensor(nu.label), pairs


# ---------------------------------------------------------------------- attacks and accuracy
def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method: ``x + ε · sign(∇_x CE(f(x), y))`` (arXiv:1412.6572).

    The sign makes the reduction of the loss (mean or sum over the batch) irrelevant; inputs are not
    clipped (the normalised mnist1d inputs are unbounded). The model's parameters get no gradient.
    Works inside ``torch.no_grad()``.
    """
    x_req = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # also inside a caller's no_grad block
        loss = F.cross_entropy(model(x_req), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_req)
    return (x + eps * grad.sign()).detach()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return float((model(x).argmax(1) == y).double().mean())


def test_sets(cfg: RobustnessConfig, mean: float, std: float) -> dict[str, tuple[Tensor, Tensor]]:
    """``{condition: (x, y)}``: the clean and the stronger regenerated mnist1d test sets (all samples
    of ``canonreg.data.mnist1d(n_test, seed=test_seed, normalize_with=(mean, std), **overrides)``)."""
    overrides: dict[str, dict[str, Any]] = {"clean": {}}
    overrides.update({name: {arg: getattr(cfg, arg)} for name, arg in NUISANCES.items()})
    overrides["all"] = cfg.strong_args()
    out = {}
    for name, kw in overrides.items():
        s = mnist1d(num_samples=cfg.n_test, seed=cfg.test_seed, normalize_with=(mean, std), **kw)
        out[name] = (torch.cat([s.x, s.x_test]), torch.cat([s.y, s.y_test]))
    return out


def evaluate(
    model: nn.Module,
    cfg: RobustnessConfig,
    sets: dict[str, tuple[Tensor, Tensor]],
    pairs: tuple[Tensor, Tensor, dict[str, Tensor]],
) -> dict[str, Any]:
    """Accuracies, accuracy drops (percentage points) and invariance scores of one trained model."""
    x0, y0 = sets["clean"]
    acc = {name: accuracy(model, x, y) for name, (x, y) in sets.items()}
    gen = torch.Generator().manual_seed(cfg.test_seed)
    for sigma in cfg.gauss_sigmas:
        acc[f"gauss {sigma:g}"] = accuracy(model, x0 + sigma * torch.randn(x0.shape, generator=gen), y0)
    for eps in cfg.fgsm_eps:
        acc[f"fgsm {eps:g}"] = accuracy(model, fgsm(model, x0, y0, eps), y0)
    drop = {name: 100.0 * (acc["clean"] - a) for name, a in acc.items() if name != "clean"}
    xp, _, transformed = pairs
    h = hidden_representations(model, xp, logits=True)
    inv: dict[str, dict[str, float]] = {}
    for name, tx in transformed.items():
        ht = hidden_representations(model, tx, logits=True)
        inv[name] = {layer: invariance_score(h[layer], ht[layer]) for layer in h}
    return {"acc": acc, "drop": drop, "invariance": inv}


#: The config fields the probes read: the runner's ``measure_args`` (see :func:`measure_run`).
PROBE_FIELDS: tuple[str, ...] = ("test_seed", "n_test", "n_pairs", *NUISANCES.values(), "gauss_sigmas", "fgsm_eps")


def measure_run(trained: TrainedTrial, split: Split, **probe: Any) -> dict[str, Any]:
    """The runner's measurement of one trained arm, in its worker: :func:`evaluate` on the test sets and
    pairs of the :data:`PROBE_FIELDS` ``probe`` (in the training normalisation of ``split``), and the
    clean test accuracy."""
    cfg = RobustnessConfig(data_seed=trained.config.data_seed, **{k: tuple(v) if isinstance(v, list) else v for k, v in probe.items()})
    sets, pairs = _probe_data(cfg, split.mean, split.std)
    return {"test_acc": accuracy(trained.model, split.x_test, split.y_test), **evaluate(trained.model, cfg, sets, pairs)}


@functools.lru_cache(maxsize=2)
def _probe_data(cfg: RobustnessConfig, mean: float, std: float) -> tuple[dict[str, tuple[Tensor, Tensor]], tuple[Tensor, Tensor, dict[str, Tensor]]]:
    """:func:`test_sets` and :func:`paired_sets`, built once per worker process."""
    return test_sets(cfg, mean, std), paired_sets(cfg, mean, std)


# ---------------------------------------------------------------------- the study
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    t_start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # Data: the training split, the regenerated test sets and the invariance pairs, all in the
    # training normalisation (built here for the input's own invariance and the disk cache the workers read).
    split = load_data(trial_config(cfg, cfg.arms[0], cfg.seeds[0]))
    _, pairs = _probe_data(cfg, split.mean, split.std)
    input_inv = {name: invariance_score(pairs[0], tx) for name, tx in pairs[2].items()}
    print(f"data: {split.x.shape[0]} train samples; {cfg.n_test} per test set; {cfg.n_pairs} pairs "
          f"(input invariance: {', '.join(f'{k} {v:.2f}' for k, v in input_inv.items())})", flush=True)  # fmt: skip

    # Every arm × seed: trained by run_trial (same data, initialisation and batch order per seed in every
    # arm), then probed by measure_run in the same worker.
    done = run_ablation(
        ablation_spec("robustness", cfg), out=out / "runs", resume=cfg.resume, progress=False, plots=False,
        measure="robustness:measure_run", measure_args={k: getattr(cfg, k) for k in PROBE_FIELDS},
    )  # fmt: skip
    records: list[dict[str, Any]] = []
    for trial, res, ev in finished_runs(done):
        records.append({
            "arm": trial.arm, "seed": trial.seed, "test_acc": ev.pop("test_acc"), "mean_alpha": res["mean_alpha"],
            "min_alpha_inner": res["min_alpha_inner"], "train_loss": res["window_train_loss"], "train_seconds": res["train_time_s"], **ev,
        })  # fmt: skip
        print(f"  {trial.arm:<8} seed={trial.seed}  α={res['mean_alpha']:.3f}  min α inner={res['min_alpha_inner']:.3f}  "
              f"clean={ev['acc']['clean']:.3f}  all={ev['acc']['all']:.3f}  ({res['train_time_s']:.1f}s)", flush=True)  # fmt: skip

    # Tables, JSON (with the resolved configs and the environment) and the figures.
    summary = summarise(records, cfg, input_inv)
    md = tables(summary, cfg)
    (out / "results.md").write_text(md + "\n")
    write_json(out / "results.json", {
        "recipe": "robustness", "config": dataclasses.asdict(cfg), "trial_config": trial_config(cfg, "both", cfg.seeds[0]).resolved().to_dict(),
        "mnist1d_default_args": mnist1d_args(), "environment": environment(), "input_invariance": input_inv,
        "summary": summary, "records": records, "wall_time_s": time.perf_counter() - t_start,
    })  # fmt: skip
    plot(summary, cfg, out)
    print(md)
    print(f"\nwrote {out}/results.md, results.json, robustness.png, invariance.png in {time.perf_counter() - t_start:.0f}s")
    return {"summary": summary, "records": records}


# ---------------------------------------------------------------------- tables and figures
def summarise(records: list[dict[str, Any]], cfg: RobustnessConfig, input_inv: dict[str, float]) -> dict[str, Any]:
    """Per arm: mean and 95% half-width over seeds of every accuracy, drop and invariance score."""
    s: dict[str, Any] = {"input_invariance": input_inv, "arms": {}}
    for arm in cfg.arms:
        rs = [r for r in records if r["arm"] == arm]
        entry: dict[str, Any] = {}
        for key in ("test_acc", "mean_alpha", "min_alpha_inner"):
            entry[key] = mean_half_width([r[key] for r in rs])
        entry["acc"] = {c: mean_half_width([r["acc"][c] for r in rs]) for c in rs[0]["acc"]}
        entry["drop"] = {c: mean_half_width([r["drop"][c] for r in rs]) for c in rs[0]["drop"]}
        entry["invariance"] = {
            t: {layer: mean_half_width([r["invariance"][t][layer] for r in rs]) for layer in rs[0]["invariance"][t]}
            for t in rs[0]["invariance"]
        }
        entry["values"] = {
            "test_acc": [r["test_acc"] for r in rs],
            "mean_alpha": [r["mean_alpha"] for r in rs],
            "min_alpha_inner": [r["min_alpha_inner"] for r in rs],
            "acc": {c: [r["acc"][c] for r in rs] for c in rs[0]["acc"]},
            "drop": {c: [r["drop"][c] for r in rs] for c in rs[0]["drop"]},
            "invariance": {t: {la: [r["invariance"][t][la] for r in rs] for la in v} for t, v in rs[0]["invariance"].items()},
        }
        s["arms"][arm] = entry
    return s


def tables(summary: dict[str, Any], cfg: RobustnessConfig) -> str:
    """The Markdown report: accuracy drops, invariance at the last hidden layer, per-layer invariance."""
    arms = list(summary["arms"])
    v = {a: summary["arms"][a]["values"] for a in arms}
    drops = list(v[arms[0]]["drop"])
    transforms = list(v[arms[0]]["invariance"])
    layers = list(v[arms[0]]["invariance"][transforms[0]])
    last_hidden = [la for la in layers if la.startswith("h")][-1]
    n = len(cfg.seeds)
    strong = ", ".join(f"{k}={val}" for k, val in cfg.strong_args().items())
    parts = [
        "# Robustness: the arms on MNIST-1D",
        "",
        f"MLP width {cfg.width}, depth {cfg.depth}; {cfg.optimizer} lr={cfg.lr} momentum={cfg.momentum} "
        f"weight_decay={cfg.weight_decay}; {cfg.steps} steps of batch {cfg.batch_size} in every arm; "
        f"noise={cfg.noise}, loss_weight={trial_config(cfg, 'loss', cfg.seeds[0]).resolved().loss_weight:g}, relations={list(cfg.relations)} (loss/both arms); "
        f"crh arm: canonreg.crh_loss preset at λ={trial_config(cfg, 'crh', cfg.seeds[0]).resolved().loss_weight:g}. "
        f"Mean ± 95% t-interval over {n} seeds {list(cfg.seeds)}. α ({cfg.metric}, {cfg.preprocess}): after training, "
        "whole training set, task-loss gradient only; min α inner: minimum over the six relations and the inner layers.",
        f"Test sets: mnist1d generator, seed {cfg.test_seed}, {cfg.n_test} samples each, normalised with the "
        f"training statistics; stronger arguments: {strong}.",
        "",
        "## Accuracy and accuracy drop (percentage points, clean − transformed; lower = more robust)",
        "",
        markdown_table(
            ["arm", "test acc", "clean acc", "mean α", "min α inner", *drops],
            [
                [a, fmt_ci(v[a]["test_acc"]), fmt_ci(v[a]["acc"]["clean"]), fmt_ci(v[a]["mean_alpha"]), fmt_ci(v[a]["min_alpha_inner"]),
                 *(fmt_ci(v[a]["drop"][c], 1) for c in drops)]
                for a in arms
            ],
        ),  # fmt: skip
        "",
        f"## Invariance score at the last hidden layer ({last_hidden}; 0 = invariant, lower = more invariant)",
        "",
        "`E‖h(Tx) − h(x)‖² / E‖h(x) − h(x′)‖²` on paired samples (Tx: the same sample with one nuisance "
        "redrawn at the stronger setting, or Gaussian noise added). The `input` row is the score of x itself.",
        "",
        markdown_table(
            ["arm", *transforms],
            [["input", *(f"{summary['input_invariance'][t]:.3f}" for t in transforms)]]
            + [[a, *(fmt_ci(v[a]["invariance"][t][last_hidden]) for t in transforms)] for a in arms],
        ),
        "",
        "## Invariance score per layer",
        "",
        markdown_table(
            ["arm", "layer", *transforms],
            [[a, la, *(fmt_ci(v[a]["invariance"][t][la]) for t in transforms)] for a in arms for la in layers],
        ),
    ]
    if "baseline" in arms and len(arms) > 1:
        base = v["baseline"]
        others = [a for a in arms if a != "baseline"]
        parts += [
            "",
            "## Difference to the baseline, paired by seed (arm − baseline; * = 95% interval excludes 0)",
            "",
            "Accuracy drop (pp; negative = more robust than the baseline):",
            "",
            markdown_table(
                ["arm", "Δ clean acc", *drops],
                [[a, fmt_diff(v[a]["acc"]["clean"], base["acc"]["clean"]), *(fmt_diff(v[a]["drop"][c], base["drop"][c], 1) for c in drops)] for a in others],
            ),
            "",
            f"Invariance score at {last_hidden} (negative = more invariant than the baseline):",
            "",
            markdown_table(
                ["arm", *transforms],
                [[a, *(fmt_diff(v[a]["invariance"][t][last_hidden], base["invariance"][t][last_hidden]) for t in transforms)] for a in others],
            ),
        ]
    return "\n".join(parts)


def plot(summary: dict[str, Any], cfg: RobustnessConfig, out: Path) -> None:
    """``robustness.png``: drops per condition and FGSM accuracy per arm; ``invariance.png``: the
    invariance score against depth, one panel per transform (error bars: 95% intervals over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    first = summary["arms"][arms[0]]
    conds = [c for c in first["drop"] if not c.startswith("fgsm")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(arms)
    for i, a in enumerate(arms):
        m, h = zip(*(summary["arms"][a]["drop"][c] for c in conds))
        ax1.bar(np.arange(len(conds)) + (i - (len(arms) - 1) / 2) * width, m, width, yerr=_err(h), label=a,
                color=ARM_COLORS[a], capsize=2)  # fmt: skip
    ax1.set_xticks(range(len(conds)), conds, rotation=20)
    ax1.set_ylabel("accuracy drop (pp)")
    ax1.set_title("clean − transformed accuracy")
    ax1.axhline(0, color="k", lw=0.5)
    ax1.legend()
    eps = [0.0, *cfg.fgsm_eps]
    for a in arms:
        acc = summary["arms"][a]["acc"]
        m, h = zip(*([acc["clean"]] + [acc[f"fgsm {e:g}"] for e in cfg.fgsm_eps]))
        ax2.errorbar(eps, m, yerr=_err(h), marker="o", label=a, color=ARM_COLORS[a], capsize=3)
    ax2.set_xlabel("FGSM ε (normalised input units)")
    ax2.set_ylabel("accuracy")
    ax2.set_title("FGSM")
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=120)
    plt.close(fig)

    transforms = list(first["invariance"])
    layers = list(first["invariance"][transforms[0]])
    cols = min(4, len(transforms))
    rows = -(-len(transforms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False, sharex=True)
    xs = np.arange(len(layers) + 1)
    for ax, t in zip(axes.flat, transforms):
        ax.axhline(summary["input_invariance"][t], color="k", ls=":", lw=1, label="input")
        for i, a in enumerate(arms):
            m, h = zip(*(summary["arms"][a]["invariance"][t][la] for la in layers))
            shift = 0.06 * (i - (len(arms) - 1) / 2)
            ax.errorbar(xs[1:] + shift, m, yerr=_err(h), marker="o", ms=3, color=ARM_COLORS[a], label=a, capsize=2)
        ax.set_title(t)
        ax.set_xticks(xs[1:], layers)
    for ax in axes.flat[len(transforms):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("invariance score")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("E‖h(Tx) − h(x)‖² / E‖h(x) − h(x′)‖² per layer (lower = more invariant)")
    fig.tight_layout()
    fig.savefig(out / "invariance.png", dpi=120)
    plt.close(fig)


def _err(half: tuple[float, ...]) -> list[float] | None:
    """Error-bar half-widths (None when there is a single seed)."""
    return None if any(np.isnan(half)) else list(half)


if __name__ == "__main__":
    main()
