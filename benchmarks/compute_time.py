"""Time of :meth:`canonreg.CRHMonitor.compute` with and without effective ranks and exponents.

Model: four independent 3×3 convolutions of resnet10t's widths (64→64, 128→128, 256→256, 512→512,
padding 1), each on its own input of batch 8 and 4×4 positions (128 sample rows per layer), one
backward pass of ``Σ mean(out²)``. A convolution's ``H_a``, ``G_a`` and ``Z_a`` are ``(C_in·9)``-sized
(576 … 4608), so their eigendecompositions dominate ``compute()``. Every variant is timed on the same
monitor; ``report.timings`` gives the split (reduce, matrices, alignment, exponents, ranks).

    python benchmarks/compute_time.py                 # all four variants, 1 thread
    python benchmarks/compute_time.py --threads 16 --device cuda
    python benchmarks/compute_time.py --variants none,ranks

Prints one table row per variant (seconds). Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from canonreg import CRHMonitor

WIDTHS = (64, 128, 256, 512)
VARIANTS = {  # name: (exponents, ranks)
    "none": (False, False),
    "ranks": (False, True),
    "exponents": (True, False),
    "both": (True, True),
}


class FourConvs(nn.Module):
    """Four independent ``C → C`` 3×3 convolutions (resnet10t's stage widths)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in WIDTHS)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return sum((conv(x).square().mean() for conv, x in zip(self.convs, xs)), torch.zeros(()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where the model and accumulators live (default cpu)")
    parser.add_argument("--variants", default="none,ranks,exponents,both", help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples of the exponent fits")
    parser.add_argument("--preprocess", default="normalized", choices=("raw", "centered", "normalized"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FourConvs().to(device)
    xs = [torch.randn(8, c, 4, 4, device=device) for c in WIDTHS]
    monitor = CRHMonitor(model, preprocess=args.preprocess)
    with monitor:
        model([x.requires_grad_() for x in xs]).backward()
    parts = ("reduce", "matrices", "alignment", "exponents", "ranks")
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, preprocess {args.preprocess}, "
          f"layers {[f'{c}->{c} 3x3 (d_a={c * 9})' for c in WIDTHS]}")
    print(f"{'variant':<10}{'exponents':>10}{'ranks':>7}{'wall s':>9}" + "".join(f"{p:>11}" for p in parts))
    for name in names:
        exponents, ranks = VARIANTS[name]
        t0 = time.perf_counter()
        report = monitor.compute(exponents=exponents, ranks=ranks, n_bootstrap=args.n_bootstrap)
        wall = time.perf_counter() - t0
        cells = "".join(f"{report.timings[p]:>11.3f}" for p in parts)
        print(f"{name:<10}{exponents!s:>10}{ranks!s:>7}{wall:>9.3f}{cells}", flush=True)


if __name__ == "__main__":
    main()
