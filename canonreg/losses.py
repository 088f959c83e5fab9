"""Differentiable CRH alignment losses: push chosen layers toward chosen relations.

For a layer ``h_b = W h_a + b`` the six relations of the Canonical Representation Hypothesis
(Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006) compare ``A ∝ B`` for the pairs of
:data:`canonreg.functional.RELATION_PAIRS`. The loss of one (layer, relation) term is

    ℓ(A, B) = 1 − α(A, B),     α = cosine ⟨A,B⟩_F / (‖A‖_F ‖B‖_F)   or   Pearson of the entries,

and :class:`AlignmentLoss` returns ``weight · Σ_{l,r} w_l w_r ℓ_{l,r} / Σ_{l,r} w_l w_r`` (or a soft
maximum, ``focus``). The math lives in pure modules, each name re-exported here:

* :mod:`canonreg.loss_moments` — the factored operands (``H = FᵀF``, ``Z_a = WᵀW``, ``Z_b = WWᵀ``) and
  the exact α from trace identities, never building a ``d × d`` matrix (:func:`row_moment`,
  :func:`frobenius_inner`, :func:`gram_sqnorm`, :func:`alignment_from_moments`, :func:`alignment_loss` …);
* :mod:`canonreg.sketch` — the randomized alternative (``estimator="hutchinson"``, ``probes=k``):
  ``⟨A,B⟩ ≈ ⟨AΩ, BΩ⟩/k``, ``‖A‖² ≈ ‖AΩ‖²/k`` with Rademacher probes ``Ω``, in ``O(k·(n·d + d_a·d_b))``
  instead of ``O(d³ + n·d²)`` (:func:`sketched_alignment`); the monitor's sketches live there too;
* :mod:`canonreg.loss_terms` — the per-call terms and their aggregation.

Tests check :class:`AlignmentLoss` against these functional twins and them against dense matrices.

References: Ziyin, Chuang, Galanti & Poggio, "Formation of Representations in Neural Networks",
arXiv:2410.03006 (CRH, the six relations, α); Ziyin, Wang, Li & Wu, arXiv:2402.07193 (why they form).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import functional as CF
from .capture import Backward, Capture, LayerCall, Policy, handle_nonfinite
from .errors import CanonRegError, check_choice, check_nonnegative, check_positive, check_positive_int
from .layers import LayerSpec, _display, at_least_float32, layer_roles, read_weight, select_layers
from .loss_moments import (
    LazyRowMoment,
    MomentOperand,
    RowMoment,
    SketchOperand,
    WeightGram,
    _dim,
    alignment_from_moments,
    alignment_loss,
    entry_sum,
    factored_alignment,
    frobenius_inner,
    gram_sqnorm,
    row_moment,
    spectral_flatness,
    squared_frobenius,
)
from .loss_moments import Side as Side  # re-exported: canonreg.losses.Side predates the split
from .loss_terms import (
    ESTIMATORS,
    G_MATRICES,
    Estimator,
    LayerCapture,
    Terms,
    aggregate,
    cat_rows,
    check_captures,
    check_relations,
    ema_g_operands,
    gram_pair_sketches,
    inert_layers,
    is_sketched,
    seeded_generator,
    task_g_rows,
    task_gradients,
    term_pieces,
    term_values,
)
from .sketch import (
    centred_sketch,
    gram_sketches,
    rademacher_probes,
    sketch_pieces,
    sketch_product,
    sketched_alignment,
)
from .taps import LayerTap, take_rows

__all__ = [
    "AlignmentLoss",
    "CRH_PRESET",
    "ESTIMATORS",
    "Estimator",
    "crh_loss",
    "inner_layers",
    "GMode",
    "LazyRowMoment",
    "MomentOperand",
    "RowMoment",
    "SketchOperand",
    "WeightGram",
    "alignment_from_moments",
    "alignment_loss",
    "centred_sketch",
    "entry_sum",
    "factored_alignment",
    "frobenius_inner",
    "gram_sketches",
    "gram_sqnorm",
    "rademacher_probes",
    "row_moment",
    "sketch_pieces",
    "sketch_product",
    "sketched_alignment",
    "spectral_flatness",
    "squared_frobenius",
]

GMode = Literal["ema", "exact"]


class AlignmentLoss(nn.Module):
    """Differentiable CRH alignment penalty on chosen layers and relations.

    With terms ``v_{l,r} = 1 − α_{l,r}`` of weight ``p_{l,r} = w_l w_r`` for the selected layers ``l`` and
    ``relations`` ``r`` (``α_{l,r} = α(A, B)`` for the pair ``(A, B)`` of relation ``r``,
    ``canonreg.functional.RELATION_PAIRS``, in layer ``l``), plus, when ``flatness = f > 0``, one term
    ``v_{l,♭} = 1 − φ(W_l)`` of weight ``w_l f`` per layer (:func:`spectral_flatness`,
    ``φ = Tr Z³ / (‖Z‖_F ‖Z²‖_F)``, 1 iff the nonzero spectrum of ``Z = WᵀW`` is flat), the loss at
    the ``t``-th call is

        L_t = weight · ρ_t · Agg(v),      ρ_t = min(1, t / warmup)   (ρ_t = 1 with ``warmup = 0``),

        Agg(v) = Σ p v / Σ p                              (``focus=None``: the weighted mean), or
        Agg(v) = τ · log( Σ p exp(v / τ) / Σ p )          (``focus = τ``: a soft maximum of the terms,
                                                           between the mean, τ → ∞, and the worst, τ → 0).

    Everything is computed from the most recent grad-enabled call of ``model`` (a "pass"; a layer
    called several times in one pass contributes the rows of every call).

    Why these pieces (theory §1, §6): in raw/centred mode ``H_b = W H_a Wᵀ`` and
    ``G_a = Wᵀ G_b W`` hold exactly, so all six relations hold together iff ``H_a ∝ Z_a``,
    ``G_b ∝ Z_b`` and ``Z`` has a flat nonzero spectrum — the flatness term targets that shared
    structure directly, and ``focus`` keeps the optimiser on the relation that lags instead of
    over-fitting those that already hold. ``relations="all"`` asks for all six.

    Symbols → sources (theory §1): ``H_a``, ``H_b`` from the rows of the layer input/output of the
    current pass (differentiable: gradients reach the weights and every earlier layer); ``Z_a = WᵀW``,
    ``Z_b = WWᵀ`` from the current weights (differentiable); ``G_a``, ``G_b`` (``g = −dℓ/dh``) from

    * ``g_mode="ema"``: an exponential moving average ``Ḡ ← β Ḡ + (1 − β) G_batch`` of the
      batch moments seen by backward hooks in *earlier* backward passes; ``Ḡ`` is a constant
      (detached) target. No extra backward pass; each backward adds one ``n·d²`` moment per needed
      G matrix and each loss call one ``n·d²`` (or ``d_a·d_b·d``) product. The hook sees the gradient
      that actually reaches the layer output, i.e. of the *total* loss (task + regularisers,
      including this loss's own H–Z terms). Before the first backward the G terms raise
      (``ema_warmup="error"``) or are left out of the mean (``"skip"``).
    * ``g_mode="exact"`` (default): the current batch's ``g_b = −∂ℓ/∂h_b`` of the *task* loss by double
      backprop, so the task loss must be passed: ``loss = task + align(task)``. This is the G the
      monitor measures in the paper's protocol (task loss only), and G itself is moved toward the
      relations (second-order terms); the EMA is a constant target that also contains the
      regulariser's own gradient, so G relations partly "satisfy themselves" there. Double backprop
      needs every op of the model to be twice differentiable: the fused CPU/GPU kernels of
      ``F.scaled_dot_product_attention`` are not ("derivative for ..._flash_attention_..._backward is not
      implemented" at ``loss.backward()``); run the forward pass under
      ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` or use ``g_mode="ema"``. ``align(task)`` runs
      ``torch.autograd.grad(task, layer outputs, create_graph=True)`` — one extra backward pass with
      graph — and the final ``loss.backward()`` then differentiates through it (second-order terms):
      expect roughly 2–3× the cost of a plain training step. ``G_a`` uses rows ``g_a = g_b W``.

    Cost of H–Z terms, in multiply-adds forward + backward (``n`` rows, ``W`` of shape
    ``(d_b, d_a)``; a plain training step costs ``3·n·d_a·d_b`` per layer): ``‖Z_a‖_F = ‖Z_b‖_F``
    from the ``min(d_a, d_b)``-sized Gram of ``W``, ``2·d_a·d_b·min(d_a, d_b)``, once per layer;
    ``‖H‖_F`` from the ``min(n, d)``-sized Gram of the rows, ``2·n·d·min(n, d)`` per H;
    ``⟨H_a, Z_a⟩ = ‖F Wᵀ‖²`` is free (the layer output gives ``h_a Wᵀ = h_b − b``) for plain
    ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``; ``⟨H_b, Z_b⟩ = ‖F_b W‖²`` costs ``3·n·d_a·d_b``.
    No ``d × d`` moment matrix is built. Relative to the step, a square ``d × d`` layer pays
    ``2d/(3n) + 2·min(n, d)/(3d)`` for f-RWA (at least 4/3, at ``n = d``) and about 3 for
    f-RWA + b-RWA: exact α terms cost a few training steps on wide square layers at moderate batch
    sizes (they are cheap for thin layers, e.g. ``d_a ≪ d_b``). To amortise, add ``align()`` on every
    ``k``-th step only: on the other steps the attached hooks just keep references (and one copy
    of the output rows).

    ``estimator="hutchinson"`` (``probes = k``) removes the ``d³`` and ``n·d²`` terms: per layer and
    side it draws ``k`` Rademacher probes ``Ω`` (``E[ΩΩᵀ]/k = I``, fresh each call, from torch's global
    generator, or from the loss's own generator with ``seed``) and scores every relation of that side by the cosine of the sketches,
    ``α̂ = ⟨ÃΩ, B̃Ω⟩ / (‖ÃΩ‖ ‖B̃Ω‖)`` (``Ã`` entry-centred for pearson; :func:`sketched_alignment`),
    whose numerator and squared norms are unbiased Hutchinson estimates of ``⟨Ã, B̃⟩``, ``‖Ã‖²``,
    ``‖B̃‖²``. ``|α̂| ≤ 1``, ``α̂ = 1`` exactly when ``Ã ∝ B̃``, and the ratio's bias is ``O(1/k)``
    (below the sampling noise in the tests). Cost per layer about ``6·k·n·(d_a + d_b) + 9·k·d_a·d_b``
    (:class:`LazyRowMoment`, :func:`gram_sketches`); sides of width ``≤ k`` stay exact. Measured
    (``benchmarks/results/loss_overhead_estimators.json``, ``loss_effect_estimators.md``): std of α̂
    about ``0.01`` at ``k = 16`` on trained width-128 layers (``∝ 1/√k``), the same α after
    training as the exact loss (3 seeds), and, with f-RWA + b-RWA on every layer of an MLP
    40→4×1024→10 at batch 512 (one thread), 1.42–1.46× a plain step at ``k = 16`` (1.32–1.39× at
    ``k = 8``) against 4.7–4.9× for the exact form. ``"exact"``
    stays the default: deterministic, and as cheap on narrow layers (width ≲ 256).

    Precision: the terms are formed in the weights' dtype (half precision upcast to float32), except
    ``preprocess="raw"`` with ``metric="pearson"``, which forms them in float64 (at about twice the cost on a
    CPU): its entry-centring subtracts pieces that grow with the rows' mean, so float32 pieces of inputs
    ``1000 + N(0, 1)`` keep nothing of their spread. The other modes centre the rows first.

    Scale conventions: α is invariant to positive rescaling of either matrix, so the batch-mean
    ``1/B`` of hook gradients needs no correction and ``weight`` is not multiplied by the learning
    rate.

    torch.func and torch.compile: passes inside ``torch.func`` transforms and through
    ``functional_call`` with substituted parameters are not captured and do not replace the last
    ordinary pass (:func:`canonreg.layers.untraced_call`). Build the loss before ``torch.compile``; a
    model already compiled is refused. The hooks are those of :class:`canonreg.capture.Capture` (the
    engine the monitor and :class:`~canonreg.NoiseCalibrated` share); a loss that is garbage-collected
    while attached takes its hooks with it.

    Copies: ``copy.deepcopy(model)``, ``pickle`` and ``torch.save`` of the model work while the loss is
    attached and give a plain model (no hook travels; EMA/SWA ``AveragedModel`` copies are never
    captured); a copy of the loss itself is detached (see :meth:`__getstate__`).

    Memory: the layer inputs and outputs of the last pass stay referenced until the next pass (or
    :meth:`detach`); output rows are copied at capture time when H_b or f-RWA needs them, so in-place
    activations after a layer (``nn.ReLU(inplace=True)``) are safe except with ``g_mode="exact"``.

    Args:
        model: the model (never modified; hooks go on the selected submodules).
        relations: relations to enforce, names from ``canonreg.RELATIONS``, or ``"all"`` for the six.
        layers: which layers (see :mod:`canonreg.layers`); default every Linear/Conv layer.
        metric: ``"pearson"`` (default: the paper's score and :class:`~canonreg.CRHMonitor`'s default, so the
            loss optimises what the monitor reports) or ``"cosine"`` (1 iff ``A = cB``, ``c > 0``).
        weight: overall strength (``≥ 0``; settable, e.g. for schedules). ``0`` returns an exact zero
            without computing anything: training is bit-identical to training without the loss.
        preprocess: ``"normalized"`` (default: per-sample unit norm then covariance, the paper's
            measurement protocol and :class:`~canonreg.CRHMonitor`'s default), ``"centered"`` or ``"raw"``.
        g_mode: ``"ema"`` or ``"exact"`` (see above); irrelevant without G relations.
        ema_decay: β of the G moving average, in ``[0, 1)`` (0 = last backward only).
        layer_weights: ``{layer name: w_l ≥ 0}``; unnamed selected layers get 1.
        relation_weights: ``{relation: w_r ≥ 0}``; unnamed requested relations get 1.
        flatness: weight ``f ≥ 0`` of the per-layer spectral-flatness term ``1 − φ(W)`` (0: none).
        focus: temperature ``τ > 0`` of the soft-maximum aggregation, or None for the weighted mean.
        warmup: linear ramp of the weight over the first ``warmup`` calls of the loss (0: none).
            Calls are counted in ``calls`` (saved in the state dict), also while ``weight = 0``.
        ema_warmup: ``"error" | "skip"`` for G relations whose moving average does not exist yet.
        nonfinite: ``"error" | "warn" | "skip"`` for terms whose α is NaN (a zero or constant matrix,
            e.g. a dead layer); ``"skip"``/``"warn"`` leave them out of the mean (one host sync per call
            for ``"error"``/``"warn"``).
        estimator: ``"exact"`` (default: the trace identities) or ``"hutchinson"`` (randomized
            sketches, see above; for wide layers).
        probes: ``k ≥ 1``, probes per layer side with ``estimator="hutchinson"`` (default 16).
        seed: None (default: the probes come from torch's global generator, reproducible under
            ``torch.manual_seed`` only) or an int in ``[0, 2**64)``: the probes come from the loss's own
            CPU generator seeded with it (moved to the model's device), so two losses with one seed draw
            the same probes call after call, run after run, on any device, and the global generator is
            left untouched. Its state is saved in the state dict (``"probe_rng"``) and re-seeded by
            :meth:`reset`. Nothing is random with ``estimator="exact"``, where it has no effect.
        taps: extra ``{module type: tap}`` for this loss only.

    Raises:
        ValueError: unknown relation, bad option or weight (the message names the argument).
        CanonRegError: another AlignmentLoss is attached to the model, a selected layer has no tap, or the
            model has no parameter that requires grad (at construction) / no term of the loss depends on
            one (at the call; a partly frozen model warns once, naming the layers that cannot act).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> align = AlignmentLoss(model, relations="all", weight=0.1)
        >>> x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
        >>> task = torch.nn.functional.cross_entropy(model(x), y)
        >>> (task + align(task)).backward()

    Reference: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (relations and α).
    """

    model: nn.Module  # set with object.__setattr__: not a submodule

    def __init__(
        self,
        model: nn.Module,
        relations: Sequence[str] | Literal["all"] = ("f-RWA", "b-RWA"),
        layers: LayerSpec = None,
        *,
        metric: CF.Metric = "pearson",
        weight: float = 1.0,
        preprocess: CF.Preprocess = "normalized",
        g_mode: GMode = "exact",
        ema_decay: float = 0.9,
        layer_weights: Mapping[str, float] | None = None,
        relation_weights: Mapping[str, float] | None = None,
        flatness: float = 0.0,
        focus: float | None = None,
        warmup: int = 0,
        ema_warmup: Literal["error", "skip"] = "error",
        nonfinite: Policy = "error",
        estimator: Estimator = "exact",
        probes: int = 16,
        seed: int | None = None,
        taps: dict[type[nn.Module], LayerTap] | None = None,
    ) -> None:
        super().__init__()
        rels = check_relations(relations)
        check_choice("metric", metric, CF.METRICS)
        check_choice("preprocess", preprocess, CF.PREPROCESS_MODES)
        check_choice("g_mode", g_mode, ("ema", "exact"))
        check_choice("ema_warmup", ema_warmup, ("error", "skip"))
        check_choice("nonfinite", nonfinite, ("error", "warn", "skip"))
        check_choice("estimator", estimator, ESTIMATORS)
        self.probes = check_positive_int("probes", probes)
        self._probe_gen = seeded_generator(seed)
        self.seed = seed
        if not (isinstance(ema_decay, (int, float)) and not isinstance(ema_decay, bool) and 0 <= ema_decay < 1):
            raise ValueError(f"Expected `ema_decay` to be a float in [0, 1), but got {ema_decay!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"Expected `warmup` to be a non-negative int (loss calls), but got {warmup!r}")
        self.flatness = check_nonnegative("flatness", flatness)
        self.focus = None if focus is None else check_positive("focus", focus)
        if not any(p.requires_grad for p in model.parameters()):
            raise CanonRegError(
                "AlignmentLoss got a model with no parameter that requires grad (a frozen model): the loss could "
                "never change it. Unfreeze the layers to shape (p.requires_grad_(True)) or do not add the loss"
            )

        # Plain attributes: the model must not become a submodule (state_dict, .to(), .train()).
        object.__setattr__(self, "model", model)
        self._tap_types = taps
        capture = self._new_capture(layers)
        self._capture: Capture | None = capture
        self.layer_names: tuple[str, ...] = tuple(capture.targets)
        self._modules_by_name: dict[str, nn.Module] = dict(capture.modules)
        self._taps: dict[str, LayerTap] = {n: t.tap for n, t in capture.targets.items()}
        self.excluded: dict[str, str] = dict(capture.excluded)
        self.relations: tuple[str, ...] = rels
        self.metric: CF.Metric = metric
        self.preprocess: CF.Preprocess = preprocess
        self.g_mode: GMode = g_mode
        self.estimator: Estimator = estimator
        self.ema_decay = float(ema_decay)
        self.ema_warmup = ema_warmup
        self.nonfinite: Policy = nonfinite
        self.weight = weight
        self.warmup = warmup
        self._init_term_weights(layer_weights, relation_weights)
        self._init_state()
        self.attach()

    def _init_term_weights(self, layer_weights: Mapping[str, float] | None, relation_weights: Mapping[str, float] | None) -> None:
        """Per-layer and per-relation weights (at least one positive term) and the matrices they need."""
        rels = self.relations
        self._layer_w = self._check_weights("layer_weights", layer_weights, self.layer_names, _display)
        self._rel_w = self._check_weights("relation_weights", relation_weights, rels, str)
        if not any(self._layer_w[n] * self._rel_w[r] > 0 for n in self.layer_names for r in rels) and not (
            self.flatness > 0 and any(self._layer_w[n] > 0 for n in self.layer_names)
        ):
            raise ValueError("Expected `layer_weights` and `relation_weights` to leave at least one positive term, but all are 0")
        acting = [r for r in rels if self._rel_w[r] > 0]  # a relation of weight 0 needs none of its matrices
        needed = {m for r in acting for m in CF.RELATION_PAIRS[r]}
        self._needs_g: tuple[str, ...] = tuple(m for m in G_MATRICES if m in needed)
        # output rows: for H_b, and for the free ⟨H_a, Z_a⟩ = ‖F Wᵀ‖² of exact f-RWA
        self._needs_out_rows = "H_b" in needed or ("f-RWA" in acting and self.estimator == "exact")

    def _init_state(self) -> None:
        """Hooks, captures, G averages and counters of a freshly built loss."""
        self.calls = 0
        self._inert_warned = False
        self._captures: dict[str, list[LayerCapture]] = {}
        self._ema: dict[str, dict[str, Tensor]] = {}
        self._ema_updates: dict[str, int] = {}
        # g_mode="ema": each call's G rows of the last backward pass, by layer and matrix, folded into the
        # averages together (one update per backward pass, however often the layer ran) at the next pass
        self._pending_g: dict[str, dict[str, list[Tensor]]] = {}
        #: ``{layer: {relation: α}}`` of the last call (detached 0-d tensors; no host sync until read).
        self.last_alignment: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ configuration
    @property
    def weight(self) -> float:
        """Overall strength (``≥ 0``); 0 makes the call an exact, free zero."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = check_nonnegative("weight", value)

    @staticmethod
    def _check_weights(
        arg: str, given: Mapping[str, float] | None, allowed: Sequence[str], show: Callable[[str], str]
    ) -> dict[str, float]:
        out = {k: 1.0 for k in allowed}
        if given is None:
            return out
        if not isinstance(given, Mapping):
            raise TypeError(f"Expected `{arg}` to be a mapping name -> float, but got {type(given).__name__}")
        for k, v in given.items():
            if k not in out:
                raise ValueError(f"Expected `{arg}` keys from {[show(a) for a in allowed]}, but got {k!r}")
            out[k] = check_nonnegative(f"{arg}[{k!r}]", v)
        return out

    @property
    def uses_g(self) -> bool:
        """Whether any requested relation involves ``G_a`` or ``G_b``."""
        return bool(self._needs_g)

    def extra_repr(self) -> str:
        return (
            f"relations={list(self.relations)}, layers={[_display(n) for n in self.layer_names]}, "
            f"metric={self.metric!r}, preprocess={self.preprocess!r}, weight={self.weight}, g_mode={self.g_mode!r}, "
            f"flatness={self.flatness}, focus={self.focus}, warmup={self.warmup}, estimator={self.estimator!r}"
            + (f", probes={self.probes}, seed={self.seed}" if self.estimator == "hutchinson" else "")
        )

    # ------------------------------------------------------------------ lifecycle
    def _new_capture(self, layers: LayerSpec) -> Capture:
        """The capture engine (:class:`canonreg.capture.Capture`) on ``layers`` of the model, not attached."""
        return Capture(
            self.model,
            layers,
            owner_kind="AlignmentLoss",
            on_call=self._on_call,
            on_root=self._on_root,
            taps=self._tap_types,
            nonfinite=None,  # the loss checks its own terms (one host sync per call at most)
            need_grad=False,  # H and Z terms need no gradient of the output
            on_masked_out=self._refuse_masked_out,
        )

    @property
    def attached(self) -> bool:
        return self._capture is not None and self._capture.attached

    def attach(self) -> AlignmentLoss:
        """Install the hooks (idempotent; done at construction). Coexists with a CRHMonitor.

        Raises:
            CanonRegError: another AlignmentLoss is attached to this model.
        """
        if self._capture is None:  # a copy of a loss: a new capture on the copy's model
            self._capture = self._new_capture(list(self.layer_names))
        self._capture.attach()
        return self

    def detach(self) -> AlignmentLoss:
        """Remove every hook and drop captured tensors (idempotent); the G averages are kept."""
        if self._capture is not None:
            self._capture.detach()
        self._captures = {}
        return self

    def __enter__(self) -> AlignmentLoss:  # noqa: PYI034
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget captured tensors, the G moving averages and the call count, and re-seed the probe generator
        (with ``seed``); hooks stay as they are."""
        self.calls = 0
        if self._probe_gen is not None and self.seed is not None:
            self._probe_gen.manual_seed(self.seed)
        self._captures = {}
        self._ema = {}
        self._ema_updates = {}
        self._pending_g = {}
        self.last_alignment = {}

    def get_extra_state(self) -> dict[str, Any]:
        """The G moving averages, weight, call count and, with ``seed``, the probe generator's state
        (``state_dict()['_extra_state']``); configuration is not state."""
        self._fold_pending_g()
        state: dict[str, Any] = {
            "ema": {n: {k: v.detach().cpu().clone() for k, v in d.items()} for n, d in self._ema.items()},
            "ema_updates": dict(self._ema_updates),
            "weight": self._weight,
            "calls": self.calls,
        }
        if self._probe_gen is not None:
            state["probe_rng"] = self._probe_gen.get_state()
        return state

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state`; every entry is checked (G averages against this model's layer widths)
        before anything is replaced, so a refused state leaves the loss as it was."""
        if not isinstance(state, dict) or not {"ema", "ema_updates", "weight"} <= set(state):
            raise ValueError("Expected an AlignmentLoss state with keys 'ema', 'ema_updates', 'weight'")
        ema_state, updates = state["ema"], state["ema_updates"]
        if not isinstance(ema_state, Mapping) or not isinstance(updates, Mapping):
            raise ValueError("Expected the state's 'ema' and 'ema_updates' to be mappings by layer name")
        unknown = set(ema_state) - set(self.layer_names)
        if unknown:
            raise ValueError(f"Expected G averages for layers {list(self.layer_names)}, but the state has {sorted(unknown)}")
        for name, mats in ema_state.items():
            d_b, d_a = read_weight(self._taps[name], self._modules_by_name[name]).shape
            widths = {"G_a": d_a, "G_b": d_b}
            if not isinstance(mats, Mapping) or not set(mats) <= set(widths):
                raise ValueError(f"Expected the G averages of layer {name!r} to map 'G_a'/'G_b' to matrices, but got {mats!r}")
            for k, v in mats.items():
                if not isinstance(v, Tensor) or tuple(v.shape) != (widths[k], widths[k]):
                    got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                    raise ValueError(
                        f"Expected the state's {k} average of layer {name!r} to be {widths[k]} × {widths[k]} (this model's "
                        f"width), but got {got}: a state saved for another model"
                    )
        for n, c in updates.items():
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"Expected the state's 'ema_updates' of layer {n!r} to be a non-negative int, but got {c!r}")
        calls = state.get("calls", 0)
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"Expected the state's 'calls' to be a non-negative int, but got {calls!r}")
        rng = state.get("probe_rng")
        if rng is not None and (not isinstance(rng, Tensor) or rng.dtype != torch.uint8):
            raise ValueError(f"Expected the state's 'probe_rng' to be a torch.uint8 generator state, but got {rng!r}")
        weight = check_nonnegative("weight", state["weight"])  # the constructor's rule
        self._ema = {n: {k: v.to(torch.float64).clone() for k, v in d.items()} for n, d in ema_state.items()}
        self._ema_updates = {n: int(c) for n, c in updates.items()}
        self._pending_g = {}
        self.weight = weight
        self.calls = calls
        self._load_probe_rng(rng)

    def _load_probe_rng(self, rng: Tensor | None) -> None:
        """Restore the probe generator from a state's ``"probe_rng"`` (checked by :meth:`set_extra_state`; None: keep
        it as it is)."""
        if rng is None:
            return
        if self._probe_gen is None:
            warnings.warn(
                "AlignmentLoss.load_state_dict: the state holds a probe generator (saved with `seed`), but this loss "
                "has seed=None and draws its probes from torch's global generator; the saved generator is ignored",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self._probe_gen.set_state(rng)

    def __getstate__(self) -> dict[str, Any]:
        """A pickle or deep copy of the loss is *detached* (call ``.attach()`` on it to use it).

        Its model is the copy's (the same object when the model is copied along, e.g. a LightningModule
        that holds both); the original stays attached. The model's hooks never travel with a copy
        (:class:`canonreg.layers.OwnedHook`), so EMA/SWA copies (``AveragedModel``) and checkpoints of a
        model with an attached loss are plain models.
        """
        state = dict(self.__dict__)
        state["_capture"] = None  # never copied (canonreg.capture): attach() builds a new one
        state["_captures"] = {}
        state["last_alignment"] = {}
        return state

    # ------------------------------------------------------------------ capture callbacks
    def _on_root(self) -> None:
        # a new ordinary pass (the engine leaves out torch.func transforms and substituted parameters,
        # which neither are captured nor clear the last ordinary pass: canonreg.layers.untraced_call)
        self._captures = {}
        self._fold_pending_g()

    def _refuse_masked_out(self, name: str) -> None:
        raise CanonRegError(
            f"AlignmentLoss: every position of this call of layer {_display(name)!r} is masked out "
            "(canonreg.taps.masked); the loss needs at least one real position per pass"
        )

    def _on_call(self, call: LayerCall) -> Backward | None:
        output, module, tap = call.output, call.module, call.tap
        x = call.inputs[0] if call.inputs else None
        rows_b = None
        if self._needs_out_rows:
            with torch.enable_grad():  # differentiable rows (the engine calls under no_grad)
                # A copy (differentiable, cheap next to the layer's matmul): an in-place op after the layer,
                # e.g. nn.ReLU(inplace=True), would otherwise overwrite h_b before the loss reads it.
                rows_b = call.output_rows(detach=False)
                if call.keep is None and (rows_b._is_view() or rows_b is output):
                    rows_b = rows_b.clone()
        cap = LayerCapture(
            module,
            call.inputs,
            output,
            rows_b,
            x._version if isinstance(x, Tensor) else 0,
            output._version,
            read_weight(tap, module)._version,
            tap,
            call.keep,
        )
        self._captures.setdefault(call.name, []).append(cap)
        if self._needs_g and self.g_mode == "ema":
            # batch: undoes the 1/B of a batch-mean loss. The callback holds the loss weakly: the loss holds
            # this output (a tensor hook referring back to its tensor is a cycle the collector cannot see)
            return Backward(partial(_to_loss, weakref.ref(self), call.name, module, tap, float(call.batch_size)))
        return None

    def _on_grad(self, name: str, module: nn.Module, tap: LayerTap, batch: float, rows: Tensor) -> None:
        """Keep one call's gradient rows ``g_b = −dℓ/dh_b`` (and ``g_a = g_b W``, with this step's ``W``) until
        the pass's calls are folded together (:meth:`_fold_pending_g`)."""
        gb = rows.detach() * (-batch)  # g = −dℓ/dh per sample
        pending = self._pending_g.setdefault(name, {})
        if "G_b" in self._needs_g:
            pending.setdefault("G_b", []).append(gb)
        if "G_a" in self._needs_g:
            pending.setdefault("G_a", []).append(gb @ _work(read_weight(tap, module).detach()))
        if len(next(iter(pending.values()))) >= len(self._captures.get(name, ())):  # every call of the pass is in
            self._fold_pending_g(name)

    def _fold_pending_g(self, only: str | None = None) -> None:
        """Fold the pending G rows of every layer (or of layer ``only``) into its moving averages: one update
        per layer and backward pass, with the moments of all its calls' rows together (centred and normalised
        like ``H``). Runs when a pass's every call has its gradient, else at the next pass or loss call."""
        names = list(self._pending_g) if only is None else [only]
        for name in names:
            by_matrix = self._pending_g.pop(name)
            self._fold_g(name, {k: CF.second_moment(cat_rows(rows), self.preprocess) for k, rows in by_matrix.items()})

    def _fold_g(self, name: str, new: dict[str, Tensor]) -> None:
        """``G ← β G + (1 − β) new`` for each matrix of one backward pass of layer ``name``."""
        if not all(bool(torch.isfinite(v).all()) for v in new.values()):
            handle_nonfinite(
                self.nonfinite,
                f"Non-finite gradients reached layer {_display(name)!r}",
                hint="its G average was not updated (pass nonfinite='skip' to drop such backward passes silently)",
                consequence="its G average was not updated",
            )
            return
        ema = self._ema.setdefault(name, {})
        beta = self.ema_decay
        for k, v in new.items():
            v = v.to(torch.float64)
            if k in ema:
                ema[k] = ema[k].to(v.device).mul_(beta).add_(v, alpha=1.0 - beta)
            else:
                ema[k] = v.clone()
        self._ema_updates[name] = self._ema_updates.get(name, 0) + 1

    # ------------------------------------------------------------------ the loss
    def forward(self, task_loss: Tensor | None = None) -> Tensor:
        """The weighted mean of ``1 − α`` over layers and relations, times ``weight``.

        Args:
            task_loss: the scalar task loss of the current pass; required with ``g_mode="exact"`` when a
                G relation is requested (it is differentiated with ``create_graph=True``), ignored otherwise.

        Returns:
            0-d tensor in the dtype of the layer weights (at least float32), on their device.

        Raises:
            CanonRegError: no grad-enabled forward pass since attaching; a selected layer did not run in the
                last pass; a layer input or weight was modified in place after the forward pass (e.g.
                ``optimizer.step()`` before the call), or, with ``g_mode="exact"``, a layer output (e.g.
                ``nn.ReLU(inplace=True)`` right after it);
                ``g_mode="ema"`` before any backward pass reached a layer (``ema_warmup="error"``);
                a NaN α (``nonfinite="error"``).
            ValueError: ``g_mode="exact"`` with G relations and no ``task_loss``.
        """
        ref = next(iter(self._modules_by_name.values()))
        w0 = read_weight(self._taps[self.layer_names[0]], ref)
        out_dtype = w0.dtype if w0.dtype in (torch.float32, torch.float64) else torch.float32
        calls = self.calls + 1  # counted when the call returns (a call that raises does not move the ramp)
        scale = self._weight * (min(1.0, calls / self.warmup) if self.warmup else 1.0)
        if scale == 0.0:
            self.calls = calls
            return torch.zeros((), dtype=out_dtype, device=w0.device)
        if not self.attached:
            raise CanonRegError("AlignmentLoss is detached: call .attach() (or use `with align:`) before the forward pass")
        if not self._captures:
            raise CanonRegError(
                "AlignmentLoss was called before any grad-enabled forward pass of the model since it was attached "
                "(or since the last pass began): run `out = model(x)` first, then `loss = task + align()`. Passes inside "
                "torch.func transforms (vmap/grad) or through torch.func.functional_call with substituted parameters "
                "are not captured"
            )
        exact_g = bool(self._needs_g) and self.g_mode == "exact"
        self._fold_pending_g()  # a backward pass since the last forward pass (ema)
        check_captures(self._captures, self.layer_names, self._taps, exact_g)
        grads = self._exact_grads(task_loss) if exact_g else {}
        with torch.autocast(device_type=w0.device.type, enabled=False):
            terms = self._collect_terms(grads)
        self.last_alignment = {}
        if not terms.where and not terms.flat_where:
            self.calls = calls
            return torch.zeros((), dtype=out_dtype, device=w0.device)
        self._check_can_act(terms)
        vals, weights, where, self.last_alignment = term_values(terms, self.metric, self.estimator)
        value = (scale * self._aggregate(vals, weights, where)).to(out_dtype)
        self.calls = calls
        return value

    # ------------------------------------------------------------------ terms
    def _collect_terms(self, grads: Mapping[str, list[Tensor]]) -> Terms:
        """The five scalar moments of every (layer, relation) term and the flatness terms."""
        terms = Terms()
        for name in self.layer_names:
            ops = self._operands(name, grads)
            sketches: dict[str, Tensor] = {}  # matrix name → its (centred) sketch, shared by relations
            if self.estimator == "hutchinson":
                gram_pair_sketches(ops, sketches, self.probes, self._probe_gen)
            for rel in self.relations:
                wt = self._layer_w[name] * self._rel_w[rel]
                a_name, b_name = CF.RELATION_PAIRS[rel]
                a, b = ops.get(a_name), ops.get(b_name)
                if wt == 0.0 or a is None or b is None:
                    continue  # zero weight, or G average not yet available with ema_warmup="skip"
                pieces = term_pieces(
                    ((a_name, a), (b_name, b)), sketches, metric=self.metric, estimator=self.estimator, probes=self.probes, generator=self._probe_gen
                )
                terms.add((name, rel), wt, _dim(a) ** 2, pieces)
            flat_w = self._layer_w[name] * self.flatness
            if flat_w > 0:
                terms.flats.append(spectral_flatness(_work(read_weight(self._taps[name], self._captures[name][0].module))))
                terms.flat_where.append(name)
                terms.flat_weights.append(flat_w)
        return terms

    def _aggregate(self, vals: Tensor, weights: list[float], where: list[tuple[str, str]]) -> Tensor:
        """The weighted mean (``focus=None``) or soft maximum of the finite terms (policy ``nonfinite``)."""
        wts = torch.tensor(weights, dtype=vals.dtype, device=vals.device)
        finite = torch.isfinite(vals)
        if self.nonfinite != "skip" and not bool(finite.all()):  # one host sync
            bad = [f"{_display(n)!r}/{r}" for (n, r), ok in zip(where, finite.tolist()) if not ok]
            msg = f"AlignmentLoss: α is undefined (a zero or constant matrix, or non-finite activations) for {bad}"
            if self.nonfinite == "error":
                raise CanonRegError(msg + "; pass nonfinite='skip' or 'warn' to leave such terms out")
            warnings.warn(msg + "; left out of the mean", RuntimeWarning, stacklevel=3)
        return aggregate(vals, wts, finite, self.focus)

    # ------------------------------------------------------------------ internals
    def _check_can_act(self, terms: Terms) -> None:
        """Raise if no term can reach a parameter (frozen model); warn once naming the layers that cannot act."""
        if not torch.is_grad_enabled():
            return
        inert, layers = inert_layers(terms)
        if len(inert) == layers:
            raise CanonRegError(
                f"AlignmentLoss cannot act: none of its terms depends on a parameter that requires grad (selected layers "
                f"{inert}; are their weights and every earlier layer frozen?). Unfreeze them or select trainable layers "
                "with `layers=`"
            )
        if inert and not self._inert_warned:
            self._inert_warned = True
            warnings.warn(
                f"AlignmentLoss: layers {inert} cannot act (their terms depend on no parameter that requires grad: "
                "frozen weights and frozen inputs); their terms only add a constant",
                RuntimeWarning,
                stacklevel=3,
            )

    def _exact_grads(self, task_loss: Tensor | None) -> dict[str, list[Tensor]]:
        outs = [(n, c.output) for n in self.layer_names for c in self._captures[n]]
        return task_gradients(task_loss, outs, self.relations)

    def _operand_dtype(self, t: Tensor) -> Tensor:
        """The working dtype of a term's operands: at least float32; float64 for ``raw`` + ``pearson``, whose
        entry-centring subtracts pieces that grow with the rows' mean (``‖H‖² − (1ᵀH1)²/d²`` with
        ``H ≈ μμᵀ + C``): float32 pieces of inputs 1000 + N(0, 1) left nothing of ``C`` (α wrong or undefined)."""
        return t.to(torch.float64) if self._float64_terms else _work(t)

    @property
    def _float64_terms(self) -> bool:
        return self.preprocess == "raw" and self.metric == "pearson"

    def _sketched(self, dim: int) -> bool:
        """Whether a side of width ``dim`` is sketched (``estimator="hutchinson"`` and ``dim > probes``)."""
        return is_sketched(self.estimator, self.probes, dim)

    def _rows(self, x: Tensor, image: Tensor | None = None) -> RowMoment | LazyRowMoment:
        """The moment of rows ``x``: lazy (raw rows) on a sketched side, else factored (:func:`row_moment`)."""
        return LazyRowMoment(x, self.preprocess) if self._sketched(x.shape[1]) else row_moment(x, self.preprocess, image=image)

    def _operands(self, name: str, grads: Mapping[str, list[Tensor]]) -> dict[str, SketchOperand | None]:
        caps = self._captures[name]
        tap = self._taps[name]
        module = caps[0].module
        work = self._operand_dtype
        w = work(read_weight(tap, module))
        needed = {m for r in self.relations for m in CF.RELATION_PAIRS[r]}
        ops: dict[str, SketchOperand | None] = {}
        shared: dict[str, Tensor] = {}
        if "Z_a" in needed:
            ops["Z_a"] = WeightGram(w, "a", shared)
        if "Z_b" in needed:
            ops["Z_b"] = WeightGram(w, "b", shared)
        out_rows = None
        if self._needs_out_rows:
            out_rows = cat_rows([work(c.rows_b) for c in caps if c.rows_b is not None])
        if "H_a" in needed:
            x = cat_rows([work(take_rows(c.tap.input_rows(c.module, c.inputs), c.keep)) for c in caps])
            image = None
            # h_b − b is x Wᵀ as the layer rounded it: not float64 (see _operand_dtype)
            exact_image = type(module) in _EXACT_AFFINE and not self._float64_terms
            if "f-RWA" in self.relations and exact_image and out_rows is not None and not self._sketched(x.shape[1]):
                bias = tap.bias(module)
                image = out_rows - work(bias) if bias is not None else out_rows
            ops["H_a"] = self._rows(x, image)
        if "H_b" in needed:
            assert out_rows is not None
            ops["H_b"] = self._rows(out_rows)
        if self._needs_g and self.g_mode == "exact":
            gb = work(task_g_rows(caps, grads[name]))
            if "G_b" in needed:
                ops["G_b"] = self._rows(gb)
            if "G_a" in needed:
                ops["G_a"] = self._rows(gb @ w)
        elif self._needs_g:
            ops.update(ema_g_operands(name, self._ema.get(name, {}), self._needs_g, self.ema_warmup, like=w))
        return ops



