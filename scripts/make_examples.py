"""Write the example masks in Resources/examples/: held-out phantom label maps.

One per tumor type on the demo grid (whole torso, every structure labelled), and one as users bring
masks from real chest scans: a chest-only field of view, a coarse label map (body, lung lobes,
bones, one lung tumor) on a grid the model never trained at.
Seeds 1000+ are never used for training (the demo model trains on `phantoms --seed 0..4`).
Run: .venv/bin/python scripts/make_examples.py
"""

from pathlib import Path

import numpy as np

from MaisiSynthLib.masks import coarsen_labels
from MaisiSynthLib.phantoms import case_seed, make_phantom, nifti_bytes
from MaisiSynthLib.volumes import atomic_path

EXAMPLES = {
    "hepatic_tumor": 26,
    "lung_tumor": 23,
    "pancreatic_tumor": 24,
    "colon_cancer": 27,
    "bone_lesion": 128,
}

out = Path(__file__).resolve().parents[1] / "Resources" / "examples"
out.mkdir(parents=True, exist_ok=True)
for index, (name, tumor) in enumerate(EXAMPLES.items()):
    phantom = make_phantom(case_seed(1000, index), tumors=[tumor])
    with atomic_path(out / f"example_{name}.nii.gz") as tmp:
        tmp.write_bytes(nifti_bytes(phantom.labels, phantom.affine))
    print(f"example_{name}.nii.gz: {(phantom.labels == tumor).sum()} tumor voxels")

chest = make_phantom(case_seed(1000, 5), size=(144, 144, 64), spacing=(2.6, 2.6, 4.4), tumors=[23], centre=(4, -6, 78))
coarse = coarsen_labels(chest.labels).astype(np.uint8)
with atomic_path(out / "example_chest_coarse.nii.gz") as tmp:
    tmp.write_bytes(nifti_bytes(coarse, chest.affine))
print(f"example_chest_coarse.nii.gz: labels {sorted(np.unique(coarse).tolist())}")
