"""One trial of a CRH ablation: the four method arms, defined once, trained and measured the same way.

The four arms (issue 5) differ only in how the training step is built from one base optimizer:

=========  ===================================================================================
arm        training step
=========  ===================================================================================
baseline   ``opt`` = SGD / Adam / AdamW with weight decay γ on weight matrices and kernels (coupled
           for SGD and Adam, i.e. ``γW`` is added to the gradient; decoupled ``W ← (1 − ηγ)W`` for
           AdamW); biases never decay, in any arm
loss       baseline step on ``task_loss + AlignmentLoss(relations, weight=loss_weight)``
noise      ``NoiseCalibrated(opt₀, model, weight_decay=γ, noise=noise)`` where ``opt₀`` is the same
           base optimizer without decay: the wrapper applies γ itself (decoupled, with the long-run
           strength of SGD's coupled γ; AdamW-style for Adam) and injects SGD-shaped gradient noise
           of strength ``noise`` (σ in units of SGD's own noise; ``"auto"`` = calibrated per layer)
both       the ``noise`` step on the ``loss`` objective
crh        baseline step on ``task_loss + crh_loss(model, weight=loss_weight)(task_loss)``: the joint
           CRH objective of :func:`canonreg.losses.crh_loss` (all six relations; ``relations`` and
           ``loss_metric`` do not apply)
=========  ===================================================================================

**Same budget.** Every arm of one grid cell sees the same data, the same initial weights (the model
is built from ``seed`` before any arm object exists), the same batch order (a generator seeded with
``seed`` and used for nothing else), the same number of optimizer ``steps`` and the same
``batch_size``: the budget is samples seen, ``steps · batch_size``, not wall time (the ``loss`` arm
costs more per step; ``wall_time_s`` records it). Factors that do not act in an arm are resolved to
their neutral value by :meth:`TrialConfig.resolved` (``noise = 0`` without the wrapper;
``loss_weight = 0`` and ``relations = ()`` without the loss), so a grid never runs one trial twice.

**What is measured** (all in the returned dict, JSON-ready):

* accuracy and cross-entropy on the train and test splits;
* the six relations ``α`` per weight layer (theory §2–§3) **after training, over the whole
  training set, with the task loss's gradient only** (:func:`canonreg.measure_crh`), their mean,
  their minimum over the inner layers (``min_alpha_inner``: every weight layer but the first, whose
  input is the data, and the last, the head), PAH exponents with intervals (theory §4);
* from the training-time :class:`~canonreg.CRHMonitor` over the last ``eval_every`` steps: the SGD
  balance terms of theory §5 (η taken as ``lr / (1 − momentum)`` for SGD with momentum) and
  ``window_alpha`` (in the loss arms its ``G`` contains the regulariser's own gradient, so it is
  never reported as an effect);
* the window mean ``α`` after every window of ``eval_every`` steps and the first step where it reaches
  ``alpha_threshold`` (``steps_to_alpha``; None if never); with ``track_crh=True`` also the
  post-hoc task-only ``min_alpha_inner`` / ``mean_alpha_post`` after every window;
* compactness on the test split (theory §6): for the input ``h`` of every weight layer after the first
  (the hidden representations), the participation ratio ``(Tr C)² / Tr C²`` and the number of
  principal components for 95% of the variance of the covariance ``C = Cov(h)``; NC1
  ``Tr(Σ_W Σ_B⁺)/C`` of the penultimate representation (the input of the last layer) on both splits;
* the optimizer's own balance measurement (``NoiseCalibrated.balance``) in the noise arms.

In the loss arms the training monitor's ``g = −dℓ/dh`` is the gradient that reaches the layer, i.e. of
the total objective (task + alignment loss); that is why the reported α comes from the separate
post-training measurement. The loss uses the monitor's ``preprocess``.

:func:`train_trial` is the shared loop (it returns the trained model, for recipes that evaluate it
their own way); :func:`run_trial` = :func:`train_trial` + :func:`evaluate` + the report's numbers.

References: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (CRH/PAH); Ziyin, Wang, Li & Wu,
arXiv:2402.07193 (noise equilibrium).

Example:
    >>> from canonreg.experiment import TrialConfig, run_trial
    >>> result = run_trial(TrialConfig(arm="baseline", steps=200, eval_every=100, seed=0))  # doctest: +SKIP
    >>> result["test_acc"], result["mean_alpha"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as CF
from .errors import check_choice
from .layers import layer_roles, select_layers
from .measure import measure_crh, min_alignment
from .stats import jsonable, progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from .data import Split
    from .losses import AlignmentLoss
    from .report import CRHReport

__all__ = [
    "ARMS",
    "batch_indices",
    "optimizer_step",
    "DATASETS",
    "MODELS",
    "OPTIMIZERS",
    "TrialConfig",
    "TrialEvent",
    "TrainedTrial",
    "load_data",
    "build_model",
    "make_arm",
    "train_trial",
    "evaluate",
    "run_trial",
    "scalar_metrics",
    "STATIC_METRICS",
    "LAYER_METRIC_PREFIXES",
    "config_id",
    "trial_defaults",
]

ARMS: tuple[str, ...] = ("baseline", "loss", "noise", "both", "crh")
DATASETS: tuple[str, ...] = ("mnist1d", "digits")
MODELS: tuple[str, ...] = ("mlp", "resmlp", "cnn1d")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
LOSS_ARMS: frozenset[str] = frozenset({"loss", "both", "crh"})
NOISE_ARMS: frozenset[str] = frozenset({"noise", "both"})

# (features, classes) of the built-in datasets (mnist1d with its default final_seq_length).
_SHAPES: dict[str, tuple[int, int]] = {"mnist1d": (40, 10), "digits": (64, 10)}

_RESULT_VERSION = 2  # bump when the meaning of a config field or a metric changes (changes run ids)


@dataclass(frozen=True)
class TrialConfig:
    """Every factor of one ablation trial (a frozen, validated, JSON-able record).

    Attributes:
        arm: ``"baseline" | "loss" | "noise" | "both" | "crh"`` (module docstring).
        dataset: ``"mnist1d"`` (generated locally, cached) or ``"digits"`` (scikit-learn's 8×8).
        num_samples: mnist1d samples in total (train + test, 80/20); ignored for digits.
        data_seed: seed of the dataset generation/split; fixed across trials by default so that
            ``seed`` varies only the initialisation, the batch order and the injected noise.
        model: ``"mlp"`` (``depth`` Linear layers), ``"resmlp"`` (input Linear, ``depth − 2``
            residual blocks, output Linear) or ``"cnn1d"`` (``depth − 1`` Conv1d layers of ``width``
            channels, global average pool, Linear head). ``depth`` counts weight layers in all three.
        width, depth: hidden width (channels for cnn1d) and number of weight layers.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"`` (default betas).
        lr: learning rate η. momentum: SGD momentum β in [0, 1) (unused by Adam/AdamW).
        weight_decay: γ >= 0 on weight matrices and kernels, never biases (coupled for SGD/Adam,
            decoupled for AdamW; applied by the wrapper in the noise arms).
        noise: injected-noise strength of ``NoiseCalibrated``: a float >= 0 or ``"auto"``.
        loss_weight: weight λ of the alignment loss (``task + λ·align``), >= 0; None (default) = the
            arm's own default: 0.1 in the ``loss``/``both`` arms, the preset's
            (``canonreg.losses.CRH_PRESET["weight"]``) in the ``crh`` arm.
        relations: relations the alignment loss pushes toward (names from ``canonreg.RELATIONS``).
        loss_metric: the alignment loss's score, ``"cosine"`` or ``"pearson"``.
        batch_size: S, the same in every arm. steps: optimizer steps, the same in every arm.
        seed: seed of initialisation, batch order and noise.
        preprocess, metric: the monitor's measurement protocol (theory §3).
        eval_every: monitor window in steps; α is measured over each window and the final
            metrics over the last one (windows are aligned to end at ``steps``).
        monitor_every: the monitor collects every ``monitor_every``-th step of a window (1 = all;
            larger values cut its overhead, the training is the same).
        monitor_windows: ``"all"`` (the monitor is attached throughout and measures every window) or
            ``"last"`` (attached for the last ``eval_every`` steps only: ``history``,
            ``steps_to_alpha`` and ``track_crh`` see that window alone; the cheap setting when only
            the final window is wanted, the training is the same).
        alpha_threshold: mean α defining ``steps_to_alpha``.
        n_bootstrap: bootstrap resamples of the PAH exponent intervals (0 = none).
        track_crh: also measure the task-only α over the training set after every window (one
            forward/backward pass over the training set each time; the training is unchanged).

    Raises:
        TypeError / ValueError naming the field, for a wrong type or a bad value.
    """

    # the arm and the data
    arm: str = "baseline"
    dataset: str = "mnist1d"
    num_samples: int = 5000
    data_seed: int = 42
    # the model
    model: str = "mlp"
    width: int = 128
    depth: int = 4
    # the optimizer
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # the arm's strengths
    noise: float | str = "auto"
    loss_weight: float | None = None
    relations: tuple[str, ...] = ("f-RWA", "b-RWA")
    loss_metric: str = "cosine"
    # the loop
    batch_size: int = 128
    steps: int = 1000
    seed: int = 0
    # the monitor
    preprocess: str = "normalized"
    metric: str = "pearson"
    eval_every: int = 100
    monitor_every: int = 1
    monitor_windows: str = "all"
    # results
    alpha_threshold: float = 0.5
    n_bootstrap: int = 100
    track_crh: bool = False

    def __post_init__(self) -> None:
        self._check_strings_and_ints()
        self._check_numbers()
        object.__setattr__(self, "relations", _relation_names(self.relations))
        self._check_combination()

    def _check_strings_and_ints(self) -> None:
        for name in ("arm", "dataset", "model", "optimizer", "loss_metric", "preprocess", "metric", "monitor_windows"):
            _check_type(name, getattr(self, name), str)
        check_choice("monitor_windows", self.monitor_windows, ("all", "last"))
        check_choice("arm", self.arm, ARMS)
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, MODELS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("loss_metric", self.loss_metric, ("cosine", "pearson"))
        check_choice("preprocess", self.preprocess, CF.PREPROCESS_MODES)
        check_choice("metric", self.metric, ("pearson", "cosine"))
        for name in ("num_samples", "width", "depth", "batch_size", "steps", "eval_every", "monitor_every"):
            v = _check_type(name, getattr(self, name), int)
            if v < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {v!r}")
        for name in ("seed", "data_seed", "n_bootstrap"):
            v = _check_type(name, getattr(self, name), int)
            if v < 0:
                raise ValueError(f"Expected `{name}` to be a non-negative int, but got {v!r}")

    def _check_numbers(self) -> None:
        # Floats: ints are accepted and stored as floats so that 1 and 1.0 give the same run id.
        for name in ("lr", "momentum", "weight_decay", "alpha_threshold", *(("loss_weight",) if self.loss_weight is not None else ())):
            v = _check_type(name, getattr(self, name), float)
            object.__setattr__(self, name, float(v))
        if not self.lr > 0:
            raise ValueError(f"Expected `lr` to be a positive float, but got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"Expected `momentum` to be a float in [0, 1), but got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"Expected `weight_decay` to be a non-negative float, but got {self.weight_decay!r}")
        if self.loss_weight is not None and self.loss_weight < 0:
            raise ValueError(f"Expected `loss_weight` to be a non-negative float, but got {self.loss_weight!r}")
        if not -1 <= self.alpha_threshold <= 1:
            raise ValueError(f"Expected `alpha_threshold` to be a float in [-1, 1], but got {self.alpha_threshold!r}")
        if isinstance(self.noise, str):
            if self.noise != "auto":
                raise ValueError(f"Expected `noise` to be a non-negative float or 'auto', but got {self.noise!r}")
        else:
            v = _check_type("noise", self.noise, float, extra="or 'auto'")
            if v < 0:
                raise ValueError(f"Expected `noise` to be a non-negative float or 'auto', but got {v!r}")
            object.__setattr__(self, "noise", float(v))

    def _check_combination(self) -> None:
        rel = self.relations
        if self.arm in NOISE_ARMS and self.noise == "auto" and self.weight_decay == 0:
            raise ValueError(
                f"Expected `weight_decay` > 0 with `noise`='auto' in arm {self.arm!r} (the calibration balances the "
                "noise against the decay), but got 0.0; set a fixed `noise` or a positive `weight_decay`"
            )
        if not isinstance(self.track_crh, bool):
            raise TypeError(f"Expected `track_crh` to be a bool, but got {self.track_crh!r}")
        if self.arm in ("loss", "both") and not rel:
            raise ValueError(f"Expected `relations` to name at least one relation for arm {self.arm!r}, but got ()")
        if self.eval_every > self.steps:
            raise ValueError(f"Expected `eval_every` <= `steps` ({self.steps}), but got {self.eval_every}")
        if self.monitor_every > self.eval_every:
            raise ValueError(f"Expected `monitor_every` <= `eval_every` ({self.eval_every}), but got {self.monitor_every}")
        min_depth = {"mlp": 2, "resmlp": 3, "cnn1d": 2}[self.model]
        if self.depth < min_depth:
            raise ValueError(
                f"Expected `depth` >= {min_depth} for model {self.model!r} (a hidden representation is needed), "
                f"but got {self.depth}"
            )
        # `batch_size` against the training rows: in _data, where the data (built-in or yours) is known.

    # ------------------------------------------------------------------ identity
    @property
    def uses_loss(self) -> bool:
        return self.arm in LOSS_ARMS

    @property
    def uses_noise(self) -> bool:
        return self.arm in NOISE_ARMS

    def resolved(self) -> TrialConfig:
        """This config with the factors that do not act in its arm set to their neutral values.

        ``noise = 0.0`` in arms without ``NoiseCalibrated``; ``loss_weight = 0.0``, ``relations = ()``
        and ``loss_metric = "cosine"`` in arms without ``AlignmentLoss`` (``loss_weight`` None → the
        arm's default in the others; ``relations = ()`` in the ``crh`` arm); ``momentum = 0.0`` for
        Adam/AdamW (which ignore it); ``num_samples`` its default for ``digits`` (a fixed data set). Two
        configs that train identically resolve to the same record.
        """
        changes: dict[str, Any] = {}
        if not self.uses_noise:
            changes["noise"] = 0.0
        if not self.uses_loss:
            changes.update(loss_weight=0.0, relations=(), loss_metric="cosine")
        else:
            if self.loss_weight is None:
                changes["loss_weight"] = _default_loss_weight(self.arm)
            if self.arm == "crh":
                changes.update(relations=(), loss_metric="cosine")  # the joint objective has its own
        if self.optimizer != "sgd":
            changes["momentum"] = 0.0
        if self.dataset == "digits":  # a fixed set: num_samples does not act
            changes["num_samples"] = _NUM_SAMPLES_DEFAULT
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``relations`` as a list)."""
        d = dataclasses.asdict(self)
        d["relations"] = list(self.relations)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Expected TrialConfig fields from {sorted(known)}, but got unknown key(s) {unknown}")
        kw = dict(d)
        if "relations" in kw and isinstance(kw["relations"], list):
            kw["relations"] = tuple(kw["relations"])
        return cls(**kw)

    def replace(self, **changes: Any) -> TrialConfig:
        """``dataclasses.replace`` (validated again)."""
        return dataclasses.replace(self, **changes)


_NUM_SAMPLES_DEFAULT: int = TrialConfig.__dataclass_fields__["num_samples"].default  # type: ignore[assignment]


def _relation_names(rel: Any) -> tuple[str, ...]:
    """``relations`` as a tuple of distinct names from :data:`canonreg.functional.RELATIONS` (may be empty)."""
    if isinstance(rel, str) or not isinstance(rel, (tuple, list)):
        raise TypeError(f"Expected `relations` to be a list of relation names, but got {rel!r}")
    names = tuple(check_choice("relations", r, CF.RELATIONS) for r in rel)
    repeated = sorted({r for r in names if names.count(r) > 1})
    if repeated:
        raise ValueError(f"Expected `relations` without duplicates, but {repeated} appear more than once in {list(names)!r}")
    return names


def _default_loss_weight(arm: str) -> float:
    if arm == "crh":
        from .losses import CRH_PRESET

        return float(CRH_PRESET["weight"])
    return 0.1


def _check_type(name: str, value: Any, kind: type, *, extra: str = "") -> Any:
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        what = {str: "a string", int: "an int", float: "a finite float"}[kind]
        raise TypeError(f"Expected `{name}` to be {what}{' ' + extra if extra else ''}, but got {value!r} ({type(value).__name__})")
    return value


def trial_defaults() -> dict[str, Any]:
    """``{field: default}`` of :class:`TrialConfig` (the factors an ablation may vary)."""
    return {f.name: f.default for f in dataclasses.fields(TrialConfig)}


def config_id(cfg: TrialConfig) -> str:
    """Stable 16-hex run id: SHA-256 of the resolved config's canonical JSON (and a result version).

    Equal for configs that train identically (see :meth:`TrialConfig.resolved`), stable across
    processes, machines and Python versions.
    """
    payload = json.dumps({"v": _RESULT_VERSION, "config": cfg.resolved().to_dict()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- building blocks
def load_data(cfg: TrialConfig) -> Split:
    """The dataset of ``cfg`` via :mod:`canonreg.data` (mnist1d is generated locally and cached)."""
    from . import data

    if cfg.dataset == "mnist1d":
        return data.mnist1d(num_samples=cfg.num_samples, seed=cfg.data_seed)
    return data.digits(seed=cfg.data_seed)


def build_model(cfg: TrialConfig) -> nn.Module:
    """The model of ``cfg``, initialised from ``cfg.seed`` without touching the global RNG.

    Every variant has ``cfg.depth`` weight layers and ends in an ``nn.Linear`` head, whose input is
    the penultimate representation used for NC1.
    """
    from .models import CNN1d, ResidualMLP, mlp

    d_in, d_out = _SHAPES[cfg.dataset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model == "mlp":
            return mlp(d_in, cfg.width, cfg.depth, d_out)
        if cfg.model == "resmlp":
            return ResidualMLP(d_in, cfg.width, cfg.depth - 2, d_out)
        return CNN1d(d_in, channels=cfg.width, layers=cfg.depth - 1, d_out=d_out)


def _base_optimizer(cfg: TrialConfig, model: nn.Module, weight_decay: float) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW with ``weight_decay`` on parameters with >= 2 dims (weight matrices, kernels) only.

    Biases never decay: the rule ``NoiseCalibrated`` applies (``decay="matrices"``), so that the
    baseline and the noise arms decay the same parameters.
    """
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [{"params": matrices, "weight_decay": weight_decay}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_arm(cfg: TrialConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, AlignmentLoss | None]:
    """The optimizer and (for the loss arms) the attached alignment loss of ``cfg.arm``.

    See the module docstring for the exact step of each arm. Weight decay γ acts on the parameters
    with >= 2 dims (weight matrices, kernels), never on biases, in every arm. In the noise arms the
    base optimizer gets no decay and ``NoiseCalibrated`` applies ``W ← (1 − η_eff γ) W`` itself, with
    ``η_eff = lr/(1 − β)`` for SGD with momentum β (the long-run strength of SGD's coupled decay γ)
    and ``η_eff = lr`` for Adam/AdamW (AdamW's decoupled decay, also for ``optimizer="adam"``).
    The returned loss and ``NoiseCalibrated`` are attached (their hooks are on ``model``); call
    their ``.detach()`` when done.
    """
    cfg = cfg.resolved()
    if cfg.uses_noise:
        from .optim import NoiseCalibrated

        base = _base_optimizer(cfg, model, 0.0)
        opt: torch.optim.Optimizer = NoiseCalibrated(
            base, model, weight_decay=cfg.weight_decay, noise=cfg.noise, decay="matrices", seed=cfg.seed  # type: ignore[arg-type]
        )
    else:
        opt = _base_optimizer(cfg, model, cfg.weight_decay)
    align = None
    if cfg.arm == "crh":
        from .losses import crh_loss

        align = crh_loss(model, weight=cfg.loss_weight)
    elif cfg.uses_loss:
        from .losses import AlignmentLoss

        # G relations use the loss's moving average of earlier backward passes; at step 1 there is
        # none yet, so those terms join from step 2 on ("skip") instead of raising.
        align = AlignmentLoss(
            model,
            relations=cfg.relations,
            metric=cfg.loss_metric,  # type: ignore[arg-type]
            weight=float(cfg.loss_weight or 0.0),  # resolved: never None here
            preprocess=cfg.preprocess,  # type: ignore[arg-type]
            g_mode="ema",  # AlignmentLoss's default became "exact" (needs align(task)); this loop calls align()
            ema_warmup="skip",
        )
    return opt, align


# ---------------------------------------------------------------------- the trial
@dataclass(frozen=True)
class TrialEvent:
    """What :func:`run_trial` passes to its ``callback`` at the end of every monitor window.

    Attributes:
        step: optimizer steps done.
        train_loss: mean task loss over the window.
        report: the monitor's report over the window (with SGD balance terms).
        optimizer_balance: ``NoiseCalibrated.balance`` in the noise arms, else None.
        final: whether this is the last window (whose report gives the final metrics).
    """

    step: int
    train_loss: float
    report: CRHReport
    optimizer_balance: Mapping[str, CF.BalanceTerms] | None
    final: bool


@dataclass(frozen=True)
class TrainedTrial:
    """A trained arm, as :func:`train_trial` leaves it.

    Attributes:
        config: the resolved config.
        model: the trained network (eval mode; no hooks left on it).
        optimizer: the arm's optimizer (``NoiseCalibrated`` in the noise arms, detached from the
            model: call its ``attach()`` before training further).
        report: the monitor's report over the last ``eval_every`` steps (exponents included).
        history: ``[{"step", "mean_alpha", "train_loss"}]`` after every window.
        steps_to_alpha: first window end with mean α >= ``alpha_threshold`` (None if never).
        train_loss: mean task loss over the last window.
        seconds: wall time of the training loop (data loading included).
    """

    config: TrialConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    report: CRHReport
    history: list[dict[str, float]]
    steps_to_alpha: int | None
    train_loss: float
    seconds: float


ModelFn = Callable[[TrialConfig], nn.Module]


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Row indices of successive training batches, without end.

    A fresh permutation of the ``n`` rows per epoch, drawn from a generator seeded with ``seed`` and used
    for nothing else; the incomplete tail of an epoch is dropped, so every batch has ``batch_size`` rows
    (the same S at every step). The loop of :func:`train_trial`, the recipes and the benchmarks.

    Raises:
        ValueError: ``batch_size`` is not in ``[1, n]``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"Expected `batch_size` to be an int in [1, {n}] (the number of rows), but got {batch_size!r}")
    order = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=order)
        for pos in range(0, n - batch_size + 1, batch_size):
            yield perm[pos : pos + batch_size]


def optimizer_step(opt: torch.optim.Optimizer, task: Tensor, align: AlignmentLoss | None) -> None:
    """One step on ``task + align(task)`` (just ``task`` without a loss term): zero_grad, backward, step."""
    loss = task + align(task) if align is not None else task
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_trial(
    cfg: TrialConfig,
    *,
    data: Split | Callable[[TrialConfig], Split] | None = None,
    model_fn: ModelFn | None = None,
    threads: int | None = None,
    progress: bool = False,
    callback: Callable[[TrialEvent], None] | None = None,
) -> TrainedTrial:
    """Train one arm under ``cfg``; the loop every ablation and recipe shares.

    ``steps`` optimizer steps on batches of ``batch_size`` drawn without replacement (a fresh
    permutation each epoch from a generator seeded with ``seed``, the incomplete tail dropped so
    that S is constant), objective ``CE(f(x), y)`` plus ``align()`` in the loss arms. A
    :class:`~canonreg.CRHMonitor` (``cfg.preprocess``, ``cfg.metric``) is attached throughout (for
    the last window only with ``monitor_windows="last"``) — it never changes the computation — collecting every ``monitor_every``-th step and reset after every
    window of ``eval_every`` steps; windows are aligned to end at ``steps``. Balance terms use
    ``η = lr / (1 − β)`` for SGD with momentum β (theory §5), ``η = lr`` for Adam/AdamW.

    Deterministic given ``cfg`` in one environment (same torch build and thread count): Python,
    NumPy and torch's global RNG are seeded from ``cfg.seed``; the model is built from it.

    Args:
        cfg: the trial (resolved first, see :meth:`TrialConfig.resolved`).
        data: a preloaded split for ``cfg``, or a factory ``data(cfg) -> Split`` for your own data
            (default: :func:`load_data`, the built-in data sets).
        model_fn: a factory ``model_fn(cfg) -> nn.Module`` for your own model, called right after
            the global RNG is seeded with ``cfg.seed`` (default: :func:`build_model`). The model must
            map ``data.x`` rows to class logits (the task loss is cross-entropy).
        threads: torch intra-op threads for this trial, restored afterwards (None: leave as is).
            Small trials run much faster with 1 thread when several run side by side.
        progress: show a tqdm bar over the steps (needs tqdm).
        callback: called with a :class:`TrialEvent` after every window (e.g. to feed
            :mod:`canonreg.writers`).

    Raises:
        FloatingPointError: the task loss became non-finite.
    """
    from .monitor import CRHMonitor
    from .optim import effective_lr

    cfg = cfg.resolved()
    if threads is not None:
        with _num_threads(threads):
            return train_trial(cfg, data=data, model_fn=model_fn, progress=progress, callback=callback)
    t0 = time.perf_counter()
    _seed_everything(cfg.seed)
    split = _data(cfg, data)
    model = build_model(cfg) if model_fn is None else _user_model(cfg, model_fn)
    opt, align = make_arm(cfg, model)
    monitor = CRHMonitor(model, preprocess=cfg.preprocess, metric=cfg.metric, every=cfg.monitor_every)  # type: ignore[arg-type]
    bar = progress_bar(cfg.steps, progress, desc=f"{cfg.arm} seed={cfg.seed}", unit="step", mininterval=0.5, leave=False)
    run = _TrialRun(cfg, split, model, opt, align, monitor, effective_lr(opt.param_groups[0]), bar, callback)
    batches = batch_indices(split.x.shape[0], cfg.batch_size, cfg.seed)
    first_monitored = 1 if cfg.monitor_windows == "all" else cfg.steps - cfg.eval_every + 1
    try:
        for step in range(1, cfg.steps + 1):
            if step == first_monitored:
                monitor.attach()
            idx = next(batches)
            task = F.cross_entropy(model(split.x[idx]), split.y[idx])
            optimizer_step(opt, task, align)
            run.add_loss(float(task.detach()), step)
            if (cfg.steps - step) % cfg.eval_every == 0:  # windows are aligned to end at `steps`
                run.close_window(step, monitored=step >= first_monitored)
            bar.update(1)
    finally:
        bar.close()
        run.detach_all()
    if run.report is None:  # pragma: no cover - the last step always closes a monitored window
        raise RuntimeError("train_trial ended without a monitor window")
    model.eval()
    return TrainedTrial(cfg, model, opt, run.report, run.history, run.steps_to_alpha, run.last_loss, time.perf_counter() - t0)


def _seed_everything(seed: int) -> None:
    """Python, NumPy and torch's global RNG from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class _TrialRun:
    """The state of one :func:`train_trial` loop: the task loss of the open window and what closed windows left."""

    cfg: TrialConfig
    split: Split
    model: nn.Module
    opt: torch.optim.Optimizer
    align: AlignmentLoss | None
    monitor: Any
    eta: float
    bar: Any
    callback: Callable[[TrialEvent], None] | None
    window_loss: float = 0.0
    window_count: int = 0
    last_loss: float = math.nan
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    report: CRHReport | None = None
    steps_to_alpha: int | None = None

    def add_loss(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(f"Training diverged: non-finite task loss at step {step} of {self.cfg!r}")
        self.window_loss += value
        self.window_count += 1

    def close_window(self, step: int, *, monitored: bool) -> None:
        """End a window: read the monitor (balance with ``η = effective_lr``), log, reset."""
        cfg = self.cfg
        if not monitored:
            self.window_loss, self.window_count = 0.0, 0
            return
        final = step == cfg.steps
        report = self.monitor.compute(
            lr=self.eta, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, exponents=final, n_bootstrap=cfg.n_bootstrap, bootstrap_seed=cfg.seed
        )
        self.report = report
        mean_alpha = report.mean_alignment()
        self.last_loss = self.window_loss / self.window_count
        self.history.append({"step": step, "mean_alpha": mean_alpha, "train_loss": self.last_loss})
        if cfg.track_crh:
            self.history[-1].update(_track(self.model, self.split, cfg, [self.monitor, self.align, self.opt]))
        if self.steps_to_alpha is None and mean_alpha >= cfg.alpha_threshold:
            self.steps_to_alpha = step
        if self.callback is not None:
            self.callback(TrialEvent(step, self.last_loss, report, _optimizer_balance(self.opt), final))
        self.monitor.reset()
        self.window_loss, self.window_count = 0.0, 0
        if cfg.track_crh:  # the task-only α; the window α's G holds the regulariser's gradient in loss arms
            self.bar.set_postfix(loss=f"{self.last_loss:.3f}", min_alpha_inner=f"{self.history[-1]['min_alpha_inner']:.3f}")
        else:
            self.bar.set_postfix(loss=f"{self.last_loss:.3f}", alpha=f"{mean_alpha:.3f}")

    def detach_all(self) -> None:
        """Lift the monitor's, the loss's and NoiseCalibrated's hooks (the wrapper's balance stays readable)."""
        self.monitor.detach()
        if self.align is not None:
            self.align.detach()
        detach_opt = getattr(self.opt, "detach", None)
        if callable(detach_opt):
            detach_opt()


def _data(cfg: TrialConfig, data: Split | Callable[[TrialConfig], Split] | None) -> Split:
    from .data import Split

    if data is None:
        split, source = load_data(cfg), f"of {cfg.dataset!r}"
    else:
        split = data(cfg) if callable(data) and not isinstance(data, Split) else data
        source = "of your `data`"
    if not isinstance(split, Split):
        raise TypeError(f"Expected `data` to be a canonreg.data.Split or a factory returning one, but got {type(split).__name__}")
    if cfg.batch_size > split.x.shape[0]:
        raise ValueError(f"Expected `batch_size` <= the {split.x.shape[0]} training samples {source}, but got {cfg.batch_size}")
    return split


def _user_model(cfg: TrialConfig, model_fn: ModelFn) -> nn.Module:
    if not callable(model_fn):
        raise TypeError(f"Expected `model_fn` to be callable as model_fn(cfg) -> nn.Module, but got {model_fn!r}")
    torch.manual_seed(cfg.seed)  # the same initialisation in every arm of a seed
    model = model_fn(cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model_fn` to return a torch.nn.Module, but got {type(model).__name__}")
    return model


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Expected `threads` to be a positive int or None, but got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _track(model: nn.Module, split: Split, cfg: TrialConfig, owners: list[Any]) -> dict[str, float]:
    """Task-only α over the training set mid-training, with every canonreg hook lifted meanwhile."""
    attached = [o for o in owners if o is not None and getattr(o, "attached", False)]
    for o in attached:
        o.detach()
    try:
        post = measure_crh(model, split.x, split.y, preprocess=cfg.preprocess, metric=cfg.metric)  # type: ignore[arg-type]
    finally:
        for o in attached:
            o.attach()
    return {"min_alpha_inner": min_alignment(post, inner_layers(post.layers)), "mean_alpha_post": post.mean_alignment()}


def inner_layers(layers: list[str]) -> list[str]:
    """The weight layers whose input and output are both learned (:func:`canonreg.layers.layer_roles`)."""
    return [n for n, role in layer_roles(layers).items() if role == "inner"]


def run_trial(
    cfg: TrialConfig,
    *,
    progress: bool = False,
    callback: Callable[[TrialEvent], None] | None = None,
    data: Split | Callable[[TrialConfig], Split] | None = None,
    model_fn: ModelFn | None = None,
    threads: int | None = None,
    measure: Callable[[TrainedTrial, Split], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train one arm under ``cfg`` (:func:`train_trial`) and return its metrics, JSON-ready.

    Args:
        cfg: the trial (resolved first, see :meth:`TrialConfig.resolved`).
        progress: show a tqdm bar over the steps (needs tqdm).
        callback: called with a :class:`TrialEvent` after every monitor window.
        data, model_fn, threads: your own data and model, and the thread count (see :func:`train_trial`).
        measure: your own measurement of the trained model, ``measure(trained, split) -> dict``
            (:class:`TrainedTrial`, the data split), called after every metric below; its dict is
            returned under ``"measure"`` (not timed in ``wall_time_s``/``cpu_time_s``).

    Returns:
        A dict with ``config`` (resolved), ``run_id`` (:func:`config_id`), ``train_acc``,
        ``test_acc``, ``train_loss``, ``test_loss`` (full splits, after training), ``layers``;
        after training, over the training set, task gradient only (:func:`~canonreg.measure_crh`):
        ``alpha[layer][relation]``, ``mean_alpha``, ``mean_alpha_relation[relation]``,
        ``mean_alpha_layer[layer]``, ``min_alpha_layer[layer]``, ``inner_layers``,
        ``min_alpha_inner`` (:func:`inner_layers`), ``exponents[layer][relation]`` (PAH fits);
        from the training-time monitor's last window: ``window_alpha``, ``window_mean_alpha``,
        ``steps_to_alpha``,
        ``history``, ``hidden_layers``, ``erank[layer]``, ``pcs95[layer]``, ``penultimate``, ``nc1``,
        ``nc1_test``, ``balance[layer]`` (monitor, SGD form), ``optimizer_balance[layer]`` (noise arms),
        ``window_train_loss``, ``train_time_s``, ``wall_time_s``, ``cpu_time_s`` (this process's CPU
        seconds: the cost on an idle machine when other processes compete for the cores),
        ``threads``, ``torch``.
        Non-finite numbers are None.
    """
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    cfg = cfg.resolved()
    if threads is not None:
        with _num_threads(threads):
            return run_trial(cfg, progress=progress, callback=callback, data=data, model_fn=model_fn, measure=measure)
    split = _data(cfg, data)
    trained = train_trial(cfg, data=split, model_fn=model_fn, progress=progress, callback=callback)
    result: dict[str, Any] = {"config": cfg.to_dict(), "run_id": config_id(cfg)}
    result.update(evaluate(trained.model, split))
    report = measure_crh(
        trained.model, split.x, split.y, preprocess=cfg.preprocess, metric=cfg.metric,  # type: ignore[arg-type]
        exponents=True, n_bootstrap=cfg.n_bootstrap, bootstrap_seed=cfg.seed,
    )  # fmt: skip
    result.update(_alignment_metrics(report))
    result.update(_training_metrics(trained))
    result["wall_time_s"] = time.perf_counter() - t0
    result["cpu_time_s"] = time.process_time() - cpu0  # CPU seconds of this process (all its threads)
    result["threads"] = torch.get_num_threads()
    result["torch"] = torch.__version__
    if measure is not None:
        result["measure"] = measure(trained, split)
    return jsonable(result)


def _alignment_metrics(report: CRHReport) -> dict[str, Any]:
    """The post-training measurement's entries of :func:`run_trial`'s result."""
    layers = report.layers
    inner = inner_layers(layers)
    return {
        "layers": layers,
        "inner_layers": inner,
        "min_alpha_inner": min_alignment(report, inner) if inner else float("nan"),
        "min_alpha_layer": {name: min_alignment(report, [name]) for name in layers},
        "alpha": report.alignment,
        "mean_alpha": report.mean_alignment(),
        "mean_alpha_relation": {r: report.mean_alignment(relations=[r]) for r in CF.RELATIONS},
        "mean_alpha_layer": {name: report.mean_alignment([name]) for name in layers},
        "exponents": {name: {r: fit.to_dict() for r, fit in fits.items()} for name, fits in report.exponents.items()},
    }


def _training_metrics(trained: TrainedTrial) -> dict[str, Any]:
    """The training-time entries of :func:`run_trial`'s result (the monitor's last window, the optimizer's balance)."""
    window = trained.report
    ob = _optimizer_balance(trained.optimizer)
    return {
        "window_alpha": window.alignment,
        "window_mean_alpha": window.mean_alignment(),
        "steps_to_alpha": trained.steps_to_alpha,
        "history": trained.history,
        "balance": {name: b.to_dict() for name, b in window.balance.items()},
        "optimizer_balance": None if ob is None else {name: b.to_dict() for name, b in ob.items()},
        "window_train_loss": trained.train_loss,
        "train_time_s": trained.seconds,
    }


def _optimizer_balance(opt: torch.optim.Optimizer) -> Mapping[str, CF.BalanceTerms] | None:
    bal = getattr(opt, "balance", None)
    if bal is None or not isinstance(bal, Mapping):
        return None
    return {str(k): v for k, v in bal.items() if isinstance(v, CF.BalanceTerms)} or None


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> dict[str, Any]:
    """Accuracy, cross-entropy and compactness (theory §6) of a trained model on both splits.

    For the input ``h`` of every weight layer after the first (the hidden representations; for
    convolutions every position is a row): participation ratio ``(Tr C)² / Tr C²`` and the number
    of principal components for 95% of ``Tr C``, ``C = Cov(h)`` on the test split; NC1
    ``Tr(Σ_W Σ_B⁺)/C`` (Papyan et al., 2020) of the input of the last layer on each split.

    Returns:
        ``{"hidden_layers", "train_acc", "train_loss", "test_acc", "test_loss", "erank", "pcs95",
        "penultimate", "nc1", "nc1_test"}``.
    """
    layers, taps, _ = select_layers(model, None)
    names = list(layers)
    hidden = names[1:]  # inputs of every weight layer after the first = hidden representations
    last = names[-1]
    captured: dict[str, Tensor] = {}
    wanted: set[str] = set()
    handles = []
    for name in hidden:
        tap = taps[name]

        def pre_hook(module: nn.Module, inputs: tuple[object, ...], _name: str = name, _tap: Any = tap) -> None:
            if _name in wanted:
                captured[_name] = _tap.input_rows(module, inputs).detach().double()

        handles.append(layers[name].register_forward_pre_hook(pre_hook))
    out: dict[str, Any] = {"hidden_layers": hidden, "penultimate": last}
    try:
        wanted.update({last} & set(hidden))  # train split: only what NC1 needs
        logits = model(split.x)
        train_last = captured.pop(last, None)
        out["train_acc"] = float((logits.argmax(1) == split.y).double().mean())
        out["train_loss"] = float(F.cross_entropy(logits.double(), split.y))
        wanted.update(hidden)
        logits = model(split.x_test)
        out["test_acc"] = float((logits.argmax(1) == split.y_test).double().mean())
        out["test_loss"] = float(F.cross_entropy(logits.double(), split.y_test))
    finally:
        for h in handles:
            h.remove()
    erank: dict[str, float] = {}
    pcs: dict[str, float] = {}
    for name in hidden:
        rows = captured[name]
        c = torch.cov(rows.T) if rows.shape[1] > 1 else rows.var(0, keepdim=True)
        erank[name] = float(CF.participation_ratio(c))
        pcs[name] = float(CF.n_components(c, 0.95)) if float(torch.trace(c)) > 0 else float("nan")
    out["erank"] = erank
    out["pcs95"] = pcs
    # NC1 needs one row per sample: the head is a Linear on a pooled (per-sample) representation.
    out["nc1"] = CF.nc1(train_last, split.y) if train_last is not None and len(train_last) == len(split.y) else float("nan")
    test_last = captured.get(last)
    out["nc1_test"] = CF.nc1(test_last, split.y_test) if test_last is not None and len(test_last) == len(split.y_test) else float("nan")
    return out


#: Keys of :func:`scalar_metrics` present for every trial.
STATIC_METRICS: tuple[str, ...] = (
    "train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha", "min_alpha_inner", "nc1", "nc1_test", "wall_time_s", "cpu_time_s",
    *(f"alpha/{r}" for r in CF.RELATIONS),
    "erank_penultimate", "pcs95_penultimate", "steps_to_alpha", "noise_share",
)  # fmt: skip
#: Per-layer families of :func:`scalar_metrics`: ``<prefix><layer name>``.
LAYER_METRIC_PREFIXES: tuple[str, ...] = ("alpha@", "erank@", "pcs95@")


def scalar_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The flat scalar metrics of a :func:`run_trial` result, for tables and plots.

    Keys: ``train_acc, test_acc, train_loss, test_loss, mean_alpha, min_alpha_inner, alpha/<relation>`` (mean over
    layers), ``alpha@<layer>`` (mean over relations), ``erank@<layer>, pcs95@<layer>`` (hidden
    layers), ``erank_penultimate, pcs95_penultimate, nc1, nc1_test, steps_to_alpha`` (NaN if never
    reached), ``noise_share`` (monitor's SGD balance, mean over layers), ``wall_time_s``, ``cpu_time_s``.
    Missing or non-finite values are NaN.
    """
    out: dict[str, float] = {}
    for k in ("train_acc", "test_acc", "train_loss", "test_loss", "mean_alpha", "min_alpha_inner", "nc1", "nc1_test", "wall_time_s", "cpu_time_s"):
        out[k] = _num(result.get(k))
    for r, v in (result.get("mean_alpha_relation") or {}).items():
        out[f"alpha/{r}"] = _num(v)
    for name, v in (result.get("mean_alpha_layer") or {}).items():
        out[f"alpha@{name}"] = _num(v)
    for name, v in (result.get("erank") or {}).items():
        out[f"erank@{name}"] = _num(v)
    for name, v in (result.get("pcs95") or {}).items():
        out[f"pcs95@{name}"] = _num(v)
    pen = result.get("penultimate")
    out["erank_penultimate"] = _num((result.get("erank") or {}).get(pen))
    out["pcs95_penultimate"] = _num((result.get("pcs95") or {}).get(pen))
    out["steps_to_alpha"] = _num(result.get("steps_to_alpha"))
    shares = [_num(b.get("noise_share")) for b in (result.get("balance") or {}).values()]
    shares = [s for s in shares if math.isfinite(s)]
    out["noise_share"] = sum(shares) / len(shares) if shares else float("nan")
    return out


def _num(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return float("nan")
