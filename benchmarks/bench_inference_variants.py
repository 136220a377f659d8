"""CPU inference variants of the shipped networks: eager (what nucli runs), torch.compile, int8.

    python benchmarks/bench_inference_variants.py [--threads 2] [--repeats 5] [--batch 4] [--size 512]
                                                 [--methods gensegnet harunet] [--json out.json]

For each method: the seconds per tile of its network forward pass (GeNSeg-Net: generator + U-Net;
HARU-Net: the network) on a batch of real tiles (the CMU slide when ../shared/data is present, else
synthetic), median over repeats after a warm-up, in the precision nucli uses (bfloat16 autocast where
the CPU has it, channels-last), and how far each variant's outputs are from eager's (max |difference|
of the output maps). Variants:

* ``eager``: the shipped path;
* ``compile``: ``torch.compile`` (inductor) of the same module;
* ``int8``: post-training static quantization with PyTorch's PT2E flow and the x86 inductor quantizer
  (oneDNN), calibrated on the same tiles, then compiled. Skipped with the reason when it fails.

A variant is only worth adopting if the segmentation it gives keeps val AJI within 0.003 (measure that
with `nucli evaluate` on a build that uses it); this script measures speed and output drift only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gensegnet import real_tiles  # noqa: E402


def _nets(method_name: str):
    """The built method and its networks, as (name, module) pairs."""
    from nucli.models.registry import build_method

    m = build_method(method_name)
    if method_name == "gensegnet":
        return m, [("generator", m.generator), ("unet", m.unet)]
    return m, [("network", m.net)]


def _time(fn, x, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        fn(x)  # warm-up
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def _input_for(method: object, name: str, tiles: np.ndarray):
    """The tensor the module ``name`` of ``method`` sees for ``tiles`` (through the method's own preprocessing)."""
    import torch

    captured = {}
    net = getattr(method, name) if name != "network" else method.net
    handle = net.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach().clone()))
    try:
        method.infer(tiles) if hasattr(method, "infer") else method.segment(tiles)
    finally:
        handle.remove()
    return captured["x"].float().contiguous(memory_format=torch.channels_last)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["gensegnet", "harunet"])
    ap.add_argument("--variants", nargs="+", default=["eager", "compile", "int8"])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    tiles = real_tiles(a.batch, a.size)
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    results: dict = {"threads": a.threads, "batch": a.batch, "size": a.size, "bf16": bool(bf16), "methods": {}}
    for name in a.methods:
        method, nets = _nets(name)
        res: dict = {}
        for part, net in nets:
            x = _input_for(method, part, tiles)
            net = net.eval()

            def run(module):
                def f(inp):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
                        return module(inp)
                return f

            def first(out):
                return (out[0] if isinstance(out, (tuple, list)) else out).float()

            row: dict = {}
            with torch.inference_mode():
                ref = first(run(net)(x))
            for variant in a.variants:
                try:
                    if variant == "eager":
                        fn = run(net)
                    elif variant == "compile":
                        fn = run(torch.compile(net))
                    else:
                        fn = _int8(net, x)
                    t = _time(fn, x, a.repeats)
                    with torch.inference_mode():
                        diff = float((first(fn(x)) - ref).abs().max())
                    row[variant] = {"s_per_tile": round(t / a.batch, 4), "max_abs_diff_vs_eager": round(diff, 5)}
                except Exception as exc:  # noqa: BLE001 (report and go on)
                    row[variant] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                    traceback.print_exc(limit=2)
                print(name, part, variant, row[variant], flush=True)
            res[part] = row
        results["methods"][name] = res
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)


def _int8(net, x):
    """PT2E static int8 (x86 inductor quantizer, oneDNN), calibrated on ``x``, compiled."""
    import torch
    from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torch.ao.quantization.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    with torch.no_grad():
        exported = torch.export.export(net, (x,)).module()
        q = X86InductorQuantizer()
        q.set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, q)
        prepared(x)
        converted = convert_pt2e(prepared)
    compiled = torch.compile(converted)

    def f(inp):
        return compiled(inp)
    return f


if __name__ == "__main__":
    main()
