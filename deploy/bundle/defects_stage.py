"""The defect detector's MoE second stage (manufacturing/defects/moe_stage.py) as ONNX ops, for the
detector bundle (deploy/bundle/defects_graph.py, `bundle build --moe-stage`).

Crops: `crops_and_geometry` cuts each box with its context margin and resizes the patch to
crop_size x crop_size with cv2.INTER_AREA. OpenCV's INTER_AREA is two different resizes: when the
patch is at least crop_size on both sides, an area average (each output pixel the mean of the source
pixels it covers, partial pixels by their share, summed in float and rounded); otherwise a two-tap
interpolation with INTER_AREA's own coefficients (`resizeGeneric` with area_mode) in 11-bit fixed point
on uint8. Both are separable, so the graph builds each box's column and row weight matrices
(crop_size x frame side, zero outside the patch) and resizes with MatMul: the area path as
Wy @ frame @ Wx^T rounded to whole grey levels; the two-tap path as the integer horizontal sums
(frame @ Wx^T, exact in float32) followed by OpenCV's vertical pass in int64 with its SIMD rounding
(((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2), which makes those crops bit-exact.
RoiAlign (bilinear samples) and Resize (no area mode) compute neither. The cost: each box's weights
and product span its whole frame, K x 3 x H x W floats for K boxes (about 48 MB for 100 boxes on
200 px NEU-DET frames, but 6 GB for 300 boxes on 1,280 px frames: computed, not measured).
Measured against OpenCV for boxes of 8-200 px (tests/deploy/bundle/test_bundle_defects.py): two-tap
crops identical, area crops off by one grey level in a few pixels per million (float summation order
at .5).

The network: `core.onnx_export.export_onnx` of CropMoENet with the sparse MoE dispatch (only the routed
experts run), inlined with GraphBuilder.embed. One zero crop is appended so that the network never sees
an empty batch (frames without detections); each crop's logits depend on that crop alone (GroupNorm and
LayerNorm per sample, dropless routing per token), and the extra row is dropped.

Rescoring as `CropMoEClassifier.rescore`: fused = clip(yolo, 1e-9, 1)^(1 - blend) * p^blend per class,
the best class and its fused score, class-wise NMS per frame (torchvision.ops.batched_nms there, ONNX
NonMaxSuppression here), then `DefectInspector.detect`'s score >= conf.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from deploy.bundle.defects_graph import vertical_pass_u8
from deploy.bundle.graph import GraphBuilder, Var


def _f32(g: GraphBuilder, x: float) -> Var:
    return g.const(np.float32(x))


def _axis_weights(g: GraphBuilder, start: Var, length: Var, side: Var, size: int) -> tuple[Var, Var, Var, Var, Var]:
    """One axis of the resize for K patches: `start`, `length` (K, 1, 1) float64 patch start and length in
    frame pixels, `side` the frame side (scalar int64). Returns the area path's weights (K, size, side)
    float32, the two-tap path's 11-bit weights (K, size, side) float32 holding integers 0-2048, and its
    taps: the first source pixel (K, size, 1) float64 in frame pixels and the two 11-bit weights (K, size, 1)
    float64 integers (each rounded on its own, as cv2 does)."""
    i = g.op("Cast", g.op("Range", g.const(np.array(0)), side, g.const(np.array(1))), to=11)
    i = g.op("Reshape", i, g.const(np.array([1, 1, -1]))) - start  # (K, 1, side): source pixel in the patch
    j = g.const(np.arange(size, dtype=np.float64).reshape(1, size, 1))
    scale = length / float(size)  # source pixels per output pixel (cv2's scale_x, double)
    # area path (cv2 computeResizeAreaTab): the share of each source pixel in the output pixel's cell
    low, high = j * scale, (j + 1.0) * scale
    overlap = g.op("Min", i + 1.0, high) - g.op("Max", i, low)
    area_w = g.op("Max", overlap, g.const(np.float64(0.0))) / scale
    # two-tap path (cv2 resizeGeneric, area_mode): sx = floor(dx * scale),
    # fx = (dx + 1) - (sx + 1) / scale, 0 when <= 0 else its fraction; sx clamped to the last pixel with fx = 0
    sx = g.op("Floor", j * scale)
    fx = (j + 1.0) - (sx + 1.0) * (float(size) / length)
    fx = g.where(fx <= 0.0, 0.0, fx - g.op("Floor", fx))
    last = sx >= length - 1.0
    fx = g.op("Cast", g.op("Cast", g.where(last, 0.0, fx), to=1), to=11)  # cv2 keeps fx as float
    sx = g.where(last, length - 1.0, sx)
    # uint8 fixed point: each coefficient rounded to 1/2048 (INTER_RESIZE_COEF_BITS = 11)
    w0 = g.op("Round", (1.0 - fx) * 2048.0)
    w1 = g.op("Round", fx * 2048.0)
    tap_w = g.where(g.op("Equal", i, sx), w0, 0.0) + g.where(g.op("Equal", i, sx + 1.0), w1, 0.0)
    return g.op("Cast", area_w, to=1), g.op("Cast", tap_w, to=1), sx + start, w0, w1


def _two_tap_rows(g: GraphBuilder, columns: Var, first: Var, w0: Var, w1: Var, length: Var, start: Var) -> Var:
    """cv2's vertical pass of the uint8 two-tap INTER_AREA resize on the horizontal pass's sums `columns`
    (K, 3, H, S): each box's own source rows (vertical_pass_u8)."""
    shape = g.op("Shape", columns)
    size = g.op("Gather", shape, g.const(np.array([3])), axis=0)
    out = g.op("Concat", g.op("Gather", shape, g.const(np.array([0, 1])), axis=0), size, size, axis=0)  # K, 3, S, S
    second = g.op("Min", first + 1.0, start + length - 1.0)  # an in-frame row when its weight is 0
    index = [g.op("Expand", g.op("Unsqueeze", g.op("Cast", r, to=7), g.const(np.array([1]))), out)
             for r in (first, second)]  # (K, 3, S, S): source row of each output row
    weights = [g.op("Unsqueeze", g.op("Cast", w, to=7), g.const(np.array([1]))) for w in (w0, w1)]  # (K, 1, S, 1)
    return vertical_pass_u8(g, columns, tuple(index), tuple(weights), axis=2, elementwise=True)


