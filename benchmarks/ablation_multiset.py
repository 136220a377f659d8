"""Ablations of the multi-set GeNSeg-Net fine-tune, step-matched against the main run.

Each variant starts from the same weights, uses the same schedule as the main run
(``--steps`` of the main run, so the learning rate is the same at every step) and the
same val crops of every set; it is stopped after ``--stop`` steps and compared with the
main run's val log at that step.

    python benchmarks/ablation_multiset.py no-stain-aug -o /work/runs/abl_noaug
    python benchmarks/ablation_multiset.py dsb-only -o /work/runs/abl_dsb

* ``no-stain-aug``: no HED / simulated-IHC / blur / JPEG / noise augmentation (flips,
  turns, scale jitter and the gray-level jitter stay: they are not stain augmentation);
* ``dsb-only``: trained on dsb2018/train only; monuseg and bitdepth_nucseg are weight 0
  (validation only), so the val objective is the same mean over the three sets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nucli.training import multiset as ms
from nucli.training.multiset_train import train_multi

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["no-stain-aug", "dsb-only"])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=1200, help="the main run's schedule length")
    ap.add_argument("--stop", type=int, default=500, help="stop after this many steps (a val step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sets = ms.parse_data_args([args.data / "dsb2018", args.data / "monuseg", args.data / "bitdepth_nucseg"])
    if args.variant == "dsb-only":
        for s in sets:
            if s.name != "dsb2018":
                s.weight = 0.0
    init = ROOT / "nucli" / "models" / "weights" / "gensegnet_cpu.safetensors"
    if (args.output / "init.safetensors").exists():
        init = args.output / "init.safetensors"
    train_multi("gensegnet", sets, args.output, init, steps=args.steps, stop_after=args.stop,
                stain_aug=args.variant != "no-stain-aug", threads=args.threads, resume=args.resume,
                tune_thresholds=False)


if __name__ == "__main__":
    main()
