"""What ``nucli train`` calls for synthesis: ``--method synth`` (write pairs) and ``--synth style``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from nucli.errors import UsageError

Progress = Callable[[str, int, int], None]


def pairs_from_options(data: Path | None, output: Path, count: int | None, seed: int = 0,
                       refiner: Path | None = None, overwrite: bool = False,
                       progress: Progress | None = None) -> dict[str, Any]:
    """``nucli train --method synth --data DIR -o OUT [--count N] [--weights synth_refiner.safetensors]``."""
    from nucli.synth.writer import write_synthetic_pairs

    if data is None:
        raise UsageError("--method synth needs --data DIR (labelled images/ + labels/ to synthesise from)")
    cb = (lambda s, n: progress("synth", s, n)) if progress else None
    return write_synthetic_pairs(data, output, count=100 if count is None else int(count), seed=seed,
                                 refiner_weights=refiner, overwrite=overwrite, progress=cb)


def style_from_options(method: str, data: Path | None, output: Path, preset: str = "cpu", steps: int | None = None,
                       resume: bool = False, threads: int | None = None, seed: int = 0,
                       progress: Progress | None = None) -> dict[str, Any]:
    """``nucli train --method gensegnet --synth style``: the segmentation U-Net trained with synthesis."""
    from nucli.synth.adversarial import PRESETS, train_with_synthesis

    if method != "gensegnet":
        raise UsageError(f"--synth style trains the gensegnet segmentation U-Net; '{method}' is not supported "
                         "(write pairs with --method synth and train on them instead)")
    if data is None:
        raise UsageError("--synth style needs --data DIR (images/ + labels/)")
    if preset not in PRESETS:
        raise UsageError(f"--synth style has presets {', '.join(PRESETS)}, not '{preset}'")
    return train_with_synthesis(data, output, synth=True, preset=preset, steps=steps, resume=resume,
                                threads=threads, seed=seed, progress=progress)
