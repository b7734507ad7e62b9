"""One ONNX graph for the defect detector (`moeworks defects train`): camera pixels in, final
detections with sizes in mm out.

Input `image` (N, H, W, 3) uint8, RGB, N frames of one size H x W (any size; what an image decoder
gives). The graph letterboxes each frame to the detector's square input as
`manufacturing.defects.detector.letterbox` does (scale to fit, OpenCV's uint8 bilinear with its
fixed-point rounding, grey 114 borders: `_linear_resize_u8`), runs the detector (`export_detector_onnx`'s
torch.onnx export, inlined), and post-processes as `postprocess` and `DefectInspector.report` do:
each anchor's best class, score above the confidence threshold, class-wise non-maximum suppression
(ONNX NonMaxSuppression), the `max_det` strongest per frame, boxes mapped back to frame pixels and
clamped to the frame, sizes in mm from the calibration, detections under its minimum size dropped.

Outputs, K detections of the whole batch, frame by frame, strongest first: `boxes` (K, 4) float32
x1, y1, x2, y2 frame pixels; `scores` (K,) float32; `classes` (K,) int64 (the card's class names);
`sizes_mm` (K, 3) float64 width, height, box area (mm^2); `image_index` (K,) int64, the frame.

With the MoE second stage (`bundle build --moe-stage`; deploy/bundle/defects_stage.py), the YOLO
detections of each frame (its `max_det` strongest, before the size filter) are cropped, re-scored and
re-classified by the stage, suppressed again class-wise and kept at score >= conf, as
`DefectInspector.detect` with a second stage; the size filter follows. Without it (the default, as
`moeworks defects predict` without --moe-stage) the graph carries YOLO alone.

Not in the graph: tiling (moeworks tiles frames longer than `tile_above` x the input size; the
card says so).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from deploy.bundle.graph import GraphBuilder, Var

IMAGE = "image"
OUTPUTS = ("boxes", "scores", "classes", "sizes_mm", "image_index")


def _scalar(g: GraphBuilder, shape: Var, axis: int) -> Var:
    """Dimension `axis` of a Shape as a (1,) float64."""
    return g.op("Cast", g.op("Gather", shape, g.const(np.array([axis])), axis=0), to=11)


def _linear_taps(g: GraphBuilder, src: Var, dst: Var) -> tuple[Var, Var, Var, Var]:
    """cv2.resize INTER_LINEAR's taps along one axis, as OpenCV computes them for uint8 (resizeGeneric):
    fx = (float)((d + 0.5) * scale - 0.5), sx = floor(fx), fx -= sx, clamped at both edges (fx 0), and
    the two weights each rounded to 1/2048 (INTER_RESIZE_COEF_BITS = 11). src, dst: (1,) float64 sides.
    Returns (sx, sx + 1 clamped) (dst,) int64 and (w0, w1) (dst,) float32 holding integers 0-2048."""
    d = g.op("Range", g.const(np.float64(0.0)), g.op("Squeeze", dst), g.const(np.float64(1.0)))  # (dst,)
    scale = 1.0 / (dst / src)  # cv2's scale_x = 1. / inv_scale_x, double
    f = g.op("Cast", (d + 0.5) * scale - 0.5, to=1)  # float32, as cv2
    sx = g.op("Floor", f)
    fx = f - sx
    last = g.op("Cast", src - 1.0, to=1)
    low, high = sx < g.const(np.float32(0.0)), sx >= last
    fx = g.where(low | high, g.const(np.float32(0.0)), fx)
    sx = g.where(low, g.const(np.float32(0.0)), g.where(high, last, sx))
    w0 = g.op("Round", (g.const(np.float32(1.0)) - fx) * g.const(np.float32(2048.0)))
    w1 = g.op("Round", fx * g.const(np.float32(2048.0)))
    second = g.op("Min", sx + g.const(np.float32(1.0)), last)
    return g.op("Cast", sx, to=7), g.op("Cast", second, to=7), w0, w1


def vertical_pass_u8(g: GraphBuilder, sums: Var, rows: tuple[Var, Var], weights: tuple[Var, Var], *,
                     axis: int, elementwise: bool) -> Var:
    """OpenCV's vertical pass of its uint8 two-tap resizes (INTER_LINEAR, and INTER_AREA's interpolating
    path) on the horizontal pass's integer sums `sums` (float32 holding integers, 11-bit weights): its
    SIMD rounding, bit for bit, ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2, in int64.
    rows: the two source rows of each output row, gathered along `axis` (GatherElements when
    `elementwise`, index shaped as the output; else Gather, one index per output row); weights: b0, b1
    as int64 broadcasting against the output. Returns float32 grey levels."""
    shifted = g.op("Div", g.op("Cast", sums, to=7), g.const(np.array(16)))  # S >> 4 (S >= 0)
    total = None
    for row, weight in zip(rows, weights, strict=True):
        picked = (g.op("GatherElements", shifted, row, axis=axis) if elementwise
                  else g.op("Gather", shifted, row, axis=axis))
        term = g.op("Div", g.op("Mul", weight, picked), g.const(np.array(65536)))
        total = term if total is None else g.op("Add", total, term)
    return g.op("Cast", g.op("Div", g.op("Add", total, g.const(np.array(2))), g.const(np.array(4))), to=1)


def _linear_resize_u8(g: GraphBuilder, chw: Var, h: Var, w: Var, nh: Var, nw: Var) -> Var:
    """cv2.resize(uint8, (nw, nh), INTER_LINEAR) of (N, 3, H, W) float32 grey levels, bit for bit where
    OpenCV downscales (0 of 10.7 million pixels differ on NEU-DET frames to 192 and 150 px; upscaling:
    1 grey level in ~0.2% of pixels): the horizontal pass as integer sums (a MatMul with the 11-bit weights,
    exact in float32: at most 2 x 2048 x 255), then OpenCV's vertical pass in int64 with its SIMD rounding
    (vertical_pass_u8, shared with the MoE stage's crops). ONNX's float Resize rounded one grey
    level apart from OpenCV in ~12% of the pixels, which moved one NEU-DET box by 17.5 px
    (benchmarks/RESULTS.md, bundles)."""
    x0, x1, a0, a1 = _linear_taps(g, w, nw)
    y0, y1, b0, b1 = _linear_taps(g, h, nh)
    columns = g.op("Range", g.const(np.int64(0)), g.op("Cast", g.op("Squeeze", w), to=7), g.const(np.int64(1)))
    row, zero = g.const(np.array([-1, 1])), g.const(np.float32(0))
    taps = (g.where(g.op("Equal", g.op("Reshape", x0, row), columns), g.op("Reshape", a0, row), zero)
            + g.where(g.op("Equal", g.op("Reshape", x1, row), columns), g.op("Reshape", a1, row), zero))  # (nw, W)
    sums = g.op("MatMul", chw, g.op("Transpose", taps, perm=[1, 0]))  # (N, 3, H, nw) integers
    weights = tuple(g.op("Reshape", g.op("Cast", b, to=7), g.const(np.array([1, 1, -1, 1]))) for b in (b0, b1))
    return vertical_pass_u8(g, sums, (y0, y1), weights, axis=2, elementwise=False)


def _letterbox(g: GraphBuilder, image: Var, size: int, pad_value: int) -> tuple[Var, Var, Var, Var]:
    """(batch (N, 3, S, S) float32 in [0, 1], scale, left, top) of `letterbox` + `to_input`."""
    shape = g.op("Shape", image)
    h, w = _scalar(g, shape, 1), _scalar(g, shape, 2)  # (1,) each
    scale = g.op("Min", float(size) / h, float(size) / w)  # min(size / h, size / w), float64
    nh, nw = g.op("Round", h * scale), g.op("Round", w * scale)  # Python's round: half to even, as Round
    top, left = g.op("Round", (float(size) - nh) / 2.0 - 0.1), g.op("Round", (float(size) - nw) / 2.0 - 0.1)
    chw = g.op("Cast", g.op("Transpose", image, perm=[0, 3, 1, 2]), to=1)  # (N, 3, H, W) float32
    resized = _linear_resize_u8(g, chw, h, w, nh, nw)
    zero = g.const(np.array([0.0]))
    pads = g.op("Cast", g.concat([zero, zero, top, left, zero, zero, float(size) - nh - top,
                                  float(size) - nw - left], axis=0), to=7)
    boxed = g.op("Pad", resized, pads, g.const(np.float32(pad_value)))
    return boxed / g.const(np.float32(255.0)), scale, left, top  # scale, left, top: (1,) float64


def defects_graph(detector, *, conf: float, iou: float, max_det: int, mm_per_pixel: tuple[float, float],
                  min_size_mm: float, stage=None) -> onnx.ModelProto:
    """The bundle's graph for a loaded PyTorch `YoloDetector` and, when given, its loaded (.pt)
    `CropMoEClassifier` second stage (see the module docstring)."""
    from manufacturing.defects.detector import PAD_VALUE
    from manufacturing.defects.export import export_detector_onnx

    g = GraphBuilder()
    image = g.input(IMAGE, "uint8", ["N", "H", "W", 3])
    batch, scale, left, top = _letterbox(g, image, detector.imgsz, PAD_VALUE)
    with tempfile.TemporaryDirectory() as folder:
        net = onnx.load(str(export_detector_onnx(detector, Path(folder) / "detector.onnx")))
    head = g.embed(net, {"images": batch}, prefix="detector/")["head"]  # (N, 4 + C, A)
    classes = len(detector.names)
    pred = g.op("Transpose", head, perm=[0, 2, 1])  # (N, A, 4 + C)
    cx, cy, bw, bh = (g.op("Slice", pred, g.const(np.array([j])), g.const(np.array([j + 1])),
                           g.const(np.array([2]))) for j in range(4))
    half = g.const(np.float32(2.0))
    boxes = g.concat([cx - bw / half, cy - bh / half, cx + bw / half, cy + bh / half], axis=2)  # (N, A, 4) xyxy
    class_scores = g.op("Slice", pred, g.const(np.array([4])), g.const(np.array([4 + classes])),
                        g.const(np.array([2])))  # (N, A, C)
    best = g.op("ArgMax", class_scores, axis=2, keepdims=1)  # the first of equal scores, as torch.max
    top_score = g.op("ReduceMax", class_scores, g.const(np.array([2])), keepdims=1)
    # one candidate per anchor (its best class), as postprocess without multi_label: the other classes score -1
    own = g.op("Equal", best, g.const(np.arange(classes).reshape(1, 1, -1)))
    candidates = g.op("Transpose", g.where(own, top_score, g.const(np.float32(-1.0))), perm=[0, 2, 1])  # (N, C, A)
    selected = g.op("NonMaxSuppression", boxes, candidates, g.const(np.array([max_det])),
                    g.const(np.array([iou], np.float32)), g.const(np.array([conf], np.float32)))  # (K, 3)
    frame = g.op("Gather", selected, g.const(np.array(0)), axis=1)  # (K,)
    anchor = g.op("Gather", selected, g.const(np.array([0, 2])), axis=1)  # (K, 2): frame, anchor
    score = g.op("GatherND", candidates, selected)  # (K,)
    # frame by frame, strongest first: the key frame * 4 - score (scores lie in [0, 1]) ascending
    key = g.op("Cast", frame, to=11) * 4.0 - g.op("Cast", score, to=11)
    _, order = g.op_multi("TopK", key, g.op("Shape", key), outputs=2, axis=0, largest=0, sorted=1)
    frame, anchor, score = (g.op("Gather", v, order, axis=0) for v in (frame, anchor, score))
    label = g.op("Squeeze", g.op("GatherND", best, anchor), g.const(np.array([1])))  # (K,)
    # rank of each detection within its frame: the max_det strongest of each frame are kept
    frames = g.op("Range", g.const(np.array(0)), g.op("Gather", g.op("Shape", image), g.const(np.array(0)), axis=0),
                  g.const(np.array(1)))
    one_hot = g.op("Cast", g.op("Equal", g.op("Unsqueeze", frame, g.const(np.array([1]))),
                                g.op("Unsqueeze", frames, g.const(np.array([0])))), to=7)  # (K, N)
    rank = g.op("Squeeze", g.op("GatherElements", g.op("CumSum", one_hot, g.const(np.array(0))),
                                g.op("Unsqueeze", frame, g.const(np.array([1]))), axis=1),
                g.const(np.array([1])))  # 1-based
    # back to frame pixels: (box - (left, top)) / scale, clamped to the frame, float32 as postprocess
    offset = g.op("Cast", g.concat([left, top, left, top], axis=0), to=1)
    xyxy = (g.op("GatherND", boxes, anchor) - offset) / g.op("Cast", scale, to=1)
    shape = g.op("Cast", g.op("Shape", image), to=1)
    high = g.op("Concat", *(g.op("Gather", shape, g.const(np.array([j])), axis=0) for j in (2, 1, 2, 1)), axis=0)
    xyxy = g.op("Min", g.op("Max", xyxy, g.const(np.float32(0.0))), high)
    if stage is not None:
        from deploy.bundle.defects_stage import rescore

        first = rank <= g.const(np.array(max_det))  # YOLO's max_det per frame, then the stage
        xyxy, frame, anchor = (g.op("Compress", v, first, axis=0) for v in (xyxy, frame, anchor))
        xyxy, score, label, frame = rescore(g, stage, image, xyxy, frame, g.op("GatherND", class_scores, anchor),
                                            iou=iou, conf=conf, frames=frames, max_det=max_det)
    # Calibration.sizes_mm (float64) and large_enough
    xyxy64 = g.op("Cast", xyxy, to=11)
    width = (g.column(xyxy64, 2) - g.column(xyxy64, 0)) * float(mm_per_pixel[0])
    height = (g.column(xyxy64, 3) - g.column(xyxy64, 1)) * float(mm_per_pixel[1])
    sizes = g.concat([width, height, width * height], axis=1)
    keep = g.op("Squeeze", g.maximum(width, height) >= float(min_size_mm), g.const(np.array([1])))
    if stage is None:
        keep = keep & (rank <= g.const(np.array(max_det)))
    for var, name in ((xyxy, "boxes"), (score, "scores"), (label, "classes"), (sizes, "sizes_mm"),
                      (frame, "image_index")):
        g.output(g.op("Compress", var, keep, axis=0), name)
    with_stage = " + MoE second stage" if stage is not None else ""
    return g.model(doc=f"moeworks defect detector bundle: {len(detector.names)} classes, input {detector.imgsz}"
                       + with_stage)
