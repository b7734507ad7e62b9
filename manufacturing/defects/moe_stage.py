"""The MoE second stage: re-score and re-classify each YOLO box from its crop.

A small CNN turns the crop into an 8x8 grid of feature tokens; one residual MoE layer from `core`
routes each token to its experts, so experts can specialise by local texture (grain, scale,
streaks) and by defect family; the pooled tokens plus the box's geometry give class logits with
one extra "background" class. It is trained on ground-truth crops, on YOLO's own boxes that hit a
defect and on YOLO's false positives. Its probabilities are blended with YOLO's per-class scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from core import MoEConfig, MoELayer
from core.trainer import Trainer, TrainerConfig, load_checkpoint, save_checkpoint
from manufacturing.defects.detector import Detections

GEOMETRY_FEATURES = 3  # log width share, log height share, log aspect ratio


@dataclass
class CropMoEConfig:
    num_classes: int = 6  # defect classes; the network adds one background class
    crop_size: int = 64  # NEU boxes are 10-200 px: 64 keeps scratches visible, and is cheap on a CPU
    context: float = 0.15  # margin around the box, as a share of its size: the defect's surroundings matter
    channels: tuple[int, int] = (32, 64)  # the two stem convolutions before the token projection
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=16, top_k=2, hidden_size=64, intermediate_size=128))  # 16 small experts: 64 tokens per crop
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        self.channels = tuple(self.channels)
        assert self.crop_size % 8 == 0, f"crop_size must be a multiple of 8, got {self.crop_size}"
        assert self.num_classes >= 1, "num_classes must be >= 1"


@dataclass
class CropTrainingConfig:
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3  # AdamW on a small from-scratch CNN
    patience: int = 4
    val_fraction: float = 0.1  # crops held out to pick the best epoch
    blend: float = 0.5  # final score = yolo^(1 - blend) * moe^blend, per class
    seed: int = 0
    progress: bool = True


def _conv(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: no running statistics to drift in short runs, same maths in train and eval.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
                         nn.SiLU())


class CropMoENet(nn.Module):
    """forward(crops (batch, 3, S, S) float in [0, 1], geometry (batch, 3)) ->
    (logits (batch, num_classes + 1), aux_loss scalar). The last logit is background."""

    def __init__(self, config: CropMoEConfig, *, static: bool = False) -> None:
        super().__init__()
        self.config = config
        hidden = config.moe.hidden_size
        c1, c2 = config.channels
        self.stem = nn.Sequential(_conv(3, c1), _conv(c1, c2), _conv(c2, hidden))  # stride 8
        grid = config.crop_size // 8
        self.position = nn.Parameter(torch.zeros(1, grid * grid, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.moe = MoELayer(config.moe, static=static)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Sequential(nn.LayerNorm(hidden + GEOMETRY_FEATURES),
                                  nn.Linear(hidden + GEOMETRY_FEATURES, config.num_classes + 1))

    def forward(self, crops: torch.Tensor, geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.stem(crops).flatten(2).transpose(1, 2) + self.position  # (batch, grid^2, H)
        routed = self.moe(self.norm(tokens))
        tokens = tokens + self.dropout(routed.output)
        pooled = tokens.mean(dim=1)  # (batch, H)
        return self.head(torch.cat([pooled, geometry], dim=-1)), routed.aux_loss


def crops_and_geometry(image: np.ndarray, boxes: np.ndarray, config: CropMoEConfig) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 BGR image, (n, 4) xyxy px -> crops (n, 3, S, S) float32, geometry (n, 3) float32."""
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    size = config.crop_size
    crops = np.zeros((len(boxes), 3, size, size), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        mx, my = config.context * (x2 - x1), config.context * (y2 - y1)
        a, b = int(max(0, np.floor(x1 - mx))), int(max(0, np.floor(y1 - my)))
        c, d = int(min(w, np.ceil(x2 + mx))), int(min(h, np.ceil(y2 + my)))
        patch = image[b:max(d, b + 1), a:max(c, a + 1)]
        crops[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)[:, :, ::-1].transpose(2, 0, 1) / 255.0
    bw = np.clip(boxes[:, 2] - boxes[:, 0], 1, None)
    bh = np.clip(boxes[:, 3] - boxes[:, 1], 1, None)
    geometry = np.stack([np.log(bw / w), np.log(bh / h), np.log(bw / bh)], axis=1).astype(np.float32)
    return crops, geometry


def _batches(crops, geometry, labels, batch_size: int, seed: int):
    def epoch_batches(epoch: int):
        rng = np.random.default_rng(seed + epoch)
        order = rng.permutation(len(labels))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = torch.from_numpy(crops[idx])
            # Surfaces have no orientation: flips are free extra crops.
            if rng.random() < 0.5:
                x = x.flip(-1)
            if rng.random() < 0.5:
                x = x.flip(-2)
            yield x, torch.from_numpy(geometry[idx]), torch.from_numpy(labels[idx])
    return epoch_batches


class CropMoEClassifier:
    """Fitted second stage (scikit-learn style). Learned: `model_`, `history_`, `best_epoch_`.

    `load` also reads the stage's ONNX export; it then runs in onnxruntime (`session_`, no `model_`).
    """

    def __init__(self, *, config: CropMoEConfig, training: CropTrainingConfig | None = None) -> None:
        self.config = config
        self.training = training or CropTrainingConfig()

    def fit(self, crops: np.ndarray, geometry: np.ndarray, labels: np.ndarray) -> CropMoEClassifier:
        """crops (n, 3, S, S) float32, geometry (n, 3), labels (n,) int64 in [0, num_classes] (last = background)."""
        train = self.training
        labels = np.asarray(labels, np.int64)
        assert labels.min() >= 0 and labels.max() <= self.config.num_classes, "labels must be in [0, num_classes]"
        rng = np.random.default_rng(train.seed)
        order = rng.permutation(len(labels))
        n_val = max(1, int(train.val_fraction * len(labels)))
        val, fit_idx = order[:n_val], order[n_val:]
        v_x, v_g, v_y = (torch.from_numpy(a[val]) for a in (crops, geometry, labels))
        torch.manual_seed(train.seed)
        model = CropMoENet(self.config)
        # Balanced class weights: background crops outnumber some defect classes several times.
        counts = np.bincount(labels[fit_idx], minlength=self.config.num_classes + 1).astype(np.float64)
        weight = torch.tensor(len(fit_idx) / np.maximum(counts, 1) / len(counts), dtype=torch.float32)

        def loss_fn(m, batch):
            logits, aux = m(batch[0], batch[1])
            return F.cross_entropy(logits, batch[2], weight=weight) + aux

        def evaluate(m):
            logits, _ = m(v_x, v_g)
            return {"val_loss": F.cross_entropy(logits, v_y, weight=weight).item(),
                    "val_accuracy": (logits.argmax(-1) == v_y).float().mean().item()}

        result = Trainer(TrainerConfig(learning_rate=train.learning_rate, grad_accumulation=1,
                                       max_epochs=train.epochs, patience=train.patience, seed=train.seed,
                                       progress=train.progress)).fit(
            model, _batches(crops[fit_idx], geometry[fit_idx], labels[fit_idx], train.batch_size, train.seed),
            steps_per_epoch=-(-len(fit_idx) // train.batch_size), loss_fn=loss_fn, evaluate_fn=evaluate)
        self.model_ = model.eval()
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.best_metrics_ = result.best_metrics
        return self

    def predict_proba(self, crops: np.ndarray, geometry: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """(n, num_classes + 1) class probabilities, background last."""
        out = []
        session = getattr(self, "session_", None)
        with torch.inference_mode():
            for start in range(0, len(crops), batch_size):
                chunk = (crops[start:start + batch_size], geometry[start:start + batch_size])
                if session is not None:
                    logits = torch.from_numpy(session.run(["logits"], {"crops": chunk[0], "geometry": chunk[1]})[0])
                else:
                    logits, _ = self.model_(*(torch.from_numpy(a) for a in chunk))
                out.append(logits.softmax(-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.num_classes + 1), np.float32)

    def rescore(self, image: np.ndarray, detections: Detections, *, iou: float = 0.7) -> Detections:
        """Blend YOLO's per-class scores with this stage's probabilities; re-classify; re-run NMS."""
        if len(detections) == 0:
            return detections
        assert detections.class_scores is not None, "rescoring needs the detector's per-class scores"
        probs = self.predict_proba(*crops_and_geometry(image, detections.boxes, self.config))[:, :-1]
        blend = self.training.blend
        fused = np.power(np.clip(detections.class_scores, 1e-9, 1), 1 - blend) * np.power(probs, blend)
        classes, scores = fused.argmax(1), fused.max(1).astype(np.float32)
        keep = torchvision.ops.batched_nms(torch.from_numpy(detections.boxes).float(), torch.from_numpy(scores),
                                           torch.from_numpy(classes), iou).numpy()
        return Detections(detections.boxes[keep], scores[keep], classes[keep].astype(np.int64), fused[keep])

    def save(self, path, *, names: list[str], metrics: dict | None = None):
        return save_checkpoint(path, self.model_, config=self.config, metrics=metrics or self.best_metrics_,
                               extra={"names": names, "training": dataclasses.asdict(self.training),
                                      "kind": "moeworks.defects.crop_moe"})

    @classmethod
    def load(cls, path, *, threads: int | None = None) -> tuple[CropMoEClassifier, list[str]]:
        """A saved stage (.pt checkpoint, or its .onnx export run by onnxruntime) and its class names."""
        from pathlib import Path

        from core.model_files import ModelFilesError, verify_file
        from core.trainer import CheckpointError
        from manufacturing.defects.errors import DefectDataError, one_line

        path = Path(path)
        if not path.is_file():
            raise DefectDataError(f"{path}: no such model file")
        try:
            verify_file(path)  # against its folder's MANIFEST.json, when it has one
        except ModelFilesError as error:
            raise DefectDataError(str(error)) from None
        if path.suffix == ".onnx":
            return cls._load_onnx(path, threads=threads)
        try:
            model, metadata = load_checkpoint(path, lambda c: CropMoENet(CropMoEConfig(**c)))
        except CheckpointError as error:  # a full pickle (refused unread) or not a checkpoint of ours
            raise DefectDataError(f"{error}; expected a moeworks MoE-stage checkpoint (.pt) or its ONNX export") \
                from None
        except Exception as error:  # a config or weights of another layout: torch writes paragraphs
            raise DefectDataError(f"{path}: not a moeworks MoE-stage checkpoint (.pt) or its ONNX export "
                                  f"({type(error).__name__}: {one_line(error, 120)})") from None
        if metadata.get("kind") != "moeworks.defects.crop_moe":
            raise DefectDataError(f"{path}: field 'kind' is not moeworks.defects.crop_moe")
        names = metadata.get("names")
        try:
            stage = cls(config=model.config, training=CropTrainingConfig(**metadata["training"]))
        except (KeyError, TypeError) as error:
            raise DefectDataError(f"{path}: field 'training' missing or not a CropTrainingConfig ({error})") from None
        if not (isinstance(names, list) and len(names) == model.config.num_classes
                and all(isinstance(n, str) for n in names)):
            raise DefectDataError(f"{path}: field 'names' must list the stage's {model.config.num_classes} classes")
        stage.model_ = model
        stage.best_metrics_ = metadata.get("metrics", {})
        return stage, names

    @classmethod
    def _load_onnx(cls, path, *, threads: int | None) -> tuple[CropMoEClassifier, list[str]]:
        import json

        from core.onnx_export import inference_session
        from manufacturing.defects.errors import DefectDataError, one_line

        if not path.is_file():
            raise DefectDataError(f"{path}: no such model file")
        try:
            session = inference_session(path, threads=threads)
        except Exception as error:  # onnxruntime raises its own types for unreadable models
            raise DefectDataError(f"{path}: not a readable ONNX model ({one_line(error)})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("kind") != "moeworks.defects.crop_moe" or not {"names", "config", "training"} <= set(meta):
            raise DefectDataError(f"{path}: ONNX metadata field 'kind' is not moeworks.defects.crop_moe, or "
                                  f"'names', 'config' or 'training' is missing (not a moeworks MoE-stage export)")
        stage = cls(config=CropMoEConfig(**json.loads(meta["config"])),
                    training=CropTrainingConfig(**json.loads(meta["training"])))
        stage.session_ = session
        stage.best_metrics_ = {}
        return stage, json.loads(meta["names"])
