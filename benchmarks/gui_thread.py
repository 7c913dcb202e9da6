"""What the Slicer module's scene work costs on the GUI thread, on real MRML (slicer-core).

    .venv/bin/python benchmarks/gui_thread.py [--shape 512 512 200] [--segments 20]

A segmentation of `--segments` boxes on a clinical grid (0.8 × 0.8 × 1.5 mm), no reference CT: the
canvas the module paints on (made once, made again for another geometry, reused), against what the
canvas used to cost (exporting the segmentation to a label map to learn its grid). The module's
budget for anything on the GUI thread is about 0.2 s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    p.add_argument("--segments", type=int, default=20)
    args = p.parse_args()
    import slicer

    from MaisiSynthLib import scene as S

    shape = tuple(args.shape)
    scene = slicer.vtkMRMLScene()
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])
    grid = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grid")
    S.set_volume_array(grid, np.zeros(shape, np.int16), affine)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mask")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(grid)
    S.ensure_segmentation_converters()
    rng = np.random.default_rng(0)
    for i in range(args.segments):
        box = np.zeros(shape, bool)
        lo = [int(rng.integers(0, max(1, n - n // 5))) for n in shape]
        box[tuple(slice(a, a + n // 6) for a, n in zip(lo, shape))] = True
        sid = segmentation.GetSegmentation().AddEmptySegment("", f"segment {i}", (1, 0, 0))
        S._write_segment(scene, segmentation, grid, sid, box)
    scene.RemoveNode(grid)

    def seconds(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    S.canvas_volume(scene, segmentation)  # imports and first-use set-up, not timed
    S.discard(scene, S._canvases(scene)[0])
    made = seconds(lambda: S.canvas_volume(scene, segmentation))
    reused = seconds(lambda: S.canvas_volume(scene, segmentation))
    exported = seconds(lambda: S.discard(scene, S.reference_grid(scene, segmentation)))
    print(f"mask {'x'.join(map(str, shape))}, {args.segments} segments, no reference CT")
    print(f"canvas made            {made:7.3f} s")
    print(f"canvas reused          {reused:7.3f} s")
    print(f"label-map export       {exported:7.3f} s   (what learning the grid used to cost)")


if __name__ == "__main__":
    main()
