"""Integrations with training frameworks (optional extras).

* :func:`flat_metrics` — a :class:`~canonreg.CRHReport` as ``{key: float}`` with keys that W&B,
  MLflow and TensorBoard all accept (no framework needed).
* :mod:`canonreg.integrations.lightning` — :class:`~canonreg.integrations.lightning.CRHCallback`, a
  Lightning ``Callback`` (``pip install 'canonreg[lightning]'``).
* :mod:`canonreg.integrations.hf` — :class:`~canonreg.integrations.hf.CRHTrainerCallback`, a
  ``transformers`` ``TrainerCallback`` whose metrics reach ``report_to``
  (``pip install 'canonreg[hf]'``).

The framework submodules import their framework when they are imported, never before: importing
``canonreg`` or ``canonreg.integrations`` imports neither ``lightning`` nor ``transformers``.
"""

from __future__ import annotations

from .flat import flat_metrics, metric_key

__all__ = ["flat_metrics", "metric_key"]
