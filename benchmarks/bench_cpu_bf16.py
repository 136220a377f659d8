"""Network time per batch of 512² tiles on the CPU: bfloat16 autocast vs the bfloat16 inference copy.

    python benchmarks/bench_cpu_bf16.py [--threads 2] [--batch 4] [--repeats 7] [--json out.json]

For each shipped network (GeNSeg-Net's generator and U-Net, HARU-Net) the two ways run
interleaved on the same random input, repeat after repeat; the table gives the median seconds per
batch, the ratio, and the largest absolute difference of the outputs. Run on an otherwise idle
machine (no training in the background).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import hardware  # noqa: E402


def networks():
    from nucli.models.registry import build_method

    g = build_method("gensegnet", None, "cpu")
    h = build_method("harunet", None, "cpu")
    return {"gensegnet.generator": (g.generator, lambda y: y), "gensegnet.unet": (g.unet, lambda y: y),
            "harunet": (h.net, lambda y: y[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from nucli.models.cpu_bf16 import inference_copy

    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    result = {"hardware": hardware(), "threads": args.threads, "batch": args.batch, "size": args.size,
              "repeats": args.repeats, "networks": {}}
    for name, (net, first) in networks().items():
        net = net.eval().to(memory_format=torch.channels_last)
        fast = inference_copy(net)

        def autocast():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return first(net(x)).float()

        def copy():
            with torch.inference_mode():
                return first(fast(x.to(torch.bfloat16))).float()

        times = {"autocast": [], "bf16_copy": []}
        outs = {}
        for rep in range(args.repeats + 1):  # the first round warms up
            for label, fn in (("autocast", autocast), ("bf16_copy", copy)):
                t = time.perf_counter()
                outs[label] = fn()
                if rep:
                    times[label].append(time.perf_counter() - t)
        a, b = median(times["autocast"]), median(times["bf16_copy"])
        result["networks"][name] = {"autocast_s": round(a, 4), "bf16_copy_s": round(b, 4), "speedup": round(a / b, 3),
                                    "max_abs_diff": round(float((outs["autocast"] - outs["bf16_copy"]).abs().max()), 4)}
        print(f"{name}: autocast {a:.3f} s, bf16 copy {b:.3f} s per batch of {args.batch} ({a / b:.2f}x)",
              file=sys.stderr, flush=True)
    result["load_after"] = hardware()["load_1_5_15"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
