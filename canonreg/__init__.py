"""canonreg: measure and induce canonical representations in PyTorch models.

Implements the Canonical Representation Hypothesis (CRH) and Polynomial Alignment Hypothesis (PAH)
of Ziyin, Chuang, Galanti & Poggio, "Formation of Representations in Neural Networks"
(arXiv:2410.03006, ICLR 2025), and the noise-equilibrium mechanism of Ziyin, Wang, Li & Wu
(arXiv:2402.07193).

The theory, in the project's words, is ``docs/theory.md`` in the repository; docstrings cite its
sections as "theory §N".
"""

from . import functional
from .errors import CanonRegError
from .functional import RELATION_PAIRS, RELATIONS, BalanceTerms, PowerLawFit
from .losses import AlignmentLoss, alignment_loss, crh_loss
from .measure import measure_crh, min_alignment
from .monitor import CRHMonitor
from .optim import NoiseCalibrated
from .report import CRHReport
from .taps import ConvTap, LayerTap, LinearTap, mask_from_inputs, masked, register_tap
from .writers import CSVWriter, TensorBoardWriter

__version__ = "0.1.0"

__all__ = [
    "functional",
    "CanonRegError",
    "RELATIONS",
    "RELATION_PAIRS",
    "BalanceTerms",
    "PowerLawFit",
    "CRHMonitor",
    "measure_crh",
    "min_alignment",
    "AlignmentLoss",
    "alignment_loss",
    "crh_loss",
    "NoiseCalibrated",
    "CSVWriter",
    "TensorBoardWriter",
    "CRHReport",
    "LayerTap",
    "LinearTap",
    "ConvTap",
    "register_tap",
    "masked",
    "mask_from_inputs",
]