def _to_loss(ref: weakref.ref[AlignmentLoss], name: str, module: nn.Module, tap: LayerTap, batch: float, rows: Tensor) -> None:
    """Hand one call's gradient rows to its loss, if the loss still exists."""
    loss = ref()
    if loss is not None:
        loss._on_grad(name, module, tap, batch, rows)


#: Module types whose output is exactly ``W h_a + b`` row by row (so ``h_a Wᵀ = h_b − b``).
_EXACT_AFFINE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


_work = at_least_float32


# ====================================================================== preset
#: The configuration :func:`crh_loss` returns (see its docstring for the measurement behind it).
CRH_PRESET: dict[str, Any] = {
    "relations": "all",
    "metric": "pearson",
    "preprocess": "normalized",
    "g_mode": "exact",
    "weight": 1.0,
    "flatness": 0.0,
    "focus": 0.05,
    "warmup": 0,
}


def inner_layers(model: nn.Module, taps: dict[type[nn.Module], LayerTap] | None = None) -> list[str]:
    """The default-selected layers of ``model`` without the first and the last (in registration order).

    The first layer's input is the data (its ``H_a`` is fixed) and the last is the head; the layers
    in between are the "inner" ones whose input is itself learned. With fewer than three layers every
    layer is returned.
    """
    roles = layer_roles(list(select_layers(model, None, taps)[0]))
    inner = [n for n, role in roles.items() if role == "inner"]
    return inner or list(roles)


