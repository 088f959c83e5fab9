"""Time of :meth:`canonreg.CRHMonitor.compute` with and without effective ranks and exponents.

Models (``--model``):

* ``convs`` (default): four independent 3×3 convolutions of resnet10t's widths (64→64, 128→128,
  256→256, 512→512, padding 1), each on its own input of batch 8 and 4×4 positions (128 sample rows
  per layer), one backward pass of ``Σ mean(out²)``. A convolution's ``H_a``, ``G_a`` and ``Z_a`` are
  ``(C_in·9)``-sized (576 … 4608).
* ``linear``: one ``nn.Linear(width, width)`` (default 4096) on a batch of 256 rows.

Every variant (× ``--gram-dtypes``) is timed on the same monitor, ``--repeat`` times in turn (the median
is printed), after one untimed ``compute()`` that folds the monitor's pending rows into its sums (a
cost of the training steps, which a long run pays as it goes, not of ``compute()``);
``report.timings`` gives the split (reduce, matrices, alignment, exponents, ranks). Wall seconds and
process CPU seconds are both printed: on a shared, loaded machine the CPU time is the cost of the
call, the wall time also counts waiting for a core. The load average is printed before and after.

    python benchmarks/compute_time.py                           # convs, all four variants, 1 thread
    python benchmarks/compute_time.py --variants none --repeat 3 --threads 2
    python benchmarks/compute_time.py --model linear --width 4096 --variants none
    python benchmarks/compute_time.py --model linear --width 4096 --variants none --gram-dtypes float64,float32 --repeat 3
    python benchmarks/compute_time.py --threads 16 --device cuda

Prints one table row per variant (seconds). Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import statistics
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
PARTS = ("reduce", "matrices", "alignment", "exponents", "ranks")


class FourConvs(nn.Module):
    """Four independent ``C → C`` 3×3 convolutions (resnet10t's stage widths)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in WIDTHS)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return sum((conv(x).square().mean() for conv, x in zip(self.convs, xs)), torch.zeros((), device=xs[0].device))


def monitored(model_name: str, width: int, preprocess: str, device: torch.device) -> tuple[CRHMonitor, str]:
    """A monitor that has seen one forward/backward pass of the chosen model, and a description."""
    torch.manual_seed(0)
    if model_name == "convs":
        model: nn.Module = FourConvs().to(device)
        inputs = [torch.randn(8, c, 4, 4, device=device, requires_grad=True) for c in WIDTHS]
        about = f"layers {[f'{c}->{c} 3x3 (d_a={c * 9})' for c in WIDTHS]}"
    else:
        model = nn.Sequential(nn.Linear(width, width)).to(device)
        inputs = torch.randn(256, width, device=device, requires_grad=True)
        about = f"one Linear({width}, {width}), 256 rows"
    monitor = CRHMonitor(model, preprocess=preprocess)
    with monitor:
        out = model(inputs)
        (out if out.dim() == 0 else out.square().mean()).backward()
    return monitor, about


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="convs", choices=("convs", "linear"))
    parser.add_argument("--width", type=int, default=4096, help="width of --model linear (default 4096)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where the model and accumulators live (default cpu)")
    parser.add_argument("--variants", default="none,ranks,exponents,both", help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--repeat", type=int, default=1, help="timed calls per variant, interleaved (median printed)")
    parser.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples of the exponent fits")
    parser.add_argument("--preprocess", default="normalized", choices=("raw", "centered", "normalized"))
    parser.add_argument("--gram-dtypes", default="float64", help="comma-separated gram_dtype values of compute(): float64,float32")
    args = parser.parse_args()
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    grams = args.gram_dtypes.split(",")
    if any(g not in dtypes for g in grams):
        parser.error(f"--gram-dtypes takes a comma-separated subset of {list(dtypes)}, got {args.gram_dtypes!r}")
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = [n for n in variants if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    device = torch.device(args.device)
    monitor, about = monitored(args.model, args.width, args.preprocess, device)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, preprocess {args.preprocess}, {about}")
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    names = [f"{v}/{g}" if len(grams) > 1 else v for v in variants for g in grams]
    runs: dict[str, list[tuple[float, float, dict[str, float]]]] = {n: [] for n in names}
    monitor.compute(exponents=False, ranks=False)  # folds the pending window once: every timed call starts alike
    for _ in range(args.repeat):
        for name in names:
            exponents, ranks = VARIANTS[name.split("/")[0]]
            gram = dtypes[name.split("/")[1] if "/" in name else grams[0]]
            t0, c0 = time.perf_counter(), time.process_time()
            report = monitor.compute(exponents=exponents, ranks=ranks, n_bootstrap=args.n_bootstrap, gram_dtype=gram)
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0, report.timings))
    print(f"{'variant':<18}{'exponents':>10}{'ranks':>7}{'wall s':>9}{'cpu s':>8}" + "".join(f"{p:>11}" for p in PARTS))
    for name in names:
        exponents, ranks = VARIANTS[name.split("/")[0]]
        wall = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        cells = "".join(f"{statistics.median(r[2][p] for r in runs[name]):>11.3f}" for p in PARTS)
        print(f"{name:<18}{exponents!s:>10}{ranks!s:>7}{wall:>9.3f}{cpu:>8.3f}{cells}", flush=True)
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
