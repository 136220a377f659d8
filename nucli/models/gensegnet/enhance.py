"""What identifies GeNSeg-Net's enhancement stage in a run store: its name, array and settings.

The stage itself (running the generator over a store's tiles, through the
runner) is :mod:`nucli.enhance_stage`: a method stays a pure function of tiles.
The generator settings (:func:`stage_settings`) are recorded as the stage's
settings, so a rerun with other weights is refused without --overwrite.
"""

from __future__ import annotations

import hashlib
import json

STAGE = "enhance"
ARRAY = "enhanced"


def stage_settings(method) -> dict:
    """What identifies the enhancement: method + a hash of the generator's weights."""
    import torch

    h = hashlib.sha256()
    for k, v in method.generator.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to(torch.float32).cpu().numpy().tobytes())
    return {"method": method.name, "generator_sha256": h.hexdigest()[:16],
            "generator": json.dumps(method.config.params.get("generator"), sort_keys=True)}