def crops_and_geometry(g: GraphBuilder, image: Var, boxes: Var, frame: Var, *, crop_size: int,
                       context: float) -> tuple[Var, Var]:
    """`moe_stage.crops_and_geometry` on RGB frames: image (N, H, W, 3) uint8, boxes (K, 4) float32 frame
    pixels, frame (K,) int64 -> crops (K, 3, S, S) float32 RGB in [0, 1], geometry (K, 3) float32."""
    shape = g.op("Shape", image)
    side_h, side_w = (g.op("Gather", shape, g.const(np.array(a)), axis=0) for a in (1, 2))  # scalars, int64
    x1, y1, x2, y2 = (g.column(boxes, j) for j in range(4))  # (K, 1) float32
    h32, w32 = g.op("Cast", side_h, to=1), g.op("Cast", side_w, to=1)

    def patch(lo: Var, hi: Var, side32: Var) -> tuple[Var, Var]:
        # float32 as numpy computes it on the float32 boxes: margin, floor/ceil, clamped to the frame
        margin = (hi - lo) * _f32(g, context)
        a = g.op("Max", g.op("Floor", lo - margin), _f32(g, 0.0))
        c = g.op("Min", g.op("Ceil", hi + margin), side32)
        length = g.op("Max", c - a, _f32(g, 1.0))  # image[a:max(c, a + 1)]
        to3 = g.const(np.array([-1, 1, 1]))
        return (g.op("Reshape", g.op("Cast", a, to=11), to3), g.op("Reshape", g.op("Cast", length, to=11), to3))

    ax, lx = patch(x1, x2, w32)
    ay, ly = patch(y1, y2, h32)
    area = (lx >= float(crop_size)) & (ly >= float(crop_size))  # cv2: INTER_AREA's area path when both scale >= 1
    area_x, tap_x, _, _, _ = _axis_weights(g, ax, lx, side_w, crop_size)  # (K, S, W)
    area_y, _, first_y, w0_y, w1_y = _axis_weights(g, ay, ly, side_h, crop_size)  # (K, S, H)
    frames = g.op("Cast", g.op("Transpose", g.op("Gather", image, frame, axis=0), perm=[0, 3, 1, 2]), to=1)
    one = g.const(np.array([1]))
    # area path: Wy @ frame @ Wx^T in float, rounded to whole grey levels (cv2 sums in float, then cvRound)
    rows = g.op("MatMul", g.op("Unsqueeze", area_y, one), frames)  # (K, 3, S, W)
    averaged = g.op("Round", g.op("MatMul", rows, g.op("Unsqueeze", g.op("Transpose", area_x, perm=[0, 2, 1]), one)))
    # two-tap path: the horizontal pass's integer sums (exact in float32: at most 2048 x 255 x 2), then cv2's
    # vertical pass in integers
    columns = g.op("MatMul", frames, g.op("Unsqueeze", g.op("Transpose", tap_x, perm=[0, 2, 1]), one))  # (K, 3, H, S)
    interpolated = _two_tap_rows(g, columns, first_y, w0_y, w1_y, ly, ay)
    crops = g.op("Where", g.op("Reshape", area, g.const(np.array([-1, 1, 1, 1]))), averaged, interpolated)
    crops = g.op("Clip", crops, _f32(g, 0.0), _f32(g, 255.0)) / _f32(g, 255.0)
    bw = g.op("Max", x2 - x1, _f32(g, 1.0))
    bh = g.op("Max", y2 - y1, _f32(g, 1.0))
    geometry = g.concat([g.op("Log", bw / w32), g.op("Log", bh / h32), g.op("Log", bw / bh)], axis=1)
    return crops, geometry


