"""Streaming second moments of the monitor: the pure moment math behind :class:`canonreg.monitor.CRHMonitor`.

Per layer and matrix ``X`` (``H_a``, ``H_b``, ``G_a``, ``G_b``; theory §1–§3) the monitor keeps, over the
committed rows ``x_i`` (after preprocessing), float64 totals about an origin ``o``:

    n = Σ_i 1,   s_x = Σ_i (x_i − o),   s_xx = Σ_i (x_i − o)(x_i − o)ᵀ

(raw: ``o = 0``; centred: ``o = μ`` and ``s_x = 0``, so ``s_xx`` is ``M2``, ``n`` times the covariance).
Rows arrive in the working dtype (at least float32): a window of at most :data:`_FOLD_EVERY` calls
accumulates ``u = (x − c)/s`` (``c`` the window's first-call mean, ``s`` a power of two), and each window is
merged into the totals with Chan, Golub & LeVeque's parallel update (:class:`_Moment`). Sketched moments keep
``s_xx P`` for a fixed ``d × m`` probe ``P`` instead (:mod:`canonreg.sketch`).

Contents: the upper-triangular Gram (:func:`_gram_upper_`, :func:`symmetric_from_upper`, :func:`_gram`), the
declaration of every per-layer sum (:data:`_ACCUMULATORS`), one call reduced in its forward hook
(:class:`_CallMoment`), the streamed moment (:class:`_Moment`), a layer's state (:class:`_LayerState`) and
the row helpers (:func:`_row_norm2`, :func:`_normalize`, :func:`_inverse_norm`, :func:`_narrow`). Everything
here is tensor math with no hooks and no model: the monitor owns the layers and calls it.

Reference: Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances" (1979).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: Partial sums in the working dtype cover at most this many committed calls before they are
#: folded into the float64 totals (bounds float32 accumulation error to ~16 ulp).
_FOLD_EVERY = 16

#: Grams of more than this many columns are built block-recursively, upper triangle only.
_SYRK_BLOCK = 256


#: Row-panel height of the upper-triangular Gram (one matmul per panel).
_SYRK_PANEL = 128

#: Device types that take the CPU route, where per-step work is bound by flops and host calls are cheap:
#: Grams built in row panels of the upper triangle (:func:`_gram_upper_`), folds in panels of
#: ``_SYRK_PANEL`` rows, float32 row norms range-checked on the host (:func:`_row_norm2`, two reads per
#: norm). Every other device (a GPU: bound by kernel launches and host syncs) takes the accelerator
#: route: one matmul per Gram, folds in panels of up to ``_FOLD_PANEL_BYTES``, float64 norms with no
#: read. ``benchmarks/launches.py`` empties it to count the accelerator route on a CPU.
_CPU_ROUTE: tuple[str, ...] = ("cpu",)

#: Float64 temporary per fold panel on the accelerator route (64 MiB: one panel up to width 2896).
_FOLD_PANEL_BYTES = 1 << 26


def _gram_upper_(out: Tensor, x: Tensor, alpha: float = 1.0) -> None:
    """``out += alpha · xᵀx`` on the upper block triangle only (a BLAS-free ``syrk``).

    Row panels of ``p = _SYRK_PANEL`` columns: ``out[i:i+p, i:] += x[:, i:i+p]ᵀ x[:, i:]``, one
    matmul each, so ``1/2 + p/(2d)`` of the flops of ``xᵀx`` are spent (0.56 at ``d = 1024``; measured
    ~12% faster than halving recursively with 256-column leaves on one CPU thread). Widths up to
    ``_SYRK_BLOCK`` take one full matmul; the strictly lower blocks of ``out`` are left untouched
    (see :func:`symmetric_from_upper`). Off the CPU route (:data:`_CPU_ROUTE`) the whole Gram is one
    matmul: twice the flops, one kernel launch instead of ``d/p``; nothing reads the lower blocks.
    """
    d = x.shape[1]
    if d <= _SYRK_BLOCK or x.device.type not in _CPU_ROUTE:  # accelerators: one launch (lower blocks written too)
        out.addmm_(x.T, x, alpha=alpha)
        return
    p = max(1, min(_SYRK_PANEL, _SYRK_BLOCK))
    for i in range(0, d, p):
        out[i : i + p, i:].addmm_(x[:, i : i + p].T, x[:, i:], alpha=alpha)


def symmetric_from_upper(m: Tensor, scale: float = 1.0, mean: Tensor | None = None) -> Tensor:
    """``scale · S − μμᵀ`` (no ``μμᵀ`` when ``mean`` is None) as a new, exactly symmetric tensor, where ``S``
    is the symmetric matrix whose upper triangle (diagonal included) is ``m``'s; ``m``'s strictly lower
    triangle is never read (:func:`_gram_upper_` leaves lower blocks unwritten).

    Block rows of ``_SYRK_BLOCK``: the diagonal block is ``triu(D) + triu(D, 1)ᵀ``, the block right of it
    is copied and mirrored below (no temporary of ``m``'s size, cache-sized transposes). With
    ``m = S_xx``, ``scale = 1/n`` and ``μ = S_x/n`` it is :func:`canonreg.functional.moment_from_sums`.
    """
    d = m.shape[-1]
    out = torch.empty_like(m)
    for i in range(0, d, _SYRK_BLOCK):
        e = min(i + _SYRK_BLOCK, d)
        diag = m[i:e, i:e]
        block = torch.add(torch.triu(diag), torch.triu(diag, 1).T)
        right = m[i:e, e:] * scale if scale != 1.0 else m[i:e, e:]
        if scale != 1.0:
            block.mul_(scale)
        if mean is not None:
            block.addr_(mean[i:e], mean[i:e], alpha=-1.0)
            right = torch.addr(right, mean[i:e], mean[e:], alpha=-1.0)
        out[i:e, i:e] = block
        out[i:e, e:] = right
        out[e:, i:e] = right.T
    return out


def _gram(x: Tensor) -> Tensor:
    """A fresh upper-block-triangular Gram ``xᵀx`` (same layout as the partial sums; off the CPU route the
    full Gram, one matmul)."""
    if x.shape[1] <= _SYRK_BLOCK or x.device.type not in _CPU_ROUTE:
        return x.T @ x
    out = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    _gram_upper_(out, x)
    return out


@dataclass(frozen=True)
class _Accumulator:
    """One per-layer sum of the monitor, declared once in :data:`_ACCUMULATORS`.

    ``name`` is its key in the reduced sums handed to the report; ``kind`` says where it lives and its
    shape: ``count`` (a :class:`_LayerState` int attribute, shape ``()``), ``second`` / ``first``
    (``Σxxᵀ`` / ``Σx`` of the streamed :class:`_Moment` ``moment``: ``(d, d)`` — ``(d, k + 1)``
    sketched — and ``(d,)``, with ``d = d_a`` or ``d_b`` by the moment's side ``moment[1]``), ``scalar``
    (a float64 ``_LayerState.scalars`` entry, shape ``()``). ``when``: kept always, only for ``direct``
    monitors, or only with ``track_balance``. ``mean``: divided by the world size after the
    all-reduce (a per-rank mean instead of a sum).
    """

    name: str
    kind: Literal["count", "second", "first", "scalar"]
    moment: str = ""
    when: Literal["always", "direct", "balance"] = "always"
    mean: bool = False


def _moment_pair(moment: str, when: Literal["always", "direct"]) -> tuple[_Accumulator, _Accumulator]:
    """``moment``'s ``Σxxᵀ`` and ``Σx`` accumulators (keys ``<moment>_xx``, ``<moment>_x``)."""
    return _Accumulator(moment + "_xx", "second", moment, when), _Accumulator(moment + "_x", "first", moment, when)


#: Every per-layer accumulator, in the order of the flat all-reduce buffer and of the report's sums:
#: :class:`_LayerState` (reset) and the monitor's ``_accumulators``, ``_zeros_like_key``, ``_exported`` /
#: ``_reduced_sums`` (the reduction) and ``_global_means`` all read this one declaration.
_ACCUMULATORS: tuple[_Accumulator, ...] = (
    _Accumulator("n", "count"),  # committed rows (samples)
    _Accumulator("steps", "count", mean=True),  # committed layer calls (report: mean per rank)
    *_moment_pair("Ha", "always"),
    *_moment_pair("Gb", "always"),
    *_moment_pair("Hb", "direct"),
    *_moment_pair("Ga", "direct"),
    _Accumulator("gnhn", "scalar", when="balance"),  # Σ‖g_b‖²‖h_a‖²
    _Accumulator("gh", "scalar", when="balance"),  # Σ⟨g_b, W h_a⟩
)

#: The four streamed moments of a layer (from :data:`_ACCUMULATORS`); the sums name them ``Ha_xx``/``Ha_x``, ….
_MOMENTS = tuple(sorted({a.moment for a in _ACCUMULATORS if a.moment}, key=lambda m: (m[0] != "H", m[1])))


def _pow2_scale(spread: Tensor, fallback: Tensor) -> Tensor:
    """A float64 power of two near ``spread`` (or ``fallback`` when that is 0; 1 when both are 0 or not finite).

    Window rows are divided by it before their Gram, so products neither overflow (rows of 1e30) nor
    underflow (gradients of 1e-30) in float32; a power of two makes the division and the float64
    rescaling at the fold exact.
    """
    m = torch.where(spread > 0, spread, fallback).to(torch.float64)
    m = torch.where((m > 0) & (m < math.inf), m, 1.0)  # NaN fails both comparisons
    return torch.exp2(torch.floor(torch.log2(m)))


def _absmax(x: Tensor) -> Tensor:
    """``max |x_ij|`` as a 0-d tensor (0 for an empty tensor; NaN propagates; no temporary of ``x``'s size)."""
    return torch.linalg.vector_norm(x, ord=math.inf) if x.numel() > 0 else torch.zeros((), dtype=x.dtype, device=x.device)


class _CallMoment:
    """One call's rows reduced in its forward hook: ``u = (x − origin)/scale``, ``Σu``, ``Σuuᵀ`` (upper layout).

    The origin is the call's mean in every mode (raw moments too: a float32 ``Σuuᵀ`` of rows far from 0
    would lose their spread to rounding; the window adds the origin back in float64 at the fold).
    With a ``probe`` ``P`` (``d × m``, sketched moments) ``s_xx`` is ``(Σuuᵀ) P = uᵀ(uP)`` instead.
    A call built by :meth:`projected` keeps ``Σuuᵀ = L Rᵀ`` as its two ``d × m`` factors (``factors``; ``s_xx`` None).
    """

    __slots__ = ("origin", "s_x", "s_xx", "factors", "scale", "count")

    def __init__(self, rows: Tensor, probe: Tensor | None = None) -> None:
        self.count = rows.shape[0]
        self.origin = rows.mean(0) if self.count > 0 else None
        dev = rows - self.origin if self.origin is not None else rows
        self.scale = _pow2_scale(_absmax(dev), _absmax(rows))
        u = dev * (1.0 / self.scale).to(rows.dtype)
        self.s_x = u.sum(0)
        self.s_xx: Tensor | None = _gram(u) if probe is None else u.T @ (u @ probe)
        self.factors: tuple[Tensor, Tensor] | None = None

    @classmethod
    def projected(cls, z: Tensor, a: Tensor, dtype: torch.dtype) -> _CallMoment:
        """The call of the rows ``x_i = A z_i`` from ``z`` (``n × m``) and ``A`` (``d × m``, ``m ≪ d``), float64.

        ``Σ(x − x̄)(x − x̄)ᵀ = A [Σ(z − z̄)(z − z̄)ᵀ] Aᵀ``: an ``m × m`` float64 Gram and one ``d × m × d``
        product instead of the ``n·d²/2`` Gram of the rows; the same rows re-associated, so exact up to
        rounding (the small Gram in float64, the last product in ``dtype``).
        """
        self = cls.__new__(cls)
        z = z.to(torch.float64)
        self.count = z.shape[0]
        zbar = z.mean(0) if self.count > 0 else None
        dz = z - zbar if zbar is not None else z
        t = a @ (dz.T @ dz)  # A C
        spread = ((t * a).sum(1).amax().clamp_min(0.0) / max(self.count, 1)).sqrt()  # from diag(A C Aᵀ)
        mean = None if zbar is None else a @ zbar
        self.origin = None if mean is None else mean.to(dtype)
        self.scale = _pow2_scale(spread, spread if mean is None else _absmax(mean))
        s_x = a @ dz.sum(0)
        if mean is not None and self.origin is not None:  # Σ(x − origin) about the rounded origin
            s_x = s_x + (mean - self.origin.to(torch.float64)) * self.count
        self.s_x = (s_x / self.scale).to(dtype)
        self.s_xx = None  # Σuuᵀ = (A C/s)(A/s)ᵀ, added to the window by one product (add_call)
        self.factors = ((t / self.scale).to(dtype), (a / self.scale).to(dtype))
        return self


def _at_least_one(v: Tensor | float) -> Tensor | float:
    """``max(v, 1)`` for a count that is a Python number or a device tensor (a safe divisor)."""
    return v.clamp_min(1.0) if isinstance(v, Tensor) else max(v, 1.0)


def _sqrt(v: Tensor | float) -> Tensor | float:
    """``√v`` for a Python number or a tensor."""
    return v.sqrt() if isinstance(v, Tensor) else math.sqrt(v)


def _window_mean(p_x: Tensor, n_w: Tensor | float, shift: Tensor) -> tuple[Tensor, Tensor]:
    """A window's mean ``c + sΣu/n_w`` and ``v = sΣu/√n_w`` (``p_x = sΣu``; 0 rows count as 1): its second
    moment about that mean is ``s²Σuuᵀ − v vᵀ``."""
    safe = _at_least_one(n_w)
    return shift + p_x / safe, p_x / _sqrt(safe)


class _Moment:
    """Streaming second moment of the rows ``x`` of one matrix (``H_a``, ``H_b``, ``G_a`` or ``G_b``) of a layer.

    Totals, float64: the count ``n``, an origin ``o``, ``s_x = Σ(x − o)`` and ``s_xx = Σ(x − o)(x − o)ᵀ``.
    Raw moments keep ``o = 0`` (``s_xx = Σ x xᵀ``). Centred moments never form ``Σ x xᵀ − n μ μᵀ`` (which
    cancels catastrophically when the mean is large against the spread, e.g. inputs of 1000 + N(0, 1)):

    * a window of at most ``_FOLD_EVERY`` calls accumulates, in the working dtype,
      ``u = (x − c)/s`` with the shift ``c`` = the mean of the window's first call and a power-of-two
      scale ``s`` (:func:`_pow2_scale`), i.e. ``Σu`` and ``Σuuᵀ`` (in every mode: a working-dtype
      ``Σxxᵀ`` of rows far from 0 would round their spread away);
    * the fold turns the window into float64 ``(n_w, mean_w, M2_w)`` and merges it into the totals with
      Chan, Golub & LeVeque's parallel update (1979)
      ``M2 ← M2 + M2_w + δδᵀ n n_w/(n + n_w)``, ``μ ← μ + δ n_w/(n + n_w)``, ``δ = mean_w − μ``;
      the totals then keep ``o = μ`` and ``s_x = 0``. Raw totals add the shift back in float64 instead:
      ``Σxxᵀ ← Σxxᵀ + M2_w + n_w mean_w mean_wᵀ``, ``Σx ← Σx + n_w mean_w``.

    ``ok`` (a 0-d bool tensor, deferred finiteness checks) masks a whole contribution to exact zeros.

    Sketched (``probe`` = a fixed float64 ``d × m`` matrix ``P``): every second-moment sum is kept
    multiplied by ``P`` on the right (``s_xx = Σ(x − o)(x − o)ᵀ P``, ``d × m``). Everything above is
    linear in the second moment, so each outer product ``a bᵀ`` of the updates becomes ``a (Pᵀb)ᵀ`` and the
    sketch of the exact totals is kept with the same shifts, scales and merges (no cancellation either).
    """

    __slots__ = (
        "centered", "n", "origin", "probe", "_probes", "s_x", "s_xx", "w_n", "w_flagged", "w_shift", "w_scale", "w_x", "w_xx",
        "_spare",
        "_k",
        "_offset",
    )

    def __init__(self, centered: bool, probe: Tensor | None = None) -> None:
        self.centered = centered
        self.probe = probe
        self._probes: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self.n: Tensor | float | None = None
        self.origin: Tensor | None = None
        self.s_x: Tensor | None = None
        self.s_xx: Tensor | None = None
        self._spare: Tensor | None = None  # the last window's Σuuᵀ buffer, zeroed, for the next window
        self._clear_window()

    def probe_like(self, like: Tensor) -> Tensor | None:
        """The probe in ``like``'s dtype and device (cached), None for an exact moment."""
        if self.probe is None:
            return None
        key = (like.dtype, like.device)
        if key not in self._probes:
            self._probes[key] = self.probe.to(device=like.device, dtype=like.dtype)
        return self._probes[key]

    def _right(self, b: Tensor) -> Tensor:
        """``b``, or ``Pᵀb`` for a sketched moment: the right factor of an outer product ``a bᵀ`` here."""
        p = self.probe_like(b)
        return b if p is None else b @ p

    def reduce(self, rows: Tensor) -> _CallMoment:
        """One call's rows reduced now (exact or sketched like this moment)."""
        return _CallMoment(rows, self.probe_like(rows))

    def _clear_window(self) -> None:
        """Start an empty window (``w_n = 0``; shift, scale and partial sums opened by the next call)."""
        self.w_n = 0  # rows of the calls added without a flag
        self.w_flagged: list[tuple[Tensor, int]] = []  # (device flag, rows) of calls added under deferred checks
        self.w_shift: Tensor | None = None
        self.w_scale: Tensor | None = None
        self.w_x: Tensor | None = None
        self.w_xx: Tensor | None = None
        # per window, in the rows' dtype, made once instead of per call: factor/s by factor, and −c/s
        self._k: dict[float, Tensor] = {}
        self._offset: Tensor | None = None

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet (no totals and no open window)."""
        return self.s_xx is None and self.w_xx is None

    def _match(self, like: Tensor) -> None:
        """Fold the window first when ``like`` has another dtype or device than its partial sums."""
        if self.w_xx is not None and (self.w_xx.dtype != like.dtype or self.w_xx.device != like.device):
            self.fold()  # the model changed dtype/device mid-window

    def _open(self, shift: Tensor, scale: Tensor, ok: Tensor | None, like: Tensor) -> None:
        """Open a window with shift ``c`` and scale ``s`` (neutral ``c = 0, s = 1`` where ``ok`` is False)."""
        if ok is not None:
            scale = torch.where(ok, scale, torch.ones_like(scale))
            shift = torch.where(ok, shift, 0.0)
        self.w_shift = shift
        self.w_scale = scale
        d = like.shape[-1]  # rows (n × d) or a call's Σu (d)
        m = d if self.probe is None else self.probe.shape[1]
        self.w_x = torch.zeros(d, dtype=like.dtype, device=like.device)
        spare, self._spare = self._spare, None
        if spare is not None and spare.shape == (d, m) and spare.dtype == like.dtype and spare.device == like.device:
            self.w_xx = spare  # zeroed in place by the fold: no fresh d × m allocation (page faults) per window
        else:
            self.w_xx = torch.zeros(d, m, dtype=like.dtype, device=like.device)

    def add_rows(self, rows: Tensor, factor: float, ok: Tensor | None) -> None:
        """Add the rows ``x = factor · rows`` (working dtype, ``(n, d)``)."""
        if rows.shape[0] == 0:
            return
        self._match(rows)
        if self.w_xx is None:
            x0 = rows * factor
            shift = x0.mean(0)
            dev = x0 - shift
            self._open(shift, _pow2_scale(_absmax(dev), _absmax(x0)), ok, rows)
        assert self.w_scale is not None and self.w_shift is not None and self.w_xx is not None and self.w_x is not None
        k = self._k.get(factor)
        if k is None:
            k = self._k[factor] = (factor / self.w_scale).to(rows.dtype)
        if self._offset is None:
            self._offset = (self.w_shift / self.w_scale).to(rows.dtype).neg_()
        u = torch.addcmul(self._offset, rows, k)  # u = rows·factor/s − c/s in one fused pass
        if ok is not None:
            u = torch.where(ok, u, 0.0)
        probe = self.probe_like(u)
        if probe is None:
            _gram_upper_(self.w_xx, u)
        else:
            self.w_xx.addmm_(u.T, u @ probe)
        self.w_x.add_(u.sum(0))
        self._count(rows.shape[0], ok)

    def add_call(self, c: _CallMoment, ok: Tensor | None) -> None:
        """Add one call reduced in its forward hook, re-expressed in the window's coordinates.

        With ``u_c = (x − o_c)/s_c`` and the window's ``u = (x − c)/s = r u_c + e`` (``r = s_c/s``,
        ``e = (o_c − c)/s``): ``Σuuᵀ = r² Σu_cu_cᵀ + r(Σu_c eᵀ + e Σu_cᵀ) + n eeᵀ``, ``Σu = r Σu_c + n e``.
        Every term adds (``Σu_c ≈ 0`` in centred mode): no cancellation.
        """
        if c.count == 0:
            return
        self._match(c.s_x)
        assert c.origin is not None  # every call with rows has its mean as origin
        if self.w_xx is None:
            self._open(c.origin, c.scale, ok, c.s_x)
        assert self.w_scale is not None and self.w_shift is not None and self.w_xx is not None and self.w_x is not None
        r = (c.scale / self.w_scale).to(c.s_x.dtype)
        s_x = c.s_x * r
        # the shift terms s_x eᵀ + e s_xᵀ + n e eᵀ = [s_x e] [e, s_x + n e]ᵀ
        e = ((c.origin - self.w_shift) / self.w_scale).to(c.s_x.dtype)
        left, right = [s_x, e], [self._right(e), self._right(s_x + e * c.count)]
        s_x = s_x + e * c.count
        if ok is not None:
            s_x = torch.where(ok, s_x, 0.0)
        self.w_x.add_(s_x)
        if c.factors is not None:  # Σuuᵀ = L Rᵀ: everything in one product with the window (exact moments only)
            assert self.probe is None
            big_l = torch.cat([c.factors[0] * (r * r), *(v.unsqueeze(1) for v in left)], 1)
            big_r = torch.cat([c.factors[1], *(v.unsqueeze(1) for v in right)], 1)
            if ok is not None:
                big_l, big_r = torch.where(ok, big_l, 0.0), torch.where(ok, big_r, 0.0)
            self.w_xx.addmm_(big_l, big_r.T)
        else:
            assert c.s_xx is not None
            s_xx = c.s_xx.mul_(r * r)  # in place: a call is committed once and then dropped
            s_xx.addmm_(torch.stack(left, 1), torch.stack(right))  # one pass over the d × d sums
            if ok is not None:
                s_xx = torch.where(ok, s_xx, 0.0)
            self.w_xx.add_(s_xx)
        self._count(c.count, ok)

    def _count(self, rows: int, ok: Tensor | None) -> None:
        """Count a call's rows in the window (a flagged call's only if its device flag ``ok`` is True)."""
        if ok is None:
            self.w_n += rows
        else:
            self.w_flagged.append((ok, rows))

    def _window_count(self) -> Tensor | float:
        """The window's rows: a Python count, or a float64 device count when calls came with flags (read
        once per window here, not per call: no host sync, a few kernels per fold)."""
        if not self.w_flagged:
            return float(self.w_n)
        by_rows: dict[int, list[Tensor]] = {}
        for ok, rows in self.w_flagged:  # usually one row count (the batch): one stack and sum per window
            by_rows.setdefault(rows, []).append(ok)
        total: Tensor | float = float(self.w_n)
        for rows, oks in by_rows.items():
            total = total + torch.stack(oks).sum(dtype=torch.float64) * rows
        assert isinstance(total, Tensor)
        return total

    def add(self, item: Tensor | _CallMoment, ok: Tensor | None) -> None:
        """Add a pending item of one call: its rows (:meth:`add_rows`) or its reduction (:meth:`add_call`)."""
        if isinstance(item, _CallMoment):
            self.add_call(item, ok)
        else:
            self.add_rows(item, 1.0, ok)

    def fold(self) -> None:
        """Merge the window into the float64 totals (Chan's update in centred mode).

        The first fold turns the window into the totals; later ones update the totals in row panels of
        ``_SYRK_PANEL`` (exact moments: the upper triangle only, which is all the totals keep valid, see
        :meth:`about`), so no float64 temporary of the totals' size is made, and the window's buffer is
        zeroed in place for the next window.
        """
        if self.w_xx is None or self.w_x is None or self.w_scale is None:
            return
        f64 = torch.float64
        s = self.w_scale
        w_xx = self.w_xx
        p_x = self.w_x.to(f64) * s
        n_w = self._window_count()
        assert self.w_shift is not None
        shift = self.w_shift.to(f64)
        self._clear_window()
        if self.s_xx is None or self.s_x is None or self.n is None:
            self._first_fold(w_xx.to(f64).mul_(s * s), p_x, n_w, shift)  # (a new tensor unless w_xx is float64)
        else:
            self._merge(w_xx, s, p_x, n_w, shift)
        assert self.s_xx is not None
        if w_xx.untyped_storage().data_ptr() != self.s_xx.untyped_storage().data_ptr():
            self._spare = w_xx.zero_()

    def _merge(self, w_xx: Tensor, s: Tensor, p_x: Tensor, n_w: Tensor | float, shift: Tensor) -> None:
        """Chan's update of the totals with a window (``s²Σuuᵀ`` from ``w_xx`` panel by panel, ``sΣu = p_x``)."""
        assert self.s_xx is not None and self.s_x is not None and self.n is not None
        dev = self.s_xx.device
        p_x, s = p_x.to(dev), s.to(dev)
        n_w = n_w.to(dev) if isinstance(n_w, Tensor) else n_w
        mean_w, v = _window_mean(p_x, n_w, shift.to(dev))
        if not self.centered:  # Σxxᵀ += (M2_w + v vᵀ) − v vᵀ + e eᵀ with e = √n_w · mean_w
            e = mean_w * _sqrt(_at_least_one(n_w))
            self.n, self.s_x = self.n + n_w, self.s_x + e * _sqrt(_at_least_one(n_w))
            self._add_panels(w_xx, s, v, e)
        else:
            assert self.origin is not None
            total = self.n + n_w
            delta = mean_w - self.origin
            frac = n_w / _at_least_one(total)
            self.origin = self.origin + delta * frac
            e = delta * _sqrt(self.n * frac)  # M2 += M2_w + e eᵀ,  e eᵀ = δδᵀ n n_w/(n + n_w)
            self._add_panels(w_xx, s, v, e)
            self.n = total

    def _first_fold(self, p_xx: Tensor, p_x: Tensor, n_w: Tensor | float, shift: Tensor) -> None:
        """The totals from the first window (float64 ``s²Σuuᵀ = p_xx``, ``sΣu = p_x``)."""
        mean_w, v = _window_mean(p_x, n_w, shift)
        m2 = p_xx.addr_(v, self._right(v), alpha=-1.0)
        if not self.centered:  # Σxxᵀ = M2_w + n_w mean_w mean_wᵀ, Σx = n_w mean_w
            self.n, self.s_x = n_w, mean_w * _at_least_one(n_w)
            self.s_xx = m2.addr_(mean_w, self._right(self.s_x))
            return
        self.n, self.origin, self.s_xx = n_w, mean_w, m2
        self.s_x = torch.zeros_like(self.origin)

    def _add_panels(self, w_xx: Tensor, s: Tensor, v: Tensor | None, e: Tensor | None) -> None:
        """``s_xx += s²·w_xx − v (Pᵀv)ᵀ + e (Pᵀe)ᵀ`` (terms with None left out) in row panels.

        Exact moments update the upper triangle only (``[i:i+p, i:]``); sketched ones whole rows.
        Per entry the same float64 operations in the same order as one whole-matrix update.
        """
        assert self.s_xx is not None
        dev, f64 = self.s_xx.device, torch.float64
        rv = None if v is None else self._right(v)
        re = None if e is None else self._right(e)
        exact = self.probe is None
        d = w_xx.shape[0]
        rows = _SYRK_PANEL if dev.type in _CPU_ROUTE else max(_SYRK_PANEL, _FOLD_PANEL_BYTES // (8 * w_xx.shape[1]))
        for i in range(0, d, rows):
            j = min(i + rows, d)
            c = i if exact else 0
            blk = w_xx[i:j, c:].to(dev, f64).mul_(s * s)
            if v is not None and rv is not None:
                blk.addr_(v[i:j], rv[c:], alpha=-1.0)
            out = self.s_xx[i:j, c:].add_(blk)
            if e is not None and re is not None:
                out.addr_(e[i:j], re[c:])

    #: Deviations from the mean up to this many float64 units of roundoff of the mean are rounding (see ``about``).
    _ROUNDING_ULPS = 16.0

    def _rounding_only(self) -> bool:
        """Whether a centred moment's spread is the float64 rounding of its merges: every
        ``Σ(x_j − μ_j)²/n ≤ (16 ε₆₄ μ_j)²``. Rows that are all equal have zero covariance, but windows merged about
        shifts that are not exactly their mean (40 rows of ``0.3·v``) leave ~1e-31: a finite α from rounding.
        (A spread of the rows themselves is at least one ulp of their own dtype, far above.) One host read, at
        ``compute()`` only."""
        if not self.centered or self.probe is not None or self.origin is None or self.s_xx is None or self.n is None:
            return False
        n = float(self.n)
        if n <= 0:
            return False
        var = torch.diagonal(self.s_xx) / n
        bound = (self._ROUNDING_ULPS * torch.finfo(torch.float64).eps * self.origin) ** 2
        return bool((var <= bound).all())

    def total_x(self) -> Tensor | None:
        """``Σ x`` in float64 (after :meth:`fold`), None when empty."""
        if self.s_x is None or self.n is None:
            return None
        return self.s_x if self.origin is None else self.s_x + self.n * self.origin

    def about(self, point: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``(Σ(x − p), Σ(x − p)(x − p)ᵀ)`` in float64 about ``point`` (None: the totals' own origin).

        Exact moments give only the upper triangle of ``Σ(x − p)(x − p)ᵀ`` (diagonal included; the lower
        blocks of a wide Gram are not computed): read it with :func:`symmetric_from_upper`. Sketched
        moments (``d × m``) are complete.

        Re-centring from the origin ``o`` (``δ = o − p``) adds ``s_x δᵀ + δ s_xᵀ + n δδᵀ``: no cancellation
        when ``p`` is the mean of a superset (the distributed reduction) since ``s_x = 0`` then.
        """
        if self.s_x is None or self.s_xx is None or self.n is None:
            return None
        s_xx = self.s_xx  # exact moments: the upper triangle is valid (symmetric_from_upper reads it)
        if self._rounding_only():
            s_xx = torch.zeros_like(s_xx)
        if point is None or self.origin is None:
            return self.s_x, s_xx
        delta = self.origin - point.to(self.origin.device)
        s_xx = s_xx + torch.outer(self.s_x, self._right(delta)) + torch.outer(delta, self._right(self.s_x))
        s_xx = s_xx + torch.outer(delta, self._right(delta)) * self.n
        return self.s_x + delta * self.n, s_xx


class _LayerState:
    """Running statistics of one layer: four :class:`_Moment` and the float64 balance scalars."""

    def __init__(self, centered: bool, probes: dict[str, Tensor] | None = None) -> None:
        self.moments: dict[str, _Moment] = {
            k: _Moment(centered, None if probes is None else probes[k[1]]) for k in _MOMENTS
        }
        self.scalars: dict[str, Tensor] = {}  # float64 sums of the ``scalar`` accumulators (gnhn, gh)
        self.partial_commits = 0
        self.n = 0  # committed rows (samples)
        self.steps = 0  # committed layer calls
        self.skipped = 0  # calls dropped by the non-finite policy
        # deferred finiteness checks per committed call: (call, what was checked, the checked sums of
        # squares, the call's device flag ``all finite``, rows)
        self.checks: list[tuple[int, tuple[str, ...], Tensor, Tensor, int]] = []

    def add_scalar(self, key: str, value: Tensor) -> None:
        """``scalars[key] += value`` (a fresh tensor: a retained graph may commit the same value twice)."""
        old = self.scalars.get(key)
        self.scalars[key] = value.clone() if old is None else old + value.to(old.device)

    def commit(self, rows: int) -> None:
        """Count one committed call of ``rows`` samples; fold the windows every :data:`_FOLD_EVERY` calls."""
        self.n += rows
        self.steps += 1
        self.partial_commits += 1
        if self.partial_commits >= _FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Merge every moment's window into its float64 totals (:meth:`_Moment.fold`)."""
        for m in self.moments.values():
            m.fold()
        self.partial_commits = 0


#: Row norms inside ``(_NORM_LO, _NORM_HI)`` are taken in float32 on the CPU (squares of every entry
#: of such a row neither overflow nor lose more than float32 rounding to underflow).
_NORM_LO, _NORM_HI = 1e-12, 1e18


class RowNorms:
    """The row norms of one call's rows ``x`` (:func:`_row_norm2`), each form made once and only if used.

    Built from either ``norm``, ``‖x_i‖`` in ``x``'s float32 (the CPU route, ``checked``: every norm was
    seen inside ``(1e-12, 1e18)`` on the host, so every entry of ``x`` is finite and no row is zero), or
    ``root``, ``‖x_i‖`` in float64 (finite for every finite float32 row, even of 1e30). ``sq`` is
    ``‖x_i‖²`` in float64, :meth:`total` their sum (the policy check),
    :meth:`norm` the norm in a given dtype (what :func:`_normalize` divides by).
    """

    __slots__ = ("_sq", "_norm", "_root", "checked")

    def __init__(self, *, norm: Tensor | None = None, root: Tensor | None = None, checked: bool = False) -> None:
        assert (norm is None) != (root is None)
        self._sq: Tensor | None = None
        self._norm, self._root, self.checked = norm, root, checked

    @property
    def sq(self) -> Tensor:
        if self._sq is None:
            if self._root is not None:
                self._sq = self._root.square()
            else:
                assert self._norm is not None
                self._sq = self._norm.to(torch.float64).square_()  # exact: a float32's square fits a float64
        return self._sq

    def total(self) -> Tensor:
        """``Σ_i ‖x_i‖²`` in float64: NaN/inf exactly when a row holds a NaN/inf or its squares overflow
        float64 (float64 rows beyond ~1e154, whose float64 moments would overflow too)."""
        return self.sq.sum()

    def norm(self, dtype: torch.dtype) -> Tensor:
        if self._norm is None or self._norm.dtype != dtype:
            self._norm = self._root.to(dtype) if self._root is not None else self.sq.sqrt().to(dtype)
        return self._norm


def _row_norm2(x: Tensor) -> RowNorms:
    """The row norms of ``x`` (:class:`RowNorms`).

    float32 CPU rows first try ``‖x_i‖`` in float32 (no float64 copy of the rows: ~6× faster); when a
    norm falls outside ``(1e-12, 1e18)`` (possible overflow or underflow, a zero row, NaN/inf) the
    float64 reduction is taken instead. The check reads two numbers on the host: free on the CPU,
    so accelerators keep the float64 route (no sync).
    """
    if x.dtype == torch.float32 and x.device.type in _CPU_ROUTE and x.shape[0] > 0 and x.shape[1] > 0:
        norm = torch.linalg.vector_norm(x, dim=1)
        lo, hi = torch.aminmax(norm)
        if _NORM_LO < float(lo) and float(hi) < _NORM_HI:  # False for NaN
            return RowNorms(norm=norm, checked=True)
    return RowNorms(root=torch.linalg.vector_norm(x, dim=1, dtype=torch.float64))


def _normalize(x: Tensor, norms: RowNorms) -> Tensor:
    """``x_i / ‖x_i‖`` (zero rows stay zero and still count).

    A division by the norm (never a multiplication by its inverse): ``|x_ij| ≤ ‖x_i‖``, so nothing
    overflows, even for rows of 1e-30 whose inverse norm would. A zero norm is raised to the dtype's
    smallest subnormal (which no other norm is below), so a zero row divides to zeros.
    """
    norm = norms.norm(x.dtype)
    if not norms.checked:  # checked norms are all ≥ 1e-12
        info = torch.finfo(x.dtype)
        norm = norm.clamp_min(info.tiny * info.eps)
    return x / norm.unsqueeze(1)


def _narrow(n: int, m: int, d: int) -> bool:
    """Whether rows ``x = A z`` (``z``: ``n × m``, ``x``: ``n × d``) are cheaper through ``A [Σzzᵀ] Aᵀ``.

    ``2(d²m + n m²)`` (float64 priced double) against ``n d²/2`` for the rows' symmetric Gram.
    """
    return 4 * m * (d * d + n * m) < n * d * d


def _inverse_norm(norm2: Tensor) -> Tensor:
    """``1/‖x_i‖`` from float64 squared norms (0 for a zero row, which stays zero)."""
    return torch.where(norm2 > 0, norm2.rsqrt(), torch.zeros_like(norm2))


def _balance_sums(
    gb: Tensor, gb_norm2: Tensor, ha_norm2: Tensor, wh: Tensor, scale: float, ok: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One call's float64 balance sums ``(Σ_i ‖g_b‖²‖h_a‖², Σ_i ⟨g_b, W h_a⟩)`` with ``g_b = −scale · dL/dh_b``.

    ``gb``: the rows ``dL/dh_b`` (``n × d_b``), ``gb_norm2``/``ha_norm2``: their and ``h_a``'s float64 squared
    row norms, ``wh``: the rows ``W h_a = h_b − b``. The first sum is of squared per-sample weight-gradient
    norms (``‖g_b h_aᵀ‖² = ‖g_b‖²‖h_a‖²``); the second is one dot in the working dtype (its products stay in
    range unless ``|g_ij h_ij| > 3e38`` in float32), summed in float64. ``ok = False`` gives exact zeros.
    """
    gnhn = (gb_norm2 * ha_norm2).sum() * (scale * scale)
    gh = torch.dot(gb.reshape(-1), wh.reshape(-1)).double() * (-scale)
    if ok is not None:
        gnhn, gh = torch.where(ok, gnhn, 0.0), torch.where(ok, gh, 0.0)
    return gnhn, gh
