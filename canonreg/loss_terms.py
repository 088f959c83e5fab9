"""The per-call term math of :class:`~canonreg.AlignmentLoss`: from operands to one scalar (pure functions).

For every selected (layer ``l``, relation ``r``) pair with operands ``(A, B)`` the loss needs the five
scalars ``(⟨A,B⟩, ‖A‖², ‖B‖², 1ᵀA1, 1ᵀB1)`` (:func:`term_pieces`: exact trace identities of
:mod:`canonreg.loss_moments`, or Hutchinson estimates from the sketches of :mod:`canonreg.sketch`),
then ``α_{l,r}`` of all terms in one vectorised call (:func:`term_values`), then

    Agg(v) = Σ p v / Σ p                        (``focus=None``: the weighted mean), or
    Agg(v) = τ · log( Σ p exp(v / τ) / Σ p )    (``focus = τ``: a soft maximum)

of ``v = 1 − α`` with weights ``p`` (:func:`aggregate`). The stateful shell (hooks, captures, the G
averages, policies) is :class:`canonreg.losses.AlignmentLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from . import functional as CF
from .errors import CanonRegError
from .layers import _display, at_least_float32, read_weight
from .loss_moments import (
    LazyRowMoment,
    SketchOperand,
    WeightGram,
    _describe,
    _dim,
    _operand_tensor,
    alignment_from_moments,
    entry_sum,
    frobenius_inner,
    squared_frobenius,
)
from .sketch import centred_sketch, gram_sketches, rademacher_probes, sketch_pieces
from .taps import LayerTap, take_rows

#: How :class:`AlignmentLoss` evaluates the Frobenius moments: exact trace identities or Hutchinson sketches.
Estimator = Literal["exact", "hutchinson"]
ESTIMATORS: tuple[str, ...] = ("exact", "hutchinson")

#: The G matrices (their relations need gradients of the layer output).
G_MATRICES = ("G_a", "G_b")

#: The five scalar moments of one term: ``(⟨A,B⟩, ‖A‖², ‖B‖², 1ᵀA1, 1ᵀB1)`` (sums None when unused).
Pieces = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]


@dataclass
class LayerCapture:
    """One call of a hooked layer in the current pass (references only; nothing is computed)."""

    module: nn.Module
    inputs: tuple[object, ...]
    output: Tensor
    rows_b: Tensor | None  # output rows, copied at capture time (safe from later in-place ops)
    in_version: int
    out_version: int
    w_version: int
    tap: LayerTap  # this call's tap (reads its rows; a sub-layer inside attention has one per call)
    keep: Tensor | None = None  # rows of real positions under a sample mask (canonreg.taps.masked); None: all


@dataclass
class Terms:
    """The scalar moments of one call's terms, in order (``pieces``: inner, ‖A‖², ‖B‖², 1ᵀA1, 1ᵀB1)."""

    pieces: list[list[Tensor]] = field(default_factory=lambda: [[], [], [], [], []])
    numel: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    where: list[tuple[str, str]] = field(default_factory=list)
    flats: list[Tensor] = field(default_factory=list)
    flat_where: list[str] = field(default_factory=list)
    flat_weights: list[float] = field(default_factory=list)

    def add(self, where: tuple[str, str], weight: float, numel: int, pieces: tuple[Tensor | None, ...]) -> None:
        for bucket, piece in zip(self.pieces, pieces):
            if piece is not None:
                bucket.append(piece)
        self.numel.append(numel)
        self.weights.append(weight)
        self.where.append(where)


def check_relations(relations: Sequence[str] | Literal["all"]) -> tuple[str, ...]:
    """The requested relation names as a tuple (``"all"``: the six), or a clear error."""
    if relations == "all":
        relations = CF.RELATIONS
    if isinstance(relations, str):
        raise ValueError(  # noqa: TRY004 — a single name is a wrong value, not a wrong type
            f"Expected `relations` to be a sequence of names, e.g. ({relations!r},), but got the string {relations!r}"
        )
    if not isinstance(relations, Sequence):
        raise TypeError(f"Expected `relations` to be a sequence of names from {list(CF.RELATIONS)}, but got {relations!r}")
    rels = tuple(relations)
    if not rels:
        raise ValueError(f"Expected `relations` to name at least one of {list(CF.RELATIONS)}, but got an empty sequence")
    for r in rels:
        if r not in CF.RELATIONS:
            raise ValueError(f"Expected `relations` to contain names from {list(CF.RELATIONS)}, but got {r!r}")
    if len(set(rels)) != len(rels):
        raise ValueError(f"Expected `relations` without duplicates, but got {list(rels)}")
    return rels


