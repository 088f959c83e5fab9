"""What measuring ``nn.MultiheadAttention`` as q, k, v, out costs (canonreg.attention), against plain training.

Model: token embedding (``nn.Linear``) → ``nn.TransformerEncoderLayer`` (its ``self_attn`` is an
``nn.MultiheadAttention``; ``need_weights=False``, so torch's fused attention kernel) → per-token head,
trained with SGD on random tokens. Contenders, timed in interleaved rounds (``benchmarks/_harness.py``):

* ``plain``: the training step;
* ``opened``: the attention opened on every step (the engine's hooks and the ``TorchFunctionMode``
  that delivers the four projections' calls) with an owner that takes nothing: the cost of reaching
  q, k, v and out at all;
* ``monitor``: a ``CRHMonitor`` (``--mode``) on every layer, the attention as ``attn[q|k|v|out]``;
* ``monitor-no-attn``: the same monitor on the other layers only (``layers=`` without the attention).

``monitor`` − ``monitor-no-attn`` is what the four attention layers add. Printed: median ratio to
``plain`` (wall and process CPU clock) and the load average.

    python benchmarks/attention_overhead.py
    python benchmarks/attention_overhead.py --d-model 256 --heads 8 --batch 16 --seq 64 --rounds 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Contender, Runner, fmt_ratio, interleaved, loadavg, markdown_table, sgd_step  # noqa: E402

import canonreg  # noqa: E402
from canonreg.capture import Capture  # noqa: E402


class Encoder(nn.Module):
    def __init__(self, d_in: int, d_model: int, heads: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.block = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def contenders(args: argparse.Namespace) -> list[Contender]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, 32, generator=g)
    y = torch.randint(0, 10, (args.batch, args.seq), generator=g)

    def build(kind: str) -> Runner:
        torch.manual_seed(0)
        model = Encoder(32, args.d_model, args.heads, 10)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        step = sgd_step(model, opt, x, y)
        if kind == "plain":
            return Runner(step)
        if kind == "opened":
            seen = [0]

            def on_call(call: object) -> None:
                seen[0] += 1

            cap = Capture(model, ["block.self_attn"], owner_kind="benchmark", on_call=on_call).attach()
            return Runner(step, close=lambda: {"calls": seen[0], "attached": cap.attached})
        layers = None if kind == "monitor" else (lambda n, m: isinstance(m, nn.Linear) and not n.startswith("block.self_attn"))
        monitor = canonreg.CRHMonitor(model, layers, preprocess=args.mode).attach()
        return Runner(step, close=lambda: {"layers": list(monitor.layers)})

    kinds = ("plain", "opened", "monitor", "monitor-no-attn")
    return [Contender(k, "", lambda k=k: build(k)) for k in kinds]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--mode", default="normalized", choices=("raw", "centered", "normalized"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = loadavg()
    res = interleaved(contenders(args), rounds=args.rounds, warmup=2, log=lambda s: None)
    rows = [[name, fmt_ratio(r["ratio_wall"]), fmt_ratio(r["ratio_cpu"]), f"{r['seconds_wall'] * 1e3:.2f}", str(r["check"])[:80]] for name, r in res.items()]
    print(f"d_model {args.d_model}, heads {args.heads}, batch {args.batch} x {args.seq} tokens, mode {args.mode}, "
          f"{args.threads} thread(s), load {load} -> {loadavg()}")
    print(markdown_table(["contender", "× plain (wall)", "× plain (CPU)", "ms/step", "check"], rows))


if __name__ == "__main__":
    main()
