"""CRHMonitor: streaming measurement of the six CRH relations during ordinary training.

For every monitored layer ``h_b = W h_a + b`` the monitor accumulates, inside the user's own
forward and backward passes, sums of the preprocessed rows (theory §1–§3):

    S_xx(H_a) = Σ_i h̃_a h̃_aᵀ,  S_x(H_a) = Σ_i h̃_a,   and the same for G_b (and, when needed, H_b, G_a)

where ``h̃`` is the row after preprocessing (identity for ``raw``/``centered``, ``h/‖h‖`` for
``normalized``). In ``raw``/``centered`` mode the exact identities ``H_b = W H_a Wᵀ (+ bias terms)``
and ``G_a = Wᵀ G_b W`` replace two of the four accumulations; they use the weights at
``compute()`` time (exact when the weights did not change during the window; pass
``identities=False`` to accumulate ``H_b`` and ``G_a`` directly). Normalisation breaks the
identities, so ``normalized`` mode always accumulates all four.

Precision: per-step products are taken in the model's dtype, upcast to at least float32 (half and
bfloat16 models are upcast). Centred moments (``centered``, ``normalized``) never subtract ``n μ μᵀ``
from a raw second moment: a window of at most ``16`` committed calls accumulates the rows shifted by
the window's first-call mean and divided by a power of two (so float32 products neither cancel for
data like ``1000 + N(0, 1)`` nor overflow/underflow for scales of ``1e±30``); each window is merged
into float64 ``(n, mean, M2)`` totals with Chan's parallel update (:mod:`canonreg.moments`). Row norms,
the finiteness checks and the balance scalars are float64. ``compute()`` works in float64.

Samples and commits: a layer call counts only once the backward pass reaches its output, so
``H`` and ``G`` always cover the same rows, and grad-enabled forward passes without a backward
(for example a validation pass without ``torch.no_grad()``) are ignored.

Gradient scale: a hook sees ``dL/dh_b``; with a loss that is a mean over the batch this is
``(1/B) dℓ_i/dh_b``. ``grad_scale="batch"`` (default) multiplies by the batch size ``B`` (the first
dimension of the layer's input, 1 for unbatched inputs; a tap may define ``batch_size``) to recover
per-sample gradients ``g = −dℓ_i/dh``; ``"none"`` is right for sum-reduced losses; a float multiplies
by that number (e.g. ``B·T`` for a loss that averages over ``T`` tokens per sequence *and* you want
per-token gradients, or when the batch is not the first dimension). The alignment scores, exponents
and ranks are invariant to this scale; ``matrices()`` (the ``G``) and the balance terms are not.

Gradient accumulation: with ``k`` micro-batches per optimizer step, each loss divided by ``k``, the
hooks see ``1/k`` of the per-sample gradients; ``accumulation=k`` multiplies them back (with any
``grad_scale``), so ``G`` and the balance terms equal those of the one full batch (pass the full
batch size to ``compute(batch_size=...)``). With ``accumulation=None`` (default) the monitor
watches the weights' ``.grad``: backward passes that add into a ``.grad`` nobody reset since the
previous backward, followed by an in-place update of the weights (an optimizer step), raise one
RuntimeWarning asking for ``accumulation=k`` (or ``accumulation=1``). Accumulated passes without a
weight update (a measurement loop over batches that never zeroes ``.grad``) are not flagged: each pass
is then an ordinary batch mean. The detection is best effort (wrappers that rewrite ``.grad`` in
place, such as DDP's all-reduce, hide it; :mod:`canonreg.grad_accumulation`).

References: Ziyin, Chuang, Galanti & Poggio, arXiv:2410.03006 (CRH/PAH); Ziyin, Wang, Li & Wu,
arXiv:2402.07193 (noise equilibrium).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import weakref
from typing import Literal

import torch
from torch import Tensor, nn

from . import functional as F
from . import sketch as _sketch
from .capture import CallStats, Capture, LayerCall, Policy, handle_nonfinite
from .errors import (
    CanonRegError,
    check_bool,
    check_choice,
    check_nonnegative,
    check_nonnegative_int,
    check_positive,
    check_positive_int,
    check_seed,
    renamed_arguments,
)
from .grad_accumulation import AccumulationCheck, weight_leaf
from .layers import (
    HookSet,
    LayerSpec,
    _display,
    all_reduce_flat,
    at_least_float32,
    check_layer_weight,
    read_weight,
    world_size,
)
from .moments import (
    _ACCUMULATORS,
    _FOLD_EVERY,
    _MOMENTS,
    RowNorms,
    _Accumulator,
    _balance_sums,
    _CallMoment,
    _inverse_norm,
    _LayerState,
    _Moment,
    _narrow,
    _normalize,
    _row_norm2,
)
from .report import CRHReport, ReportInputs, ReportOptions, build_report
from .taps import LayerTap, LinearTap, functional_only_children, kept_rows, leading_shape, tap_batch_size

__all__ = ["CRHMonitor"]

GradScale = Literal["batch", "none"]


class CRHMonitor:
    """Measure the six CRH relations (and PAH exponents, ranks, balance terms) on any model.

    For each selected layer ``h_b = W h_a + b`` (theory §1) the monitor estimates

        H_a = E[h̃_a h̃_aᵀ]   G_a = E[g̃_a g̃_aᵀ]   Z_a = WᵀW
        H_b = E[h̃_b h̃_bᵀ]   G_b = E[g̃_b g̃_bᵀ]   Z_b = WWᵀ

    over every sample row seen between ``reset()`` and ``compute()``, with ``g_b = −dℓ_i/dh_b`` per
    sample, ``g_a = Wᵀ g_b`` and ``x̃`` the preprocessed row (``E[x xᵀ]`` raw, covariance centred,
    covariance of ``x/‖x‖`` normalized). Rows: every leading position for Linear layers, every
    output position for convolutions (see :mod:`canonreg.taps`).

    Cost of a collected step: per layer one ``n × d`` Gram per accumulated matrix (``H_a``, ``G_b``
    in raw/centered mode with the identities; also ``H_b``, ``G_a`` in normalized mode or with
    ``identities=False``), computed upper-triangle-only on row panels (``1/2 + 64/d`` of a full
    matmul, 128-row panels). A plain Linear layer with a narrow side takes ``H_b`` (narrow input) or
    ``G_a`` (narrow output) from the per-call identity instead (an ``m × m`` Gram of the narrow rows,
    ``m = d_a + 1`` or ``d_b``). Against the ``3·n·d_a·d_b`` multiply-adds of a layer's own forward and
    backward, each ``d × d`` Gram costs at least ``n·d²/2``, i.e. ``+1/6`` of a square layer: at MLP
    40 → 1024 ×4 → 10, batch 512 (9.55 M multiply-adds per row for the plain step), the 8 Grams of
    raw/centered and the 14 of normalized put the floor of an exact monitor at 1.44× and 1.77× (a
    perfect symmetric rank-k update at the plain step's flop rate; 1.49× and 1.87× with the panels).
    For a convolution ``h_a`` is the unfolded patch (``C_in·k²`` columns), so its Gram can
    cost several times the convolution itself. ``every=k`` divides the cost by ``k``; ``max_rows``
    caps ``n``; ``sketch=k`` replaces each Gram by ``2·n·d·(k + 1)`` (below). See
    ``benchmarks/monitor_overhead.py``.

    Args:
        model: the model to monitor (hooks go on its submodules; the model itself is never changed).
            A ``DistributedDataParallel`` wrapper works; layer names then start with ``"module."``.
            ``nn.DataParallel`` is not supported: its per-device replicas are copies, and the hooks
            record only the modules they were installed on.
        layers: which layers (see :mod:`canonreg.layers`); default every Linear/Conv layer.
        preprocess: ``"raw" | "centered" | "normalized"`` (default, the paper's protocol).
        metric: ``"pearson"`` (default, the paper's score) or ``"cosine"``.
        every: collect on every ``every``-th grad-enabled forward call of ``model`` (calls 1,
            1 + every, 1 + 2·every, …); the backward pass of a skipped call costs nothing.
        max_rows: keep at most this many uniformly chosen rows per layer call (None = all rows); the
            same rows are used for ``h_a``, ``h_b`` and the gradients.
        grad_scale: ``"batch" | "none" | float``, see the module docstring.
        accumulation: micro-batches per optimizer step whose losses are each divided by it (gradients
            are multiplied back); None: 1, and warn once when accumulated backward passes followed by a
            weight update are detected.
        identities: derive ``H_b``, ``G_a`` from the exact identities in raw/centered mode.
        track_balance: accumulate the per-sample products the balance terms need.
        nonfinite: ``"error" | "warn" | "skip"`` for non-finite activations or gradients; ``"warn"``
            and ``"skip"`` drop the offending layer call (counted in ``report.skipped``).
        defer_checks: where the finiteness checks of ``nonfinite`` run. ``False``: in the hook, one
            host sync per half of a layer call (the error surfaces at the very call). ``True``: one host read
            per ``16`` calls in the hooks (the flag of the call that opens a window, whose shift and scale the
            window keeps); every other contribution is masked on the device (``torch.where``, so a non-finite
            call adds exactly nothing), and the flags are read once per ``16`` committed calls of a layer
            and in ``compute()``; the policy then acts (raise / warn / count as skipped) naming the
            same layer and call, up to 16 calls later. Measured on an H200 with the previous release
            (MLP 4×1024, batch 4096, ``benchmarks/results/monitor_overhead_cuda_*.json``, 2 rounds):
            slower at every step (4.75× vs 4.15× plain, centered; the cost there is kernel launches,
            not syncs), faster with ``every=10`` (1.14× vs 1.29×); so the default stays ``False``.
            Deferring costs ~8–11 kernels per layer call more than checking in the hook and saves its
            2 syncs (``python benchmarks/launches.py``; not re-timed on a GPU). ``None``: deferred
            on accelerators, immediate on the CPU.
        on_missing: ``"error" | "warn" | "skip"`` for requested layers that recorded no samples.
        taps: extra ``{module type: tap}`` for this monitor only.
        sync_dist: all-reduce across ``torch.distributed`` ranks in ``compute()`` (a collective call:
            every rank must call ``compute()``).
        seed: seed of the row sub-sampling generator and of the sketch's probes.
        sketch: None (default, exact) or ``k``: keep every moment as a ``d × (k + 1)`` sketch ``M [Ω, 1]``
            (fixed orthogonal Gaussian probes per layer side; :mod:`canonreg.sketch`) for wide layers:
            ``2·n·d·(k + 1)`` per moment and step instead of ``n·d²/2``, ``d·(k + 1)`` float64 entries of
            state instead of ``d²``; all four moments are accumulated (the identities need full
            matrices), so it pays for layers wider than about ``4(k + 1)``. ``compute()`` then gives the
            six α as ratios of unbiased estimates (exact when ``k ≥ d``; measured ``max |α̂ − α|``
            0.04–0.065 at ``k = 32``, 0.007–0.010 at ``k = 512`` on a trained MLP of width 1024,
            ``benchmarks/results/monitor_sketch_error.json``) and the balance terms
            exactly; exponents, effective ranks and ``report.matrices()`` need the full matrices:
            ``compute()`` raises unless ``exponents=False, ranks=False``, and the report holds no matrices.

    torch.func and torch.compile: calls inside ``torch.func`` transforms (``vmap``, ``grad``, …) and calls
    through ``torch.func.functional_call`` with substituted parameters are not recorded (they are not
    training samples, and the module's own weights did not run; :func:`canonreg.layers.untraced_call`);
    a layer that ran only such calls is reported missing with that reason. Attach before
    ``torch.compile``; attaching to a model already compiled raises :class:`CanonRegError`.

    Lifecycle: ``attach()``/``detach()`` are idempotent; ``with monitor:`` blocks nest, each restoring
    the attachment it found (an inner block inside an outer one, or inside ``attach()``, leaves the
    monitor attached).

    Raises:
        ValueError / TypeError: bad arguments (named in the message); no layer matches ``layers``.
        CanonRegError: an unsupported layer requested explicitly (no tap, grouped convolution); a
            zero-width layer; (at ``attach``) a layer whose weight is on the meta device.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> monitor = CRHMonitor(model)
        >>> with monitor:
        ...     loss = model(torch.randn(32, 8)).square().mean()
        ...     loss.backward()
        >>> report = monitor.compute()
        >>> sorted(report.alignment["0"]) == sorted(canonreg.RELATIONS)  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        preprocess: F.Preprocess = "normalized",
        metric: F.Metric = "pearson",
        every: int = 1,
        max_rows: int | None = None,
        grad_scale: GradScale | float = "batch",
        accumulation: int | None = None,
        identities: bool = True,
        track_balance: bool = True,
        nonfinite: Policy = "error",
        on_missing: Policy = "error",
        taps: dict[type[nn.Module], LayerTap] | None = None,
        sync_dist: bool = True,
        seed: int = 0,
        defer_checks: bool | None = False,
        sketch: int | None = None,
    ) -> None:
        check_choice("preprocess", preprocess, F.PREPROCESS_MODES)
        check_choice("metric", metric, ("pearson", "cosine"))
        check_positive_int("every", every)
        if max_rows is not None:
            check_positive_int("max_rows", max_rows)
        if isinstance(grad_scale, str):
            check_choice("grad_scale", grad_scale, ("batch", "none"))
        else:
            check_positive("grad_scale", grad_scale)
        check_bool("identities", identities)
        check_bool("track_balance", track_balance)
        check_bool("sync_dist", sync_dist)
        check_choice("nonfinite", nonfinite, ("error", "warn", "skip"))
        check_choice("on_missing", on_missing, ("error", "warn", "skip"))
        check_seed("seed", seed)
        if accumulation is not None:
            check_positive_int("accumulation", accumulation)
        if defer_checks is not None:
            check_bool("defer_checks", defer_checks)
        if sketch is not None:
            check_positive_int("sketch", sketch)
        self.model = model
        # The capture engine owns the hooks on the model and the claim; the monitor reads the rows itself
        # (its own sub-sampling, norms and finiteness checks), so no mask and no engine policy.
        self._capture = Capture(
            model, layers, owner_kind="CRHMonitor", on_call=self._on_call, on_root=self._on_root, taps=taps,
            mask=False, nonfinite=None,
        )
        # one entry per measured (sub-)layer: "attn[q]" is the MultiheadAttention module "attn"
        self.layers: dict[str, nn.Module] = {n: t.module for n, t in self._capture.targets.items()}
        self._taps = {n: t.tap for n, t in self._capture.targets.items()}
        self.excluded = self._capture.excluded
        self._requested_explicitly = layers is not None
        self.preprocess: F.Preprocess = preprocess
        self.metric: F.Metric = metric
        self.every = every
        self.max_rows = max_rows
        self.grad_scale = grad_scale
        self.accumulation = accumulation
        self._accumulation = AccumulationCheck()  # accumulation=None: warn once on detected accumulation
        self.identities = identities
        self.track_balance = track_balance
        self.nonfinite: Policy = nonfinite
        self.on_missing: Policy = on_missing
        self.defer_checks = defer_checks
        self.sync_dist = sync_dist
        self._seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self._hooks = HookSet()  # the monitor's own: weight-parameter hooks of the accumulation check
        weakref.finalize(self, self._hooks.remove)
        self.sketch = sketch
        self._probes = self._make_probes(sketch, seed) if sketch is not None else {}
        self._state: dict[str, _LayerState] = {}
        self.reset()  # also: _calls = 0 (grad-enabled forward calls of the root model), the engine unpaused
        self._entered: list[bool] = []  # per open `with` block: was the monitor attached at entry?

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        return self._capture.attached

    @property
    def direct(self) -> bool:
        """Whether ``H_b`` and ``G_a`` are accumulated directly (else derived by identities)."""
        return self.preprocess == "normalized" or not self.identities or self.sketch is not None

    def _make_probes(self, k: int, seed: int) -> dict[str, dict[str, Tensor]]:
        """Per layer the fixed probes ``P_a`` (``d_a × (k+1)``) and ``P_b`` of the sketch (:mod:`canonreg.sketch`)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, module in self.layers.items():
            d_b, d_a = read_weight(self._taps[name], module).shape
            out[name] = {"a": _sketch.probe(d_a, k, gen), "b": _sketch.probe(d_b, k, gen)}
        return out

    def attach(self) -> CRHMonitor:
        """Install the hooks (idempotent). Raises CanonRegError if another monitor holds the model."""
        if self.attached:
            return self
        for name, module in self.layers.items():
            check_layer_weight(name, module, self._taps[name], need_data=True)
        self._capture.attach()
        try:
            for name, module in self.layers.items():
                leaf = weight_leaf(self._taps[name], module, name) if self.accumulation is None else None
                if leaf is not None:
                    self._accumulation.watch(self._hooks, name, leaf)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> CRHMonitor:
        """Remove every hook (idempotent) and return the monitor; the model is left exactly as before ``attach``.

        Gradient hooks already placed on live autograd graphs (forward done, backward pending) stay
        with those graphs and still record when their backward runs. While attached,
        ``copy.deepcopy(model)``, ``pickle`` and ``torch.save`` of the model work and give a plain
        model: the copy carries no monitor hook (each becomes a no-op that removes itself at the
        copy's first forward call; :class:`canonreg.layers.OwnedHook`), so EMA/SWA copies
        (``torch.optim.swa_utils.AveragedModel``) and checkpoints are never measured.
        """
        self._hooks.remove()
        self._capture.detach()
        return self

    def __enter__(self) -> CRHMonitor:
        """Attach for the block; blocks nest: each one restores the attachment state it found."""
        self._entered.append(self.attached)
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        was_attached = self._entered.pop() if self._entered else False
        if not was_attached:
            self.detach()

    def reset(self) -> None:
        """Forget everything accumulated (hooks stay as they are; the ``every`` count and the row
        sub-sampling generator restart, so a reset monitor behaves like a fresh one)."""
        self._state = {n: _LayerState(self.preprocess != "raw", self._probes.get(n)) for n in self.layers}
        self._capture.stats.update((n, CallStats()) for n in self._capture.stats)
        self._gen.manual_seed(self._seed)
        self._calls = 0
        self._capture.paused = False

    def __getstate__(self) -> dict[str, object]:
        raise TypeError("CRHMonitor holds hooks on a live model and cannot be pickled; pickle its report instead")

    # ------------------------------------------------------------------ hooks
    def _on_root(self) -> None:
        """A grad-enabled forward call of the model itself (the engine's ``on_root``): the ``every`` count."""
        # inactive steps (every=k): the engine skips their layer calls outright, so _on_call sees active ones only
        self._capture.paused = self._calls % self.every != 0
        self._calls += 1

    def _scale(self, tap: LayerTap, module: nn.Module, inputs: tuple[object, ...]) -> float:
        k = float(self.accumulation or 1)
        if self.grad_scale == "none":
            return k
        if self.grad_scale == "batch":
            return float(tap_batch_size(tap, module, inputs)) * k
        return float(self.grad_scale) * k

    def _defer(self, device: torch.device) -> bool:
        return device.type != "cpu" if self.defer_checks is None else self.defer_checks

    def _finite(
        self, name: str, call: int, checks: list[tuple[str, RowNorms]], deferred: list[tuple[str, Tensor]] | None = None
    ) -> bool:
        """Policy check on one half of a layer call: ``checks`` names each set of rows (``"activations (h_a)"``,
        …) with its :func:`_row_norm2` norms; True when every row is finite.

        One reduction per set and one host sync for the whole half instead of an elementwise ``isfinite``
        over the matrices: ``Σ_i ‖x_i‖² = Tr(Σ_i x_i x_iᵀ)`` (:meth:`RowNorms.total`) is NaN/inf exactly
        when a row is (or its squares overflow); the sets' sums are added on the device and read once
        (each read alone only when that sum is not finite, to name the first culprit). Norms range-checked
        on the host already are skipped. With ``deferred`` (a list) the sums are appended there instead
        and no sync happens.
        """
        totals = [(what, norms.total()) for what, norms in checks if not norms.checked]
        if not totals:
            return True
        if deferred is not None:
            deferred.extend(totals)
            return True
        total = totals[0][1]
        for _, t in totals[1:]:
            total = total + t
        if math.isfinite(float(total)):
            return True
        for what, t in totals:
            if len(totals) == 1 or not math.isfinite(float(t)):
                self._policy(name, what, call, stacklevel=4)
                return False
        return True  # each sum finite, only their total overflowed: every row is finite

    def _policy(self, name: str, what: str, call: int, stacklevel: int) -> None:
        """Act on one non-finite layer call (raise, warn, or count it as skipped)."""
        msg = (
            f"Non-finite {what} in layer {_display(name)!r} at forward call {call} of the monitored model "
            f"(policy nonfinite={self.nonfinite!r})"
        )
        handle_nonfinite(
            self.nonfinite, msg, hint="pass nonfinite='skip' or 'warn' to drop such calls instead",
            consequence="the call is dropped for this layer", stacklevel=stacklevel + 1,
        )
        self._state[name].skipped += 1

    def _resolve(self, name: str) -> None:
        """Read the deferred finiteness flags of a layer (one host sync) and apply the policy.

        The contributions of a non-finite call were masked to zero when it was committed; here its
        rows and step are taken back out of the counts, and the policy acts in call order.
        """
        state = self._state[name]
        if not state.checks:
            return
        checks, state.checks = state.checks, []
        flags = torch.stack([ok for _, _, _, ok, _ in checks]).cpu()
        if bool(flags.all()):
            return
        for (call, whats, totals, _, rows), ok in zip(checks, flags.tolist()):
            if ok:
                continue
            state.n -= rows
            state.steps -= 1
            first = torch.isfinite(totals).tolist().index(False)
            self._policy(name, whats[first], call, stacklevel=5)

    def _on_call(self, call: LayerCall) -> None:
        """One delivered layer call (the engine's ``on_call``: grad-enabled, traced, output requiring grad, on an
        active step)."""
        if call.output.is_meta:
            raise CanonRegError(
                f"Layer {_display(call.name)!r} ran on the meta device (no values to measure); detach the monitor "
                "before meta-device passes, or materialise the model"
            )
        self._capture_call(call.name, call.module, call.tap, call.inputs, call.output)

    def _capture_call(self, name: str, module: nn.Module, tap: LayerTap, inputs: tuple[object, ...], output: Tensor) -> None:
        """Forward half of one layer call: the rows of ``h_a`` (and ``h_b``), then a hook for the backward half.

        ``tap`` is this call's (the engine's :attr:`LayerCall.tap`: for a sub-layer inside attention it
        knows where this call's rows are)."""
        call = self._calls
        deferred: list[tuple[str, Tensor]] | None = [] if self._defer(output.device) else None
        with torch.no_grad(), _no_autocast(output):
            xa = tap.input_rows(module, inputs).detach()
            # rows of the active sample mask (canonreg.taps.masked), then at most max_rows of them
            idx = kept_rows(
                _display(name), xa.shape[0], xa.device, max_rows=self.max_rows, generator=self._gen, lead=leading_shape(tap, module, inputs)
            )
            if idx is not None:
                if idx.numel() == 0:
                    return  # every position of this call is masked out
                xa = xa[idx]
            xa = at_least_float32(xa)
            ha_norm2 = _row_norm2(xa)
            checks = [("activations (h_a)", ha_norm2)]
            hb = hb_norm2 = None
            if self.direct or self.track_balance:
                hb = at_least_float32(tap.output_rows(module, output).detach())
                if idx is not None:
                    hb = hb[idx]
                if self.direct:
                    hb_norm2 = _row_norm2(hb)
                    checks.append(("activations (h_b)", hb_norm2))
            if not self._finite(name, call, checks, deferred):
                return
            ya = _normalize(xa, ha_norm2) if self.preprocess == "normalized" else xa
            pending: dict[str, Tensor | _CallMoment] = {}
            pending["Ha"], version = self._input_moment(tap, module, inputs, ya, self._state[name].moments["Ha"])
            rows_b = None
            if hb is not None:
                if hb_norm2 is not None:
                    pending["Hb"] = self._output_moment(name, tap, module, output, xa, hb, hb_norm2)
                if self.track_balance:
                    rows_b = _balance_rows(tap, module, hb, output)
        scale = self._scale(tap, module, inputs)
        commit = _Commit(self, name, module, tap, pending, idx, scale, rows_b, ha_norm2, call, version, deferred)
        node = self._grad_input_node(tap, module, inputs, output)
        if node is not None:
            # a plain Linear: autograd computes dL/dh_a = dL/dh_b · W itself (any row shape); reuse it
            grad_fn, slot = node
            grad_fn.register_hook(lambda grad_inputs, grad_outputs: commit(grad_outputs[0], grad_inputs[slot]))
        else:
            output.register_hook(lambda grad: commit(grad, None))

    def _output_moment(
        self, name: str, tap: LayerTap, module: nn.Module, output: Tensor, xa: Tensor, hb: Tensor, hb_norm2: RowNorms
    ) -> Tensor | _CallMoment:
        """What a directly accumulated ``H_b`` keeps of this call until its commit.

        A plain Linear layer with a narrow input (:func:`_narrow`) uses the per-call identity
        ``h_b = [W b] [h_a; 1]`` (normalized: ``[h_a; 1]/‖h_b‖``) with this call's weights
        (:meth:`_CallMoment.projected`); otherwise the rows, kept or reduced like ``H_a``'s.
        """
        moment = self._state[name].moments["Hb"]
        normalized = self.preprocess == "normalized"
        if self.sketch is None and _plain_linear(tap, module) and _narrow(hb.shape[0], xa.shape[1] + 1, hb.shape[1]):
            w = read_weight(tap, module).detach().to(torch.float64)
            bias = tap.bias(module)
            col = torch.zeros_like(w[:, 0]) if bias is None else bias.detach().to(w)
            z = torch.cat([xa.to(torch.float64), torch.ones_like(xa[:, :1], dtype=torch.float64)], dim=1)
            if normalized:
                z = z * _inverse_norm(hb_norm2.sq).unsqueeze(1)
            return _CallMoment.projected(z, torch.cat([w, col.unsqueeze(1)], dim=1), hb.dtype)
        yb = _normalize(hb, hb_norm2) if normalized else hb
        fresh_small = yb.shape[0] <= yb.shape[1] and not _shares_storage(yb, output)
        return yb if fresh_small else moment.reduce(yb)

    def _add_ga(
        self, moment: _Moment, tap: LayerTap, module: nn.Module, gb: Tensor, ga: Tensor, ga_norm2: RowNorms, scale: float, ok: Tensor | None
    ) -> None:
        """Add this call's ``g_a = Wᵀ g_b`` rows (``−scale·dL/dh_a``; normalized: ``−g_a/‖g_a‖``) to ``G_a``.

        A plain Linear layer with a narrow output (:func:`_narrow`) uses ``g_a = Wᵀ g_b`` with this
        call's weights (:meth:`_CallMoment.projected`, a ``d_b × d_b`` Gram) instead of the rows' Gram.
        """
        normalized = self.preprocess == "normalized"
        if self.sketch is None and _plain_linear(tap, module) and _narrow(gb.shape[0], gb.shape[1], ga.shape[1]):
            w = read_weight(tap, module).detach().to(torch.float64)
            z = gb.to(torch.float64) * (-_inverse_norm(ga_norm2.sq).unsqueeze(1) if normalized else -scale)
            moment.add_call(_CallMoment.projected(z, w.T, ga.dtype), ok)
        elif normalized:
            moment.add_rows(_normalize(ga, ga_norm2), -1.0, ok)
        else:
            moment.add_rows(ga, -scale, ok)

    def _input_moment(
        self, tap: LayerTap, module: nn.Module, inputs: tuple[object, ...], ya: Tensor, moment: _Moment
    ) -> tuple[Tensor | _CallMoment, tuple[Tensor, int] | None]:
        """What ``H_a`` keeps of this call until its commit, and the input version to re-check then.

        The rows themselves (a fused Gram into the window at commit time) when that costs no memory:
        fresh rows no larger than the Gram, or a view of a Linear input that autograd saves (and so
        guards against in-place changes) anyway; otherwise this call reduced now (:class:`_CallMoment`).
        """
        x_in = inputs[0]
        if isinstance(x_in, Tensor) and _shares_storage(ya, x_in):
            if type(tap) is LinearTap and read_weight(tap, module).requires_grad:
                return ya, (x_in, x_in._version)
            return moment.reduce(ya), None
        if ya.shape[0] <= ya.shape[1]:
            return ya, None
        return moment.reduce(ya), None

    def _grad_input_node(
        self, tap: LayerTap, module: nn.Module, inputs: tuple[object, ...], output: Tensor
    ) -> tuple[torch.autograd.graph.Node, int] | None:
        """The autograd node of a plain ``F.linear``'s matrix product and the slot of its input gradient.

        ``addmm(b, x, Wᵀ)`` / ``mm(x, Wᵀ)`` compute ``dL/dx = dL/dh_b · W`` exactly when ``x`` needs a
        gradient; a post-hook on that node gets it for free, saving one matmul per step in the modes
        that accumulate ``G_a`` directly. On an ``(…, d)`` input (a transformer's tokens) ``F.linear``
        flattens the rows and views the product back: the node is the one under that view, its input
        gradient the ``(n, d_a)`` rows in the same order. Anything less certain returns None (the monitor
        then computes ``dL/dh_b · W`` itself).
        """
        if not self.direct or not _plain_linear(tap, module):
            return None
        x = inputs[0] if inputs else None
        if not isinstance(x, Tensor) or x.dim() < 2 or not x.requires_grad or output.dim() != x.dim():
            return None
        node = output.grad_fn
        if node is not None and x.dim() > 2:
            if type(node).__name__ not in ("ViewBackward0", "UnsafeViewBackward0") or len(node.next_functions) != 1:
                return None
            node = node.next_functions[0][0]
        if node is None:
            return None
        kind = type(node).__name__
        if kind == "AddmmBackward0":
            return node, 1
        if kind == "MmBackward0":
            return node, 0
        return None

    def _commit_backward(
        self,
        name: str,
        module: nn.Module,
        tap: LayerTap,
        pending: dict[str, Tensor | _CallMoment],
        idx: Tensor | None,
        scale: float,
        rows_b: Tensor | None,
        ha_norm2: RowNorms,
        call: int,
        version: tuple[Tensor, int] | None,
        deferred: list[tuple[str, Tensor]] | None,
        grad: Tensor,
        grad_input: Tensor | None,
    ) -> None:
        """Second half of one layer call: gradient rows, policy checks, then every sum at once."""
        normalized = self.preprocess == "normalized"
        state = self._state[name]
        with torch.no_grad(), _no_autocast(grad):
            gb = tap.output_rows(module, grad.detach())
            if idx is not None:
                gb = gb[idx]
            gb = at_least_float32(gb)
            gb_norm2 = _row_norm2(gb)
            checks = [("gradients (g_b)", gb_norm2)]
            ga = ga_norm2 = None
            if self.direct:
                ga = _ga_rows(tap, module, gb, idx, grad_input)
                ga_norm2 = _row_norm2(ga)
                checks.append(("gradients (g_a)", ga_norm2))
            if not self._finite(name, call, checks, deferred):
                return
            if version is not None and version[0]._version != version[1]:
                raise CanonRegError(
                    f"The input of layer {_display(name)!r} was modified in place between its forward pass and "
                    "the backward pass; canonreg cannot measure h_a for that call"
                )
            flags: tuple[tuple[str, ...], Tensor, Tensor] | None = None
            ok: Tensor | None = None
            if deferred:
                # No host sync: a call with any non-finite row contributes exact zeros (torch.where
                # never propagates the unselected NaN); its counts are corrected in _resolve. The
                # totals are sums of squares (≥ 0, NaN or +inf when a row is not finite): one
                # comparison and one reduction flag the call.
                totals = torch.stack([t for _, t in deferred])
                ok = (totals < math.inf).all()
                flags = (tuple(w for w, _ in deferred), totals, ok)
                added = [*pending, "Gb", *(("Ga",) if ga is not None else ())]
                if any(state.moments[k].w_xx is None for k in added):
                    # This call opens a window, whose shift and scale the later calls use: they must come from
                    # finite rows. One host read per window: a good call is added unflagged; a bad one adds
                    # nothing (the next call opens the window) and is counted out and reported by _resolve.
                    if bool(ok):
                        ok = None
                    else:
                        state.commit(gb.shape[0])
                        state.checks.append((call, *flags, gb.shape[0]))
                        if len(state.checks) >= _FOLD_EVERY:
                            self._resolve(name)
                        return
            # Everything is finite (or masked): commit the forward half and the backward half together.
            for k, v in pending.items():
                state.moments[k].add(v, ok)
            # g = −scale · (dL/dh); normalisation keeps only the sign.
            if normalized:
                state.moments["Gb"].add_rows(_normalize(gb, gb_norm2), -1.0, ok)
            else:
                state.moments["Gb"].add_rows(gb, -scale, ok)
            if ga is not None and ga_norm2 is not None:
                self._add_ga(state.moments["Ga"], tap, module, gb, ga, ga_norm2, scale, ok)
            if rows_b is not None:
                gnhn, gh = _balance_sums(gb, gb_norm2.sq, ha_norm2.sq, rows_b, scale, ok)
                state.add_scalar("gnhn", gnhn)
                state.add_scalar("gh", gh)
            state.commit(gb.shape[0])
            if flags is not None:
                state.checks.append((call, *flags, gb.shape[0]))
                if len(state.checks) >= _FOLD_EVERY:
                    self._resolve(name)

    # ------------------------------------------------------------------ results
    @renamed_arguments(eig_floor="floor", seed="bootstrap_seed")
    def compute(
        self,
        *,
        lr: float | None = None,
        weight_decay: float | None = None,
        batch_size: int | None = None,
        exponents: bool = True,
        ranks: bool = True,
        n_bootstrap: int = 200,
        floor: float = 1e-6,
        bootstrap_seed: int = 0,
        gram_dtype: torch.dtype = torch.float64,
    ) -> CRHReport:
        """Reduce the accumulators (across ranks if distributed) and return a :class:`CRHReport`.

        With ``torch.distributed`` initialised and ``sync_dist=True`` this is a collective call (one
        all-reduce of a flat float64 buffer, preceded in centred modes by a small one of the counts and
        sums that gives every rank the common means to re-centre on): every rank must call it and gets
        the report of all ranks' samples (``report.samples``: total; ``report.steps``: mean per rank).

        Cost: α needs per layer ``WᵀW`` and ``WWᵀ`` (about ``d_a d_b (d_a + d_b)/2`` flops) and a few
        reads of each matrix (the ``raw``/``centered`` identities add ``W H_a Wᵀ``, ``Wᵀ G_b W``);
        ``exponents`` and ``ranks`` add ``O(d³)`` eigendecompositions (on the accumulators' device,
        batched per shape): on a convolution ``H_a``, ``G_a``, ``Z_a`` are ``(C_in·k²)``-sized, so
        ``exponents=False, ranks=False`` is the setting for frequent calls. ``report.timings`` splits it.

        Args:
            lr, weight_decay, batch_size: η, γ, S of the training step; all three (with
                ``track_balance``) add the balance terms of theory §5.
            exponents: PAH fits of the six relations (eigendecompositions of ``G_a, Z_a, G_b, Z_b``);
                False: ``report.exponents`` is empty.
            ranks: effective ranks of ``H_a, H_b, G_a, G_b`` (``G``'s shared with the fits); False:
                ``report.effective_rank`` is empty. Neither switch changes α, samples or balance.
            n_bootstrap: bootstrap resamples for the exponent intervals (0: NaN intervals).
            floor: relative eigenvalue floor of the fits, in [0, 1) (formerly ``eig_floor``).
            bootstrap_seed: seed of the bootstrap (formerly ``seed``; the constructor's ``seed`` is the
                row sub-sampling seed). Old names still work, with a FutureWarning.
            gram_dtype: dtype of the weight products ``WᵀW``, ``WWᵀ`` (and of ``W H_a Wᵀ``, ``Wᵀ G_b W``
                with identities), the ``O(d³)`` part of α: ``torch.float64`` (default, agrees with float64
                references to ~1e-12) or ``torch.float32`` (about 1.8× faster on a CPU; relative error of
                those matrices ~1e-7, of α ~1e-7; inputs are scaled by powers of two, so no overflow).
                The report's matrices are float64 either way.

        Raises:
            CanonRegError: before any backward pass reached a monitored layer, or (``on_missing="error"``)
                when a requested layer recorded no samples.
        """
        balance = self._balance_args(lr, weight_decay, batch_size)
        options = _report_options(exponents, ranks, n_bootstrap, floor, bootstrap_seed, gram_dtype)
        if self.every > 1 and self._calls == 0 and any(s.steps > 0 for s in self._state.values()):
            warnings.warn(
                f"CRHMonitor(every={self.every}) counts grad-enabled calls of the model it was given, and that model was "
                "never called (the loop called its submodules): every layer call was collected. Attach the monitor to "
                "the module the loop calls, or call the model itself",
                RuntimeWarning,
                stacklevel=3,  # the caller of compute() (through errors.renamed_arguments)
            )
        t_start = time.perf_counter()
        names = list(self.layers)
        sums = self._reduced_sums(names)
        missing = self._check_samples(names, sums)
        if self.sketch is not None:  # α from the d × (k + 1) sketches (canonreg.sketch)
            return self._sketched_report(sums, missing, balance, options, time.perf_counter() - t_start)
        weights, biases = self._weights(names)
        inputs = ReportInputs(
            sums={n: s for n, s in sums.items() if n not in missing},
            weights=weights,
            biases=biases,
            preprocess=self.preprocess,
            metric=self.metric,
            direct=self.direct,
            skipped={n: self._state[n].skipped for n in names},
            missing=missing,
            excluded=dict(self.excluded),
            balance=balance,
        )
        return build_report(inputs, options, timings={"reduce": time.perf_counter() - t_start})

    def _sketched_report(
        self,
        sums: dict[str, dict[str, Tensor]],
        missing: dict[str, str],
        balance: dict[str, float] | None,
        options: ReportOptions,
        reduce_seconds: float,
    ) -> CRHReport:
        """The report of a sketched monitor: the six α̂ per layer (:mod:`canonreg.sketch`), samples, balance.

        Raises:
            CanonRegError: ``exponents`` or ``ranks`` asked for (they need the full matrices).
        """
        if options.exponents or options.ranks:
            raise CanonRegError(
                f"CRHMonitor(sketch={self.sketch}) keeps d × (k + 1) sketches, not the matrices: PAH exponents and "
                "effective ranks need the full matrices (eigendecompositions). Call compute(exponents=False, "
                "ranks=False), or use sketch=None for those"
            )
        t0 = time.perf_counter()
        alignment: dict[str, dict[str, float]] = {}
        reasons: dict[str, dict[str, str]] = {}
        terms: dict[str, F.BalanceTerms] = {}
        centered = self.preprocess != "raw"
        for name, s in sums.items():
            if name in missing:
                continue
            n = float(s["n"])
            with torch.no_grad():
                w = read_weight(self._taps[name], self.layers[name]).detach()
            probes = {side: p.to(s["Ha_x"].device) for side, p in self._probes[name].items()}
            sketches = _sketch.weight_sketches(w.to(s["Ha_x"].device), probes)
            for m in _MOMENTS:
                sketches[f"{m[0]}_{m[1]}"] = _sketch.sketched_moment(s[m + "_x"], s[m + "_xx"], n, centered, probes[m[1]])
            alignment[name] = _sketch.sketched_alignments(sketches, probes, self.metric)
            nan = [r for r, v in alignment[name].items() if math.isnan(v)]
            if nan:
                why = "a zero or non-finite (entry-centred) sketch: a constant or zero matrix, or one sample in a centred mode"
                reasons[name] = dict.fromkeys(nan, why)
            if balance is not None:
                terms[name] = F.balance_terms(
                    float(w.double().square().sum()), float(s["gh"]) / n, float(s["gnhn"]) / n,
                    lr=balance["lr"], weight_decay=balance["weight_decay"], batch_size=int(balance["batch_size"]),
                    mean_gradient_sq_norm=float("nan"),
                )
        seconds = time.perf_counter() - t0
        return CRHReport(
            alignment=alignment, nan_reasons=reasons, exponents={}, effective_rank={}, balance=terms,
            samples={n: int(float(s["n"])) for n, s in sums.items() if n not in missing},
            steps={n: int(round(float(s["steps"]))) for n, s in sums.items() if n not in missing},
            skipped={n: self._state[n].skipped for n in sums}, preprocess=self.preprocess, metric=self.metric,
            derived=False, missing=missing, excluded=dict(self.excluded),
            timings={"reduce": reduce_seconds, "alignment": seconds, "total": reduce_seconds + seconds},
        )

    def _weights(self, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
        """Every layer's ``W`` (``(d_b, d_a)``) and bias in float64 on the accumulators' device."""
        device = self._device()
        weights: dict[str, Tensor] = {}
        biases: dict[str, Tensor | None] = {}
        with torch.no_grad():
            for n in names:
                weights[n] = read_weight(self._taps[n], self.layers[n]).detach().to(device, torch.float64)
                b = self._taps[n].bias(self.layers[n])
                biases[n] = None if b is None else b.detach().to(device, torch.float64)
        return weights, biases

    def _balance_args(self, lr: float | None, weight_decay: float | None, batch_size: int | None) -> dict[str, float] | None:
        """The checked ``{lr, weight_decay, batch_size}`` of the balance terms, or None when not asked for."""
        balance_args = (lr, weight_decay, batch_size)
        if any(a is not None for a in balance_args) and not all(a is not None for a in balance_args):
            raise ValueError("Expected `lr`, `weight_decay` and `batch_size` to be given together (or none of them)")
        if lr is None:
            return None
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        check_positive_int("batch_size", batch_size)
        if not self.track_balance:
            raise CanonRegError("Balance terms need track_balance=True when the monitor is created")
        return {"lr": float(lr), "weight_decay": float(weight_decay), "batch_size": int(batch_size)}  # type: ignore[arg-type]

    def _reduced_sums(self, names: list[str]) -> dict[str, dict[str, Tensor]]:
        """Every layer's float64 sums by key (``_keys``), reduced over ranks, on the accumulators' device.

        Not copies: the tensors may be the accumulators' own (the report only reads them).
        """
        accumulators = self._accumulators()
        keys = [a.name for a in accumulators]
        for name in names:
            self._accumulation.check(name)
            self._resolve(name)
        for state in self._state.values():
            state.fold()
        device = self._device()
        world = _world_size() if self.sync_dist else 1
        centres = self._global_means(names, device) if world > 1 and self.preprocess != "raw" else {}
        flat = [t for n in names for t in self._exported(n, accumulators, centres, device)]
        reduced = all_reduce_flat(flat) if world > 1 else [t.detach().to(torch.float64) for t in flat]
        it = iter(reduced)
        sums = {n: {k: next(it) for k in keys} for n in names}
        for s in sums.values():
            for a in accumulators:
                if a.mean:
                    s[a.name] = s[a.name] / world
        return sums

    def _exported(
        self, name: str, accumulators: list[_Accumulator], centres: dict[tuple[str, str], Tensor], device: torch.device
    ) -> list[Tensor]:
        """One layer's sums in ``accumulators`` order (moments about the common mean ``centres`` when given)."""
        state = self._state[name]
        exported = {m: state.moments[m].about(centres.get((name, m))) for m in _MOMENTS}
        out = []
        for a in accumulators:
            pair = exported.get(a.moment)
            if a.kind == "count":
                out.append(torch.tensor(float(getattr(state, a.name)), dtype=torch.float64, device=device))
            elif pair is not None:
                out.append((pair[1] if a.kind == "second" else pair[0]).to(device))
            elif a.name in state.scalars:
                out.append(state.scalars[a.name].to(device))
            else:
                out.append(self._zeros_like_key(name, a, device))
        return out

    def _check_samples(self, names: list[str], sums: dict[str, dict[str, Tensor]]) -> dict[str, str]:
        """Layers without samples, with reasons (raises before any sample, or per ``on_missing``)."""
        if sum(float(s["n"]) for s in sums.values()) == 0:
            reasons = "; ".join(f"{_display(n)!r}: {self._missing_reason(n)}" for n in names)
            raise CanonRegError(
                "compute() was called before any backward pass reached a monitored layer: attach the monitor "
                "(`with monitor:` or `monitor.attach()`), run forward *and* backward with gradients enabled, "
                f"then call compute(). Per layer — {reasons}"
            )
        missing = {n: self._missing_reason(n) for n in names if float(sums[n]["n"]) == 0}
        if missing:
            msg = "; ".join(f"{_display(n)!r}: {r}" for n, r in missing.items())
            if self.on_missing == "error":
                raise CanonRegError(f"Requested layers recorded no samples — {msg}. Use on_missing='skip' to drop them")
            if self.on_missing == "warn":
                warnings.warn(f"Layers recorded no samples and are left out of the report — {msg}", RuntimeWarning, stacklevel=3)
        return missing

    def _accumulators(self) -> list[_Accumulator]:
        """The :data:`_ACCUMULATORS` this monitor keeps (``direct`` ones if direct, ``balance`` ones if tracked)."""
        kept = {"always": True, "direct": self.direct, "balance": self.track_balance}
        return [a for a in _ACCUMULATORS if kept[a.when]]

    def _global_means(self, names: list[str], device: torch.device) -> dict[tuple[str, str], Tensor]:
        """Every centred moment's mean over all ranks (one small all-reduce of counts and ``Σx``).

        Each rank then re-centres its sums on the common mean before the main reduction, so the
        cross-rank sum adds deviations instead of cancelling raw second moments.
        """
        parts: list[Tensor] = []
        slots: list[tuple[str, str, int]] = []
        for n in names:
            for m in _MOMENTS:
                mom = self._state[n].moments[m]
                d = self._dim(n, m[1])
                total = mom.total_x()
                parts.append(torch.as_tensor(0.0 if mom.n is None else mom.n, dtype=torch.float64).to(device))
                parts.append(torch.zeros(d, dtype=torch.float64, device=device) if total is None else total.to(device))
                slots.append((n, m, d))
        reduced = iter(all_reduce_flat(parts))
        out: dict[tuple[str, str], Tensor] = {}
        for n, m, _ in slots:
            count, total = next(reduced), next(reduced)
            out[(n, m)] = total / count.clamp_min(1.0)
        return out

    def _device(self) -> torch.device:
        for state in self._state.values():
            for m in state.moments.values():
                if m.s_xx is not None:
                    return m.s_xx.device
        for n in self.layers:
            return read_weight(self._taps[n], self.layers[n]).device
        return torch.device("cpu")

    def _dim(self, name: str, side: str) -> int:
        """``d_a`` (side ``"a"``) or ``d_b`` (side ``"b"``) of layer ``name``'s ``W`` (``(d_b, d_a)``)."""
        d_b, d_a = read_weight(self._taps[name], self.layers[name]).shape
        return int(d_a if side == "a" else d_b)

    def _zeros_like_key(self, name: str, acc: _Accumulator, device: torch.device) -> Tensor:
        """A float64 zero of accumulator ``acc``'s shape for layer ``name`` (see :class:`_Accumulator`)."""
        shape: tuple[int, ...] = ()
        if acc.kind in ("second", "first"):
            d = self._dim(name, acc.moment[1])
            if acc.kind == "first":
                shape = (d,)
            elif self.sketch is not None:  # sketched: d × (k + 1)
                shape = (d, self._probes[name][acc.moment[1]].shape[1])
            else:
                shape = (d, d)
        return torch.zeros(shape, dtype=torch.float64, device=device)

    def _missing_reason(self, name: str) -> str:
        if name in self.excluded:
            return self.excluded[name]
        functional = functional_only_children(self.model)
        if name in functional:
            return functional[name]
        state, stats = self._state[name], self._capture.stats[name]
        if stats.fired == 0 and stats.untraced > 0:
            return (
                f"the layer ran only inside torch.func transforms (vmap/grad) or through torch.func.functional_call "
                f"with substituted parameters ({stats.untraced} call(s)); such calls are not recorded"
            )
        if stats.fired == 0:
            when = "while the monitor was attached" if self.every == 1 else f"on a collected step (every={self.every})"
            return f"the layer never ran in a grad-enabled forward pass {when}"
        if stats.no_grad_output == stats.fired:
            return "the layer's output never required grad (frozen layer fed by inputs that need no grad?)"
        if state.skipped > 0:
            return f"every call was dropped by the non-finite policy ({state.skipped} call(s))"
        return "the layer ran but no backward pass reached its output"


def _report_options(
    exponents: bool, ranks: bool, n_bootstrap: int, floor: float, bootstrap_seed: int, gram_dtype: torch.dtype = torch.float64
) -> ReportOptions:
    """The checked options of :meth:`CRHMonitor.compute` (messages name the old argument names too)."""
    check_bool("exponents", exponents)
    check_bool("ranks", ranks)
    check_nonnegative_int("n_bootstrap", n_bootstrap)
    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and 0 <= floor < 1):
        raise ValueError(f"Expected `floor` (formerly `eig_floor`) to be a float in [0, 1), but got {floor!r}")
    check_seed("bootstrap_seed", bootstrap_seed, " (formerly `seed`)")
    if gram_dtype not in (torch.float64, torch.float32):
        raise ValueError(f"Expected `gram_dtype` to be torch.float64 or torch.float32, but got {gram_dtype!r}")
    return ReportOptions(
        exponents=exponents, ranks=ranks, n_bootstrap=n_bootstrap, floor=float(floor), bootstrap_seed=bootstrap_seed, gram_dtype=gram_dtype
    )


class _Commit:
    """The backward half of one layer call (a small callable instead of a closure over the frame).

    A call is committed once, by the first backward pass that reaches it: a graph traversed twice
    (``torch.autograd.grad(task, ..., create_graph=True)`` for an exact-G regulariser, then
    ``loss.backward()``) would otherwise count every sample twice. That first pass is the task loss's.
    """

    __slots__ = ("monitor", "args", "done")

    def __init__(self, monitor: CRHMonitor, *args: object) -> None:
        self.monitor = monitor
        self.args = args
        self.done = False

    def __call__(self, grad: Tensor | None, grad_input: Tensor | None) -> None:
        if grad is None or self.done:
            return
        self.done = True
        self.monitor._commit_backward(*self.args, grad, grad_input)  # type: ignore[arg-type, call-arg]


def _no_autocast(t: object) -> contextlib.AbstractContextManager[object]:
    """Per-step statistics run in the dtypes the monitor chose, never autocast's lower precision.

    A no-op context when autocast is off for ``t``'s device (building a disabled ``torch.autocast`` costs
    ~4 µs, twice per layer call)."""
    device = t.device.type if isinstance(t, Tensor) else "cpu"
    device = device if device in ("cpu", "cuda", "xpu", "mps") else "cpu"
    try:
        active = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 takes no device type
        active = True
    return torch.autocast(device_type=device, enabled=False) if active else contextlib.nullcontext()


def _balance_rows(tap: LayerTap, module: nn.Module, hb: Tensor, output: Tensor) -> Tensor:
    """``W h_a = h_b − b`` per row, copied now: an in-place op after the layer may overwrite ``h_b``."""
    bias = tap.bias(module)
    if bias is not None:
        return hb - bias.detach().to(hb.dtype)
    return hb.clone() if _shares_storage(hb, output) else hb


def _ga_rows(tap: LayerTap, module: nn.Module, gb: Tensor, idx: Tensor | None, grad_input: Tensor | None) -> Tensor:
    """The rows ``dL/dh_a = dL/dh_b · W`` of one call: autograd's own input gradient when the call's
    ``F.linear`` node gave it (:meth:`CRHMonitor._grad_input_node`), else ``gb @ W`` (at least float32)."""
    if grad_input is None:
        return gb @ at_least_float32(read_weight(tap, module).detach()).to(gb.dtype)
    ga = grad_input.detach().reshape(-1, grad_input.shape[-1])
    return at_least_float32(ga if idx is None else ga[idx])


def _plain_linear(tap: LayerTap, module: nn.Module) -> bool:
    """Whether the layer is an ``nn.Linear`` computing exactly ``h_b = W h_a + b`` per row."""
    return type(tap) is LinearTap and type(module).forward is nn.Linear.forward


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return True


_world_size = world_size  # a module attribute: tests simulate ranks by patching it

