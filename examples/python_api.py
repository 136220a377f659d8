"""Use nucli from Python: segment an image held in memory, get labels and a measurements table.

    python examples/python_api.py

Runs on the tissue image that ships with scikit-image (no download). The method is
nucli's default unless NUCLI_EXAMPLE_METHOD names another (e.g. ``watershed``).
"""

import os

import numpy as np

import nucli
from nucli.demo import demo_tissue

image = demo_tissue()  # (512, 512, 3) uint8 RGB: colon tissue, nuclei stained with hematoxylin
method = os.environ.get("NUCLI_EXAMPLE_METHOD")  # None: the default method

# One call: tiles the image, runs the method, stitches each nucleus once, measures it.
# mpp is the image's pixel size (µm/px): nucli resamples to the method's own pixel size
# and adds µm columns to the table. Leave it out to use the image as it is.
labels, table = nucli.segment_array(image, method=method, mpp=0.5)

print(f"{labels.max()} nuclei; label image {labels.shape} {labels.dtype}")
print("columns:", ", ".join(table))

# table is a dict of equal-length columns; row k describes the nucleus labels == table["label"][k]
areas = table["area_um2"]
print(f"nucleus area: median {np.median(areas):.1f} µm², 90th percentile {np.percentile(areas, 90):.1f} µm²")
big = table["label"][areas > np.percentile(areas, 90)]
mask_of_big_nuclei = np.isin(labels, big)
print(f"the largest 10 % of nuclei cover {mask_of_big_nuclei.mean():.1%} of the image")

# With pandas installed, the table becomes a data frame in one line:
try:
    import pandas as pd
except ImportError:
    pass
else:
    df = pd.DataFrame(table)
    print(df[["label", "centroid_x_um", "centroid_y_um", "area_um2", "eccentricity"]].head())
