"""Where one KSA encoder forward spends its time: torch.profiler over the benchmark's model
(``recsys bench ksa``'s: d_model 64, 4 heads, 2 summary layers, C 8, S 1, W 16), one history of n
random tokens, eval mode, no gradients.

    python benchmarks/ksa_profile.py --n 16000 --kernel blocksparse

Prints the operators with the most self CPU time over ``--repeats`` forwards (after one untimed
warm-up), and the share of the attention calls (``aten::_scaled_dot_product_flash_attention_for_cpu``)
in the total: the rest is the O(n) work around them (plan, gathers, projections, MLP, norms, RoPE).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from models.ksa import KERNELS, KSABlock
from pipelines.bench import ksa_bench_config

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=16000, help="history length (default 16000)")
    p.add_argument("--kernel", choices=[k for k in KERNELS if k != "reference"], default="blocksparse")
    p.add_argument("--repeats", type=int, default=3, help="profiled forwards (default 3)")
    p.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    a = p.parse_args()
    if a.n < 1 or a.repeats < 1 or a.top < 1:
        p.error("--n, --repeats and --top must be >= 1")
    cfg = ksa_bench_config()
    torch.manual_seed(0)
    encoder = KSABlock(dim=16, cfg=cfg, interval_buckets=20, gap_buckets=20).eval().encoder
    x, lengths = torch.randn(a.n, cfg.d_model), np.array([a.n])
    with torch.no_grad():
        encoder(x, lengths, kernel=a.kernel)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.repeats):
                encoder(x, lengths, kernel=a.kernel)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    flash = sum(e.self_cpu_time_total for e in events if e.key == FLASH)
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.top))
    print(f"n = {a.n:,}, kernel {a.kernel}: {total / a.repeats / 1e3:,.1f} ms self CPU per forward; "
          f"attention calls {flash / max(total, 1):.0%}, the rest {1 - flash / max(total, 1):.0%}")


if __name__ == "__main__":
    main()