def stage_logits(g: GraphBuilder, stage, crops: Var, geometry: Var) -> Var:
    """(K, classes + 1) logits of the stage's CropMoENet, exported with the sparse dispatch and inlined."""
    from core.onnx_export import export_onnx

    size = stage.config.crop_size
    example = (torch.zeros(2, 3, size, size), torch.zeros(2, 3))
    with tempfile.TemporaryDirectory() as folder:
        net = onnx.load(str(export_onnx(stage.model_.eval(), example, Path(folder) / "stage.onnx",
                                        input_names=["crops", "geometry"], output_names=["logits", "aux_loss"],
                                        moe_dispatch="sparse")))
    # one zero crop more: the network never sees an empty batch; its row is dropped below
    padded_crops = g.op("Concat", crops, g.const(np.zeros((1, 3, size, size), np.float32)), axis=0)
    padded_geometry = g.op("Concat", geometry, g.const(np.zeros((1, 3), np.float32)), axis=0)
    outputs = g.embed(net, {"crops": padded_crops, "geometry": padded_geometry}, prefix="moe_stage/")
    count = g.op("Shape", crops, start=0, end=1)
    return g.op("Slice", outputs["logits"], g.const(np.array([0])), count, g.const(np.array([0])))


def rescore(g: GraphBuilder, stage, image: Var, boxes: Var, frame: Var, class_scores: Var, *,
            iou: float, conf: float, frames: Var, max_det: int) -> tuple[Var, Var, Var, Var]:
    """`CropMoEClassifier.rescore` + score >= conf on the YOLO detections of a batch: boxes (K, 4), frame (K,),
    class_scores (K, C) -> (boxes, scores, classes, frame) of the kept detections, frame by frame, strongest first.
    `frames`: (N,) int64 0..N-1."""
    config = stage.config
    crops, geometry = crops_and_geometry(g, image, boxes, frame, crop_size=config.crop_size, context=config.context)
    probs = g.op("Softmax", stage_logits(g, stage, crops, geometry), axis=1)
    probs = g.op("Slice", probs, g.const(np.array([0])), g.const(np.array([config.num_classes])),
                 g.const(np.array([1])))  # background left out
    blend = float(stage.training.blend)
    yolo = g.op("Clip", class_scores, _f32(g, 1e-9), _f32(g, 1.0))
    fused = g.op("Pow", yolo, _f32(g, 1.0 - blend)) * g.op("Pow", probs, _f32(g, blend))  # (K, C)
    label = g.op("ArgMax", fused, axis=1, keepdims=0)  # the first of equal scores, as numpy's argmax
    score = g.op("ReduceMax", fused, g.const(np.array([1])), keepdims=0)  # (K,)
    # class-wise NMS within each frame: one NMS "class" per (frame, class), the others score -1
    classes = config.num_classes
    group = frame * g.const(np.array(classes)) + label  # (K,)
    groups = g.op("Range", g.const(np.array(0)),
                  g.op("Mul", g.op("Gather", g.op("Shape", frames), g.const(np.array(0)), axis=0),
                       g.const(np.array(classes))), g.const(np.array(1)))
    member = g.op("Equal", g.op("Unsqueeze", groups, g.const(np.array([1]))),
                  g.op("Unsqueeze", group, g.const(np.array([0]))))  # (N * C, K)
    candidates = g.op("Unsqueeze", g.where(member, g.op("Unsqueeze", score, g.const(np.array([0]))),
                                           _f32(g, -1.0)), g.const(np.array([0])))  # (1, N * C, K)
    selected = g.op("NonMaxSuppression", g.op("Unsqueeze", boxes, g.const(np.array([0]))), candidates,
                    g.const(np.array([max_det])), g.const(np.array([iou], np.float32)),
                    g.const(np.array([-0.5], np.float32)))  # every real candidate (fused >= 0) enters
    index = g.op("Gather", selected, g.const(np.array(2)), axis=1)  # (M,)
    boxes, score, label, frame = (g.op("Gather", v, index, axis=0) for v in (boxes, score, label, frame))
    key = g.op("Cast", frame, to=11) * 4.0 - g.op("Cast", score, to=11)  # frame by frame, strongest first
    _, order = g.op_multi("TopK", key, g.op("Shape", key), outputs=2, axis=0, largest=0, sorted=1)
    boxes, score, label, frame = (g.op("Gather", v, order, axis=0) for v in (boxes, score, label, frame))
    keep = score >= _f32(g, conf)
    return tuple(g.op("Compress", v, keep, axis=0) for v in (boxes, score, label, frame))