def crh_loss(model: nn.Module, *, weight: float | None = None, layers: LayerSpec = None, **overrides: Any) -> AlignmentLoss:
    """canonreg's best measured trade-off for full CRH: an :class:`AlignmentLoss` on the inner layers.

        L = weight · τ · log( (1/|T|) Σ_{(l,r) ∈ T} exp((1 − α_{l,r}) / τ) ),   T = inner layers × six relations,

    a soft maximum (``focus = τ = 0.05``) of ``1 − α`` over all six relations of every inner layer, α the
    Pearson score of normalized moments (the monitor's protocol), ``G`` the *task* loss's gradient by
    double backprop (``g_mode="exact"``), i.e. ``AlignmentLoss(model, relations="all",
    layers=inner_layers(model), **CRH_PRESET)``. Use it as ``loss = task + align(task)``. Cost: one
    extra backward with graph plus 18 α terms; about 10× a plain step of a small MLP on the CPU.

    Why this one (``benchmarks/results/crh_reach.md``, MNIST-1D MLP 40-128×4-10, SGD, 3000 steps,
    3 seeds, α measured after training on the whole training set with the task gradient only):
    against a weighted *mean* of the 18 terms the soft maximum lifts the worst relation (0.37 → 0.77
    at λ = 1, 2000 steps, same accuracy) because the mean spends its gradient on relations that
    already hold; a spectral-flatness term (the shared structure of theory §6) and a joint
    f-RWA + b-GWA + flatness objective did not help under normalized/pearson scoring. Full CRH at
    baseline accuracy was *not* reached: min α over the inner layers 0.55 / 0.78 / 0.87 at
    λ = 0.1 / 1 / 3 for −2.1 / −4.1 / −11.9 points of test accuracy (best plain baseline 73.4 %,
    min α 0.17–0.27); the first inner layer's f-RGA (``H_a ∝ G_a``) lags longest. ``weight = 1`` is
    the knee of that front. On a 1-D CNN (``crh_reach_cnn1d.md``, 3 seeds, 1500 steps) the same preset
    reached min α 0.83 at λ = 1 for −1.7 ± 2.7 points and 0.91 (full CRH in both inner conv layers)
    at λ = 3 for −9.0 ± 7.6 points.

    Args:
        model: the model to shape.
        weight: overall strength (default: the preset's).
        layers: which layers (default: :func:`inner_layers`).
        **overrides: any other :class:`AlignmentLoss` keyword, replacing the preset's value.

    Raises:
        TypeError: an override that :class:`AlignmentLoss` does not accept (named in the message).
    """
    allowed = set(inspect.signature(AlignmentLoss.__init__).parameters) - {"self", "model", "layers", "weight"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"Expected `crh_loss` overrides from {sorted(allowed)}, but got {unknown}")
    kwargs = {**CRH_PRESET, **overrides}
    if weight is not None:
        kwargs["weight"] = weight
    taps = kwargs.get("taps")
    return AlignmentLoss(model, layers=inner_layers(model, taps) if layers is None else layers, **kwargs)
