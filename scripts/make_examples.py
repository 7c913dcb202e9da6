"""Write the example masks in Resources/examples/: held-out phantom label maps, one per tumor type.

Seeds 1000+ are never used for training (the demo model trains on `phantoms --seed 0`).
Run: .venv/bin/python scripts/make_examples.py
"""

from pathlib import Path

from MaisiSynthLib.phantoms import _nifti_bytes, case_seed, make_phantom
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
        tmp.write_bytes(_nifti_bytes(phantom.labels, phantom.affine))
    print(f"example_{name}.nii.gz: {(phantom.labels == tumor).sum()} tumor voxels")
