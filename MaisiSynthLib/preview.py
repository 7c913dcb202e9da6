"""PNG preview: axial, coronal and sagittal slices of a CT with the mask's contours.

Slices go through the centre of the tumors when the mask has any (so a reviewer sees the lesion), else
through the centre of the body. Radiological display: patient right on the image left, anterior and
superior up; pixels are scaled to millimetres so anatomy keeps its proportions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import labels as L
from .volumes import atomic_path

WINDOW = (40.0, 400.0)  # soft-tissue level / width
PANEL_HEIGHT = 320


def label_colour(label: int) -> tuple[int, int, int]:
    """`labels.label_color` in 8-bit RGB: the preview draws each contour in its segment's Slicer colour."""
    return tuple(int(c * 255) for c in L.label_color(label))


def focus_point(labels: np.ndarray) -> tuple[int, int, int]:
    tumors = np.isin(labels, L.TUMORS)
    target = tumors if tumors.any() else labels > 0
    if not target.any():
        return tuple(n // 2 for n in labels.shape)
    return tuple(int(round(c)) for c in np.argwhere(target).mean(axis=0))


def _panels(volume: np.ndarray, point: tuple[int, int, int]) -> list[np.ndarray]:
    """RAS-ordered volume → [axial, coronal, sagittal] 2-D arrays in display orientation."""
    x, y, z = point
    axial = volume[:, :, z].T[::-1, ::-1]
    coronal = volume[:, y, :].T[::-1, ::-1]
    sagittal = volume[x, :, :].T[::-1, ::-1]
    return [axial, coronal, sagittal]


def _pixel_mm(spacing: tuple[float, float, float]) -> list[tuple[float, float]]:
    """(row, column) millimetres of the three panels."""
    sx, sy, sz = spacing
    return [(sy, sx), (sz, sx), (sz, sy)]


def _contours(label_image: np.ndarray) -> np.ndarray:
    """Pixels of a label whose 4-neighbourhood holds another label (the inner boundary of each region)."""
    edge = np.zeros(label_image.shape, dtype=bool)
    vertical = label_image[:-1, :] != label_image[1:, :]
    horizontal = label_image[:, :-1] != label_image[:, 1:]
    edge[:-1, :] |= vertical
    edge[1:, :] |= vertical
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    return edge & (label_image > 0)


def render_preview(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    point: tuple[int, int, int] | None = None,
) -> Image.Image:
    """An RGB image of three orthogonal slices (RAS-ordered inputs) through `point` (default: the
    centre of the tumors, else of the labels)."""
    level, width = WINDOW
    point = focus_point(labels) if point is None else tuple(int(c) for c in point)
    tiles = []
    for ct, lab, (row_mm, col_mm) in zip(_panels(hu, point), _panels(labels, point), _pixel_mm(spacing)):
        height_mm, width_mm = ct.shape[0] * row_mm, ct.shape[1] * col_mm
        size = (max(1, int(round(PANEL_HEIGHT * width_mm / height_mm))), PANEL_HEIGHT)
        grey = np.clip((ct.astype(np.float32) - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
        tile = Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB")
        lab_big = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(size, Image.NEAREST))
        rgb = np.array(tile)
        edges = _contours(lab_big)
        for value in np.unique(lab_big[edges]):
            rgb[edges & (lab_big == value)] = label_colour(int(value))
        tiles.append(Image.fromarray(rgb))
    gap = 6
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), PANEL_HEIGHT + 18), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for tile, name in zip(tiles, (f"axial z={point[2]}", f"coronal y={point[1]}", f"sagittal x={point[0]}")):
        canvas.paste(tile, (left, 18))
        draw.text((left + 4, 3), name, fill=(230, 230, 230))
        left += tile.width + gap
    return canvas


def write_preview(path: str | os.PathLike, hu: np.ndarray, labels: np.ndarray, spacing) -> Path:
    image = render_preview(hu, labels, spacing)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