def cat_rows(xs: list[Tensor]) -> Tensor:
    """The rows of several calls of one layer, stacked (no copy for a single call)."""
    return xs[0] if len(xs) == 1 else torch.cat(xs)


def check_captures(captures: Mapping[str, list[LayerCapture]], layer_names: Sequence[str], taps: Mapping[str, LayerTap], exact_g: bool) -> None:
    """Raise if a layer did not run in the last pass, or its input, weights or (``exact_g``) output changed in
    place since (the loss reads them when called)."""
    for name in layer_names:
        caps = captures.get(name)
        if not caps:
            raise CanonRegError(
                f"Layer {_display(name)!r} has no hook data from the last forward pass: it did not run in a "
                "grad-enabled call of the model (is it used in forward? was the pass under torch.no_grad()? inside "
                "torch.utils.checkpoint(use_reentrant=True), whose forward runs without grad: use use_reentrant=False). "
                "Select the layers that run with `layers=`"
            )
        for cap in caps:
            x = cap.inputs[0] if cap.inputs else None
            if isinstance(x, Tensor) and x._version != cap.in_version:
                raise CanonRegError(
                    f"The input of layer {_display(name)!r} was modified in place after its forward pass; "
                    "AlignmentLoss reads h_a when called. Use an out-of-place operation there"
                )
            if exact_g and cap.output._version != cap.out_version:
                raise CanonRegError(
                    f"The output of layer {_display(name)!r} was modified in place after its forward pass "
                    "(e.g. nn.ReLU(inplace=True) right after it), so g_mode='exact' cannot differentiate the "
                    "task loss with respect to h_b. Use an out-of-place activation or g_mode='ema'"
                )
            if read_weight(taps[name], cap.module)._version != cap.w_version:
                raise CanonRegError(
                    f"The weights of layer {_display(name)!r} changed since the forward pass (optimizer.step() "
                    "before calling the loss?). Call align() after the forward pass and before the optimizer step"
                )


def inert_layers(terms: Terms) -> tuple[list[str], int]:
    """The (displayed) layers none of whose terms depends on a tensor that requires grad, and the number of
    layers with a term."""
    acting: dict[str, bool] = {}  # layers with at least one computed term
    for i, (name, _) in enumerate(terms.where):
        acting[name] = acting.get(name, False) or any(p[i].requires_grad for p in terms.pieces if p)
    for name, phi in zip(terms.flat_where, terms.flats):
        acting[name] = acting.get(name, False) or phi.requires_grad
    return [_display(n) for n, ok in acting.items() if not ok], len(acting)


def task_g_rows(caps: list[LayerCapture], grads: list[Tensor]) -> Tensor:
    """The rows of ``g_b = −∂ℓ/∂h_b`` of every call (``grads``: the task loss's gradients of the outputs), scaled
    by their largest entry (α is scale-free; no underflow), in at least float32."""
    gb = cat_rows([at_least_float32(take_rows(c.tap.output_rows(c.module, g), c.keep)) for c, g in zip(caps, grads)])
    return -gb / gb.detach().abs().amax().clamp_min(torch.finfo(gb.dtype).tiny)


