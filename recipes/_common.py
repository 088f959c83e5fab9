"""What several recipes share and nothing else: the arm list and colours, the command-line merge of
``--quick`` and explicit options into a frozen config, the MLP-on-mnist1d trials of a recipe config
(one trial, or the ablation-runner spec of every arm × seed, and the runner's records read back), a
Markdown table, and the hidden representations of a trained model.

Training, the arms, statistics over seeds and run metadata live in the package
(:mod:`canonreg.experiment`, :mod:`canonreg.ablate`, :mod:`canonreg.stats`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from canonreg.ablate import AblationResult
from canonreg.experiment import TrialConfig, config_id
from canonreg.layers import select_layers

#: The arms the γ-scaling, PAH, universality and transformer studies compare by default: the four of
#: the original ablation. The ``crh`` arm (the joint CRH objective, ~10× a plain step) is added with
#: ``--arms ... crh``; the compactness and robustness recipes run every arm.
STUDY_ARMS: tuple[str, ...] = ("baseline", "loss", "noise", "both")

#: One colour per arm in every figure.
ARM_COLORS: dict[str, str] = {"baseline": "tab:gray", "loss": "tab:blue", "noise": "tab:orange", "both": "tab:green", "crh": "tab:red"}

#: The :class:`~canonreg.experiment.TrialConfig` fields a recipe config may carry (same names).
TRIAL_FIELDS: tuple[str, ...] = (
    "num_samples", "data_seed", "width", "depth", "optimizer", "lr", "momentum", "weight_decay",
    "noise", "loss_weight", "relations", "loss_metric", "batch_size", "steps", "preprocess", "metric",
    "eval_every", "monitor_every",
)  # fmt: skip

C = TypeVar("C")


def recipe_parser(doc: str | None, *, arms: Sequence[str] = (), mlp: bool = False) -> argparse.ArgumentParser:
    """The options every recipe has: ``--quick`` (the CI setting), ``--seeds``, ``--out`` and, with
    ``arms``, ``--arms`` (choices ``arms``); with ``mlp`` also the MLP-on-mnist1d training options
    ``--width --depth --steps --weight-decay --loss-weight --threads``. ``dest`` names are config fields."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False, help="the CI setting (< 1 minute)")
    p.add_argument("--seeds", nargs="+", type=int)
    if arms:
        p.add_argument("--arms", nargs="+", choices=list(arms))
    if mlp:
        for flag in ("--width", "--depth", "--steps", "--threads"):
            p.add_argument(flag, type=int)
        for flag in ("--weight-decay", "--loss-weight"):
            p.add_argument(flag, type=float)
    p.add_argument("--out", help="output folder")
    return p


def config_from_args(cls: type[C], parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: Mapping[str, Any]) -> C:
    """``cls(**values)``: the dataclass defaults, replaced by ``quick`` under ``--quick``, replaced by
    every option given on the command line (``parser``'s ``dest`` names are ``cls``'s fields; lists
    become tuples). ``parser`` must define ``--quick``; the dataclass validates the result."""
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = dict(quick) if args["quick"] else {}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None})
    return cls(**values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


@torch.no_grad()
def hidden_representations(model: nn.Module, x: Tensor, *, logits: bool = False) -> dict[str, Tensor]:
    """The input ``h_a`` of every weight layer after the first, keyed ``"h1", "h2", …`` in forward order
    (for the MLP ``Linear → ReLU → …``: the post-ReLU activations of hidden layers 1, 2, …, the ``H_a``
    of theory §1), as ``(n, d)`` float32 tensors; with ``logits`` also the model output (``"logits"``)."""
    layers, taps, _ = select_layers(model, None)
    captured: dict[str, Tensor] = {}
    handles = []
    for i, name in enumerate(list(layers)[1:], start=1):

        def pre_hook(module: nn.Module, inputs: tuple[object, ...], _key: str = f"h{i}", _tap: Any = taps[name]) -> None:
            captured[_key] = _tap.input_rows(module, inputs).detach().float()

        handles.append(layers[name].register_forward_pre_hook(pre_hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    if logits:
        captured["logits"] = out.detach().float()
    return captured


def check_arms(arms: Sequence[str]) -> None:
    """Raise a ValueError naming ``arms`` unless it is a non-empty subset of ``ARMS`` without repeats."""
    from canonreg.experiment import ARMS

    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        raise ValueError(f"Expected `arms` to be distinct names from {list(ARMS)}, but got {list(arms)!r}")


def check_seeds(seeds: Sequence[int]) -> None:
    """Raise a ValueError naming ``seeds`` unless they are distinct non-negative ints."""
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"Expected `seeds` to be distinct non-negative ints, but got {list(seeds)!r}")


def _trial_fields(cfg: object) -> dict[str, Any]:
    """The :class:`TrialConfig` fields of a recipe config: every field of :data:`TRIAL_FIELDS` it has
    (``loss_weight`` None: each arm's default), on MNIST-1D with the MLP, no bootstrap."""
    kw = {f: getattr(cfg, f) for f in TRIAL_FIELDS if hasattr(cfg, f)}
    return {"dataset": "mnist1d", "model": "mlp", "n_bootstrap": 0, **kw}


def trial_config(cfg: object, arm: str, seed: int) -> TrialConfig:
    """The MLP-on-mnist1d :class:`TrialConfig` of ``arm`` and ``seed`` under a recipe config ``cfg``.

    Every field of :data:`TRIAL_FIELDS` that ``cfg`` has is copied, so all arms share one budget
    (steps × batch size), one dataset and one initialisation per seed. ``loss_weight``: the λ of the
    loss arms; None = each arm's default (0.1 for ``loss``/``both``, the :func:`canonreg.crh_loss`
    preset's weight for ``crh``).
    """
    return TrialConfig(arm=arm, seed=seed, **_trial_fields(cfg))


def ablation_spec(name: str, cfg: Any) -> dict[str, Any]:
    """The :func:`canonreg.ablate.run_ablation` spec of a recipe config: every arm × seed of
    ``cfg.arms`` × ``cfg.seeds`` (arm-major), each run :func:`trial_config`, ``cfg.workers`` processes."""
    fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in _trial_fields(cfg).items() if v is not None}
    grid = {"arm": list(cfg.arms), "seed": list(cfg.seeds)}
    return {"ablation": {"name": name, "workers": cfg.workers}, "fixed": fixed, "grid": grid}


def finished_runs(done: AblationResult) -> list[tuple[TrialConfig, dict[str, Any], Any]]:
    """``(config, result, measure)`` of every run of ``done`` in grid order, NaN where the JSON
    records hold None (a non-finite number). Raises a RuntimeError naming the runs that failed."""
    failed = {config_id(c): done.failures.get(config_id(c), "not finished") for c in done.configs if config_id(c) not in done.records}
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (see {done.out}/errors.jsonl): " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    recs = [done.records[config_id(c)] for c in done.configs]
    return [(c, nan_for_none(r["result"]), nan_for_none(r.get("measure"))) for c, r in zip(done.configs, recs)]


def nan_for_none(x: Any) -> Any:
    """``x`` (JSON data) with every None replaced by NaN: the runner's records store non-finite numbers as null."""
    if isinstance(x, dict):
        return {k: nan_for_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_for_none(v) for v in x]
    return math.nan if x is None else x
