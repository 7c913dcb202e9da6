"""The MAISI label vocabulary: ids, names, tumor → host-organ relations and name aliases.

The id ↔ name table is the official `label_dict.json` (ids 1–132, body 200); `dummy*` slots are not
labels. Tumors are the lesion classes whose conditional appearance the ControlNet learns; each has a
host organ that replaces it when a tumor is removed (classifier-free guidance, mask editing, the
contrastive loss).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

BACKGROUND = 0
BODY = 200

LUNG_LOBES: tuple[int, ...] = (28, 29, 30, 31, 32)
# The official quality check's bone list: vertebrae, ribs, limb/girdle bones, skull, sternum, S1.
BONES: tuple[int, ...] = tuple(range(33, 57)) + tuple(range(63, 98)) + (120, 122, 127)
KIDNEYS: tuple[int, ...] = (5, 14)

LUNG_TUMOR = 23
PANCREATIC_TUMOR = 24
HEPATIC_TUMOR = 26
COLON_CANCER = 27
BONE_LESION = 128
LEFT_KIDNEY_CYST = 116
RIGHT_KIDNEY_CYST = 117
COSTAL_CARTILAGES = 114
# What the training losses can weight as bone: the bones and the cartilage that joins the ribs.
BONE_REGION: tuple[int, ...] = BONES + (COSTAL_CARTILAGES,)

# Tumor id → candidate host ids. A single candidate is a fixed host (hepatic tumor → liver). Several
# candidates mean "the candidate that surrounds the lesion most" (a lung tumor takes the majority lobe
# of its neighbourhood, as the official `remove_tumors` does; a bone lesion likewise takes its bone).
TUMOR_HOSTS: dict[int, tuple[int, ...]] = {
    HEPATIC_TUMOR: (1,),
    PANCREATIC_TUMOR: (4,),
    COLON_CANCER: (62,),
    LEFT_KIDNEY_CYST: (14,),
    RIGHT_KIDNEY_CYST: (5,),
    LUNG_TUMOR: LUNG_LOBES,
    BONE_LESION: BONES,
}
TUMORS: tuple[int, ...] = tuple(TUMOR_HOSTS)

# Names users and other tools give to structures that MAISI names differently.
_ALIASES: dict[str, int] = {
    "body": BODY,
    "body envelope": BODY,
    "body outline": BODY,
    "skin": BODY,
    "urinary bladder": 15,
    "liver tumor": HEPATIC_TUMOR,
    "liver tumour": HEPATIC_TUMOR,
    "liver lesion": HEPATIC_TUMOR,
    "hepatic lesion": HEPATIC_TUMOR,
    "hepatic tumour": HEPATIC_TUMOR,
    "lung nodule": LUNG_TUMOR,
    "lung lesion": LUNG_TUMOR,
    "lung tumour": LUNG_TUMOR,
    "pulmonary nodule": LUNG_TUMOR,
    "pancreas tumor": PANCREATIC_TUMOR,
    "pancreatic lesion": PANCREATIC_TUMOR,
    "pancreatic tumour": PANCREATIC_TUMOR,
    "colon tumor": COLON_CANCER,
    "colon cancer": COLON_CANCER,
    "colon lesion": COLON_CANCER,
    "bone metastasis": BONE_LESION,
    "bone metastases": BONE_LESION,
    "bone tumor": BONE_LESION,
    "kidney cyst left": LEFT_KIDNEY_CYST,
    "kidney cyst right": RIGHT_KIDNEY_CYST,
    "clavicle left": 91,
    "clavicle right": 92,
    "left clavicle": 91,
    "right clavicle": 92,
    "ivc": 7,
    "inferior vena cava": 7,
    "portal vein": 17,
    "hepatic vessels": 25,
}


@lru_cache(maxsize=None)
def _data(name: str) -> dict:
    # `data` is a plain folder (no __init__): resources of the package itself work on Python 3.9 too
    with resources.files("MaisiSynthLib").joinpath("data", name).open("r", encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def label_names() -> dict[int, str]:
    """Id → official MAISI name, without the unused `dummy` slots."""
    return {int(i): n for n, i in _data("label_dict.json").items() if not n.startswith("dummy")}


@lru_cache(maxsize=None)
def known_ids() -> frozenset[int]:
    """Every id a MAISI mask may contain, background included."""
    return frozenset(label_names()) | {BACKGROUND}


def name_of(label: int) -> str:
    return label_names().get(int(label), f"unknown label {int(label)}")


def hu_statistics() -> dict[str, dict[str, float]]:
    """Per-organ HU statistics of real CTs (official `image_median_statistics_ct.json`)."""
    return _data("image_median_statistics_ct.json")


def modality_id(name: str) -> int:
    return int(_data("modality_mapping.json")[name])


def _normalise(name: str) -> str:
    text = re.sub(r"[_\-\s]+", " ", name.strip().lower())
    # TotalSegmentator and Slicer put the side last ("kidney_right", "rib_left_1"); MAISI first.
    words = text.split(" ")
    sides = [w for w in words if w in ("left", "right")]
    if len(sides) == 1:
        words = sides + [w for w in words if w not in ("left", "right")]
    return " ".join(words)


@lru_cache(maxsize=None)
def _name_index() -> dict[str, int]:
    index = {_normalise(n): i for i, n in label_names().items()}
    index.update({_normalise(a): i for a, i in _ALIASES.items()})
    return index


def id_for_name(name: str) -> int | None:
    """The MAISI id for a structure name (MAISI, TotalSegmentator or common name), or None."""
    key = _normalise(name)
    if key in _name_index():
        return _name_index()[key]
    # TotalSegmentator says "lung_upper_lobe_left"; MAISI "left lung upper lobe": same words.
    words = sorted(key.split(" "))
    for candidate, label in _name_index().items():
        if sorted(candidate.split(" ")) == words:
            return label
    return None


def is_tumor(label: int) -> bool:
    return int(label) in TUMOR_HOSTS


def label_color(label: int) -> tuple[float, float, float]:
    """The colour of a MAISI id (RGB in [0, 1]), the same in the preview PNG and in Slicer's segments:
    body in skin tone, tumors in warm reds and oranges, organs spread around the hue circle (golden
    ratio steps, so neighbouring ids differ)."""
    import colorsys

    if label == BODY:
        return (0.9, 0.8, 0.7)
    if is_tumor(label):
        return (1.0, 0.2 + 0.1 * (label % 5), 0.1)
    return colorsys.hsv_to_rgb((label * 0.6180339887) % 1.0, 0.75, 1.0)