def ema_g_operands(
    name: str, ema: Mapping[str, Tensor], needs_g: Sequence[str], ema_warmup: Literal["error", "skip"], *, like: Tensor
) -> dict[str, Tensor | None]:
    """The dense G averages of layer ``name`` (``g_mode="ema"``), scaled by their largest entry, in ``like``'s
    device and dtype; None for a missing average with ``ema_warmup="skip"``, an error with ``"error"``."""
    ops: dict[str, Tensor | None] = {}
    for m in needs_g:
        if m not in ema:
            if ema_warmup == "error":
                raise CanonRegError(
                    f"g_mode='ema' needs a G average for layer {_display(name)!r}, but no backward pass has "
                    "reached it since the loss was attached: run one backward pass first (e.g. of the task "
                    "loss alone), pass ema_warmup='skip' to leave G terms out until then, or use g_mode='exact'"
                )
            ops[m] = None
        else:
            c = ema[m]
            ops[m] = (c / c.abs().amax().clamp_min(torch.finfo(c.dtype).tiny)).to(like.device, like.dtype)
    return ops


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """The probe generator of ``seed`` (None: None, i.e. torch's global generator), or a clear error."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"Expected `seed` to be None or an int in [0, 2**64), but got {seed!r}")
    return torch.Generator().manual_seed(seed)


def is_sketched(estimator: Estimator, probes: int, dim: int) -> bool:
    """Whether a side of width ``dim`` is sketched (``estimator="hutchinson"`` and ``dim > probes``)."""
    return estimator == "hutchinson" and dim > probes


def task_gradients(task_loss: Tensor | None, outputs: list[tuple[str, Tensor]], relations: Sequence[str]) -> dict[str, list[Tensor]]:
    """``∂ task_loss / ∂ h_b`` for every captured call ``(layer name, output)``, with graph (``g_mode="exact"``)."""
    if task_loss is None:
        raise ValueError(
            "Expected `task_loss` (a scalar tensor) with g_mode='exact' and G relations "
            f"{[r for r in relations if set(CF.RELATION_PAIRS[r]) & set(G_MATRICES)]}: "
            "call `loss = task + align(task)`"
        )
    if not isinstance(task_loss, Tensor) or task_loss.numel() != 1 or not task_loss.requires_grad:
        raise ValueError(f"Expected `task_loss` to be a scalar tensor that requires grad, but got {_describe(task_loss)}")
    for n, o in outputs:
        if not o.requires_grad:
            raise CanonRegError(f"The output of layer {_display(n)!r} does not require grad; its G is undefined")
    gs = torch.autograd.grad(task_loss.reshape(()), [o for _, o in outputs], create_graph=True, allow_unused=True)
    res: dict[str, list[Tensor]] = {}
    for (n, _), g in zip(outputs, gs):
        if g is None:
            raise CanonRegError(
                f"`task_loss` does not depend on the output of layer {_display(n)!r} in the last forward pass; its G is "
                "undefined. The loss holds the last grad-enabled pass of the model: pass the task loss of that pass "
                "(another forward pass after the one `task_loss` came from replaces it)"
            )
        res.setdefault(n, []).append(g)
    return res


def gram_pair_sketches(
    ops: Mapping[str, SketchOperand | None], sketches: dict[str, Tensor], probes: int, generator: torch.Generator | None
) -> None:
    """Both weight Grams' sketches in one pass (:func:`~canonreg.sketch.gram_sketches`) when both sides are
    sketched; stores the probes ``omega_a``/``omega_b`` and ``raw_Z_a``/``raw_Z_b`` in ``sketches``."""
    za, zb = ops.get("Z_a"), ops.get("Z_b")
    if isinstance(za, WeightGram) and isinstance(zb, WeightGram) and za.dim > probes and zb.dim > probes:
        sketches["omega_a"] = rademacher_probes(za.dim, probes, like=za.weight, generator=generator)
        sketches["omega_b"] = rademacher_probes(zb.dim, probes, like=za.weight, generator=generator)
        sketches["raw_Z_a"], sketches["raw_Z_b"] = gram_sketches(za.weight, sketches["omega_a"], sketches["omega_b"])


def term_pieces(
    pair: tuple[tuple[str, SketchOperand], tuple[str, SketchOperand]],
    sketches: dict[str, Tensor],
    *,
    metric: CF.Metric,
    estimator: Estimator,
    probes: int,
    generator: torch.Generator | None,
) -> Pieces:
    """``(⟨A,B⟩, ‖A‖², ‖B‖², 1ᵀA1, 1ᵀB1)`` of ``pair = ((a_name, A), (b_name, B))``: exact, or
    (``estimator="hutchinson"``) Hutchinson estimates of the moments of the entry-centred matrices for
    pearson (then the sums are None and α is their cosine).

    Sides of width ``d ≤ probes`` stay exact under ``"hutchinson"`` (cheaper than ``k ≥ d`` probes).
    ``sketches`` caches each matrix's (centred) sketch and each side's probes across the relations of
    one layer.
    """
    (a_name, a), (b_name, b) = pair
    d = _dim(a)
    pearson = metric == "pearson"
    if not is_sketched(estimator, probes, d):
        assert not isinstance(a, LazyRowMoment) and not isinstance(b, LazyRowMoment)  # AlignmentLoss._rows keeps them exact
        inner, sq_a, sq_b = frobenius_inner(a, b), squared_frobenius(a), squared_frobenius(b)
        if not pearson:
            return inner, sq_a, sq_b, None, None
        s_a, s_b = entry_sum(a), entry_sum(b)
        if estimator == "exact":
            return inner, sq_a, sq_b, s_a, s_b
        n = float(d * d)
        return inner - s_a * s_b / n, sq_a - s_a * s_a / n, sq_b - s_b * s_b / n, None, None
    for m, op in pair:
        if m not in sketches:
            side = "omega_" + m[-1]  # H_a, Z_a, G_a act on the input side; H_b, Z_b, G_b on the output side
            if side not in sketches:
                sketches[side] = rademacher_probes(d, probes, like=_operand_tensor(op), generator=generator)
            sketches[m] = centred_sketch(op, sketches[side], metric, product=sketches.pop("raw_" + m, None))
    return (*sketch_pieces(sketches[a_name], sketches[b_name]), None, None)


def term_values(terms: Terms, metric: CF.Metric, estimator: Estimator) -> tuple[Tensor, list[float], list[tuple[str, str]], dict[str, dict[str, Tensor]]]:
    """``1 − α`` and ``1 − φ`` of every term (α of all terms in one vectorised call), their weights and
    ``(layer, relation)`` names, and ``{layer: {relation: α or φ}}`` (detached)."""
    vals_list: list[Tensor] = []
    alignment: dict[str, dict[str, Tensor]] = {}
    if terms.where:
        stacked = [torch.stack(p) if p else None for p in terms.pieces]
        numel = torch.tensor(terms.numel, dtype=torch.float64, device=stacked[0].device)  # type: ignore[union-attr]
        alpha_metric: CF.Metric = metric if estimator == "exact" else "cosine"  # sketches come centred
        alphas = alignment_from_moments(stacked[0], stacked[1], stacked[2], stacked[3], stacked[4], numel, alpha_metric)  # type: ignore[arg-type]
        detached = alphas.detach()
        for i, (name, rel) in enumerate(terms.where):
            alignment.setdefault(name, {})[rel] = detached[i]
        vals_list.append(1.0 - alphas)
    if terms.flat_where:
        phi = torch.stack(terms.flats)
        for i, name in enumerate(terms.flat_where):
            alignment.setdefault(name, {})["flatness"] = phi.detach()[i]
        vals_list.append(1.0 - phi)
    where = terms.where + [(n, "flatness") for n in terms.flat_where]
    return torch.cat(vals_list), terms.weights + terms.flat_weights, where, alignment


def aggregate(vals: Tensor, wts: Tensor, finite: Tensor, focus: float | None) -> Tensor:
    """The weighted mean (``focus=None``) or the soft maximum ``τ·log Σ p_i exp(v_i/τ)`` (``p = w/Σw``,
    ``τ = focus``) of the terms ``vals`` where ``finite``; 0 when no term is left."""
    wts = torch.where(finite, wts, torch.zeros_like(wts))
    vals = torch.where(finite, vals, torch.zeros_like(vals))
    total = wts.sum()
    total = torch.where(total > 0, total, torch.ones_like(total))
    if focus is None:
        return (wts * vals).sum() / total
    # between the weighted mean (τ → ∞) and the worst term (τ → 0)
    tau, live = focus, wts > 0
    logits = torch.where(live, vals / tau + torch.log(torch.where(live, wts, torch.ones_like(wts))), torch.full_like(vals, -math.inf))
    any_live = live.any()
    logits = torch.where(any_live, logits, torch.zeros_like(logits))  # every term skipped: no -inf − -inf
    return torch.where(any_live, tau * (torch.logsumexp(logits, 0) - torch.log(total)), torch.zeros_like(total))
