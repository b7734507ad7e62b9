"""Serving the defect detector of manufacturing/defects: YOLO weights or their ONNX export.

A request carries images, each as base64 of an encoded file (PNG, JPEG, BMP: what OpenCV
decodes): {"instances": [{"image": "<base64>"}, ...]}. The answer per image lists its defects as
the vertical's inspector reports them: class, score, box in pixels and mm, width, height and area
in mm (the camera's scale from `--camera`, a calibration file; defects under its minimum size are
left out), plus the image's size. The detector runs in PyTorch (the weights-only .pt of `defects
train`; an ultralytics .pt, a full pickle, is refused) or onnxruntime (.onnx, or the
static INT8 file of `moeworks defects export` with --quantize int8_static on an export folder);
requests batched together go through the detector as one batch (an ONNX file exported with a
pinned batch runs its images one by one, as YoloDetector does). A `defects train` folder's MoE
second stage (moe_stage.pt) re-scores YOLO's boxes.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from deploy.serving.base import (
    AdapterOptions,
    InputField,
    InvalidRequest,
    ModelAdapter,
    ModelPath,
    file_version,
    request_instances,
)

if TYPE_CHECKING:
    from manufacturing.defects.pipeline import DefectInspector

DETECTOR_PT, DETECTOR_ONNX, DETECTOR_INT8, MOE_STAGE = "detector.pt", "detector.onnx", "detector.int8.onnx", \
    "moe_stage.pt"
MAX_IMAGE_BYTES = 16 << 20  # one encoded image; a line-scan frame of a few thousand pixels fits easily
MAX_IMAGE_PIXELS = 40_000_000  # decoded: bounds the memory a single request can take


def is_defects_folder(path: Path) -> bool:
    """A `defects train` run folder (detector.pt) or a `defects export` folder (detector.onnx)."""
    return (path / DETECTOR_PT).is_file() or (path / DETECTOR_ONNX).is_file()


def _choose_files(source: Path, options: AdapterOptions) -> tuple[Path, Path | None]:
    """(detector file, MoE stage or None) for a file or folder and the requested scheme."""
    if source.is_dir():
        if options.quantize == "int8_static":
            if not (source / DETECTOR_INT8).is_file():
                raise ValueError(f"{source}: no {DETECTOR_INT8}; make it with `moeworks defects export --int8`")
            return source / DETECTOR_INT8, None
        if options.quantize != "none":
            raise ValueError(f"quantize={options.quantize!r}: the detector's INT8 is the static file of "
                             "`moeworks defects export`; serve the export folder with --quantize int8_static")
        if (source / DETECTOR_PT).is_file():
            stage = source / MOE_STAGE
            return source / DETECTOR_PT, stage if stage.is_file() else None
        return source / DETECTOR_ONNX, None
    if options.quantize != "none":
        raise ValueError(f"{source}: quantize={options.quantize!r} applies to an export folder "
                         f"(serves its {DETECTOR_INT8}); serve an INT8 .onnx file as it is")
    return source, None


class DefectsAdapter(ModelAdapter):
    """Images in (field `image`, base64), defects with sizes in mm out (field `defects`)."""

    family = "defects"
    describes = "a `defects train` run or `defects export` folder, its detector.pt or the detector's .onnx"
    # The row is the decoded image (any size); `image` arrives as base64, see `parse`.
    fields: ClassVar[list[InputField]] = [InputField("image", np.dtype(object), ())]

    def __init__(self, *, inspector: DefectInspector, name: str, version: str, runtime: str,
                 options: AdapterOptions) -> None:
        self.inspector, self.name, self.version, self.runtime, self.options = inspector, name, version, runtime, options

    @classmethod
    def recognise(cls, candidate: ModelPath) -> bool:
        if candidate.path.is_dir():
            return is_defects_folder(candidate.path)
        metadata = candidate.onnx
        if metadata is not None:
            return "names" in metadata and "imgsz" in metadata
        from manufacturing.defects.detector import DETECTOR_KIND

        return candidate.checkpoint is not None and candidate.checkpoint.get("kind") == DETECTOR_KIND

    @classmethod
    def check_options(cls, path: Path, options: AdapterOptions) -> None:
        _choose_files(path, options)

    @classmethod
    def from_path(cls, path: str | Path, options: AdapterOptions | None = None) -> DefectsAdapter:
        from manufacturing.defects.calibration import Calibration
        from manufacturing.defects.detector import YoloDetector
        from manufacturing.defects.errors import DefectDataError
        from manufacturing.defects.moe_stage import CropMoEClassifier
        from manufacturing.defects.pipeline import DefectInspector, InspectionConfig

        source, options = cls.start_loading(path, options)  # refuses a scheme the files do not have
        if source.is_dir():
            from core.model_files import verify_manifest

            verify_manifest(source)  # ModelFilesError (a ValueError): one line naming the file
        detector_path, stage_path = _choose_files(source, options)
        try:
            detector = YoloDetector.load(detector_path, threads=options.threads)
            stage = CropMoEClassifier.load(stage_path)[0] if stage_path else None
            camera = Calibration.from_file(options.camera) if options.camera else Calibration()
        except DefectDataError as error:
            raise ValueError(str(error)) from None
        inspector = DefectInspector(detector=detector, calibration=camera, second_stage=stage,
                                    config=InspectionConfig(conf=options.conf))
        version = file_version(detector_path) + (f"+moe:{file_version(stage_path)[7:]}" if stage_path else "")
        variant = "int8_static" if detector_path.name.endswith(".int8.onnx") else "fp32"
        return cls(inspector=inspector, name="defects-yolo" + ("+moe" if stage else ""), version=version,
                   runtime=f"{'torch' if detector.backend == 'pytorch' else 'onnxruntime'}+{variant}", options=options)

    def warm_up_sizes(self, max_rows: int) -> list[int]:
        return [1, 2]  # no compiled graphs to specialise: warm the allocator and the session only

    def describe(self) -> dict[str, Any]:
        cal = self.inspector.calibration
        return {"name": self.name, "model_version": self.version, "runtime": self.runtime,
                "inputs": {"image": {"encoding": "base64 of a PNG/JPEG/BMP file", "any_size": True}},
                "classes": self.inspector.detector.names, "imgsz": self.inspector.detector.imgsz,
                "calibration": cal.to_dict()}

    def instance_schema(self) -> dict[str, Any]:
        return {"type": "object", "properties": {"image": {"type": "string", "contentEncoding": "base64"}},
                "required": ["image"], "additionalProperties": False}

    def parse(self, payload: Any, *, max_rows: int = 256) -> tuple[dict[str, np.ndarray], int]:
        instances = request_instances(payload, max_rows=max_rows)
        images = np.empty(len(instances), dtype=object)
        for row, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise InvalidRequest(["body", "instances", row], "expected an object with an `image` field")
            unknown = sorted(set(instance) - {"image"})
            if unknown:
                raise InvalidRequest(["body", "instances", row, unknown[0]],
                                     "unknown input; this model reads ['image']")
            images[row] = decode_image(instance.get("image"), ["body", "instances", row, "image"])
        return {"image": images}, len(instances)

    def example(self, rows: int, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Generated steel-like surfaces with planted defects, 200 px as NEU-DET (warm-up, load tests)."""
        import cv2

        from manufacturing.defects.synthetic import planted_image

        rng = np.random.default_rng(seed)
        images = np.empty(rows, dtype=object)
        for i in range(rows):
            images[i] = cv2.cvtColor(planted_image(rng, 200, 3)[0], cv2.COLOR_GRAY2BGR)
        return {"image": images}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = list(inputs["image"])
        found = self.inspector.detect(images)
        defects = np.empty(len(images), dtype=object)
        for i, detections in enumerate(found):
            defects[i] = self.inspector.report(detections)
        return {"defects": defects, "width_px": np.array([im.shape[1] for im in images]),
                "height_px": np.array([im.shape[0] for im in images])}


def decode_image(value: Any, loc: list[str | int]) -> np.ndarray:
    """base64 of an encoded image -> (height, width, 3) uint8 BGR; InvalidRequest naming `loc`."""
    import cv2

    if value is None:
        raise InvalidRequest(loc, "field required")
    if not isinstance(value, str):
        raise InvalidRequest(loc, "expected a base64 string of an encoded image file")
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequest(loc, f"image over {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(loc, "not valid base64") from None
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if image is None:
        raise InvalidRequest(loc, "not a decodable image (PNG, JPEG, BMP, ...)")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise InvalidRequest(loc, f"image of {image.shape[1]}x{image.shape[0]} px is over {MAX_IMAGE_PIXELS} pixels")
    return image


def encode_image(image: np.ndarray, extension: str = ".png") -> str:
    """(height, width, 3) uint8 BGR -> the base64 string a request carries (clients and tests)."""
    import cv2

    ok, encoded = cv2.imencode(extension, image)
    assert ok, f"OpenCV could not encode {extension}"
    return base64.b64encode(encoded.tobytes()).decode("ascii")

