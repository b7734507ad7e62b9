"""Channel pruning of the YOLO detector with torch-pruning, and the record that rebuilds its shapes.

The recipe is torch-pruning's YOLOv8 example (Torch-Pruning's examples/yolov8, after its issue
147): DepGraph over the ultralytics DetectionModel, with
- every C2f (YOLO11's C3k2) rewritten as `SplitC2f`, whose two halves are two convolutions (cv0,
  cv1) instead of one convolution whose output is chunked: the chunk ties the two halves to one
  width, which channel removal cannot keep; the rewrite computes exactly what the block computed
  (the halves' weights are the old convolution's rows);
- the Detect head's last convolutions (box distribution and class scores, whose widths the
  decoding fixes), its DFL, and C2PSA (its attention reshapes its channels into heads and splits
  them by a stored width) left out of the removal;
- L1 importance summed over each DepGraph group (torch-pruning's GroupMagnitudeImportance(p=1),
  through core.compress.prune.channel_pruner), the same share of channels removed from every group.

A pruned detector is an ordinary DetectionModel with narrower layers, so the weights-only detector
file (manufacturing.defects.detector) stores it as the YAML plus `PRUNED_KEY`: the format version,
and for each convolution and batch norm that differs from what the YAML builds, its width
([in, out, groups], [features]). Loading builds the YAML, rewrites the C2f blocks, narrows the
named layers (`apply_widths`, bounded and checked) and then loads the state dict strictly: nothing
but tensors and plain JSON is read.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from manufacturing.defects.errors import DefectDataError

PRUNED_KEY = "pruned"
PRUNED_FORMAT = 1
MAX_WIDTH = 4096  # a channel count in a width record; ultralytics' YAMLs stay <= 1024


class SplitC2f(nn.Module):
    """ultralytics' C2f (and C3k2) with its first convolution split into its two output halves.

    forward computes what C2f.forward computes: [cv1(x) first half, second half, m_1(...), ...]
    concatenated into cv2. The ultralytics layer attributes (f, i, type, np) are carried over, so
    DetectionModel runs it in the same place.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        from ultralytics.nn.modules import Conv

        half = block.cv1.conv.out_channels // 2
        self.cv0 = _conv_rows(block.cv1, slice(0, half), Conv)
        self.cv1 = _conv_rows(block.cv1, slice(half, None), Conv)
        self.cv2, self.m = block.cv2, block.m
        for name in ("f", "i", "type", "np"):
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def _conv_rows(conv: nn.Module, rows: slice, conv_type: type) -> nn.Module:
    """An ultralytics Conv (conv + bn + act) holding output channels `rows` of `conv`."""
    old = conv.conv
    out = len(range(old.out_channels)[rows])
    new = conv_type(old.in_channels, out, old.kernel_size[0], old.stride[0], p=old.padding[0], g=old.groups,
                    d=old.dilation[0])
    new.act = copy.deepcopy(conv.act)
    with torch.no_grad():
        new.conv.weight.copy_(old.weight[rows])
        if old.bias is not None:
            new.conv.bias = nn.Parameter(old.bias[rows].clone())
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new.bn, name).copy_(getattr(conv.bn, name)[rows])
        new.bn.eps, new.bn.momentum = conv.bn.eps, conv.bn.momentum
    return new


def split_c2f(model: nn.Module) -> nn.Module:
    """Rewrite every C2f/C3k2 block of `model` (in place) as SplitC2f; the outputs do not change."""
    from ultralytics.nn.modules import C2f

    for name, module in list(model.named_modules()):
        if type(module) is not SplitC2f and isinstance(module, C2f):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            split = SplitC2f(module).train(module.training)
            if isinstance(parent, nn.ModuleList | nn.Sequential):
                parent[int(attribute)] = split
            else:
                setattr(parent, attribute, split)
    return model


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels stay: the Detect head's last convolutions and DFL, and C2PSA."""
    from ultralytics.nn.modules import C2PSA, Detect

    ignored: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, Detect):
            for branch in list(module.cv2) + list(module.cv3):
                ignored.append(branch[-1])  # nn.Conv2d to 4 * reg_max box bins or to the class scores
            ignored.append(module.dfl)
        elif isinstance(module, C2PSA):
            ignored.append(module)
    return ignored


def _head_output(out: Any) -> torch.Tensor:
    """The decoded detections of an eval-mode DetectionModel (ultralytics returns (y, raw maps))."""
    return out[0] if isinstance(out, tuple | list) else out


def prune_detector(model: nn.Module, *, ratio: float, imgsz: int) -> dict[str, int]:
    """Remove `ratio` of the channels of every prunable group of an ultralytics DetectionModel, in
    place (split_c2f first), lowest L1 first. Returns {"parameters_before", "parameters_after"}."""
    import torch_pruning as tp

    from core.compress.prune import prune_channels

    model.float()
    split_c2f(model)
    for parameter in model.parameters():  # ultralytics freezes the DFL; DepGraph traces through it anyway
        parameter.requires_grad_(True)
    example = torch.zeros(1, 3, imgsz, imgsz)
    return prune_channels(model, example, ratio=ratio, ignored_layers=ignored_layers(model),
                          output_transform=_head_output,
                          importance=tp.importance.GroupMagnitudeImportance(p=1))


def layer_widths(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """{"conv": {name: [in, out, groups]}, "bn": {name: [features]}} of every Conv2d and BatchNorm2d."""
    widths: dict[str, dict[str, list[int]]] = {"conv": {}, "bn": {}}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            widths["conv"][name] = [module.in_channels, module.out_channels, module.groups]
        elif isinstance(module, nn.BatchNorm2d):
            widths["bn"][name] = [module.num_features]
    return widths


def pruned_record(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """What the detector file stores of a pruned `model`: the widths that differ from `reference`
    (the same YAML built and split_c2f'd), under the format version."""
    mine, built = layer_widths(model), layer_widths(reference)
    for kind in ("conv", "bn"):
        if set(mine[kind]) != set(built[kind]):
            raise ValueError("the pruned detector's layers are not those its YAML builds (after split_c2f)")
    return {"format": PRUNED_FORMAT,
            "conv": {k: v for k, v in mine["conv"].items() if v != built["conv"][k]},
            "bn": {k: v for k, v in mine["bn"].items() if v != built["bn"][k]}}


def yaml_record(model: nn.Module, config: dict, num_classes: int) -> dict[str, Any]:
    """pruned_record of `model` against what its model YAML `config` builds (split_c2f'd)."""
    from ultralytics.nn.tasks import DetectionModel

    return pruned_record(model, split_c2f(DetectionModel(copy.deepcopy(config), nc=num_classes, verbose=False)))


def _width(value: Any, length: int) -> bool:
    return (isinstance(value, list) and len(value) == length
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WIDTH for v in value))


def apply_widths(model: nn.Module, record: Any, where: str) -> nn.Module:
    """Rebuild the pruned shapes of a detector file on `model` (built from its YAML), in place:
    split_c2f, then each recorded Conv2d / BatchNorm2d replaced by a fresh one of the recorded
    width (weights uninitialised; the state dict is loaded next). DefectDataError on a record that
    is not one (unknown keys, names that are not such layers, widths out of bounds)."""
    if not (isinstance(record, dict) and set(record) == {"format", "conv", "bn"}):
        raise DefectDataError(f"{where}: field '{PRUNED_KEY}' must be an object with 'format', 'conv' and 'bn'")
    if record["format"] != PRUNED_FORMAT:
        raise DefectDataError(f"{where}: field '{PRUNED_KEY}' has format {record['format']!r}; this version reads "
                              f"{PRUNED_FORMAT}")
    split_c2f(model)
    modules = dict(model.named_modules())
    for kind, layer_type, length in (("conv", nn.Conv2d, 3), ("bn", nn.BatchNorm2d, 1)):
        entries = record[kind]
        if not (isinstance(entries, dict) and len(entries) <= len(modules)):
            raise DefectDataError(f"{where}: field '{PRUNED_KEY}.{kind}' must map layer names to widths")
        for name, width in entries.items():
            layer = modules.get(name) if isinstance(name, str) else None
            if type(layer) is not layer_type or not _width(width, length):
                raise DefectDataError(f"{where}: field '{PRUNED_KEY}.{kind}' entry {str(name)[:80]!r} is not a "
                                      f"{layer_type.__name__} of the model with a width in [1, {MAX_WIDTH}]")
            if kind == "conv":
                channels_in, channels_out, groups = width
                if channels_in % groups or channels_out % groups:
                    raise DefectDataError(f"{where}: field '{PRUNED_KEY}.conv' entry {name!r}: groups {groups} "
                                          "must divide both widths")
                new = nn.Conv2d(channels_in, channels_out, layer.kernel_size, layer.stride, layer.padding,
                                layer.dilation, groups, bias=layer.bias is not None, device="meta")
            else:
                new = nn.BatchNorm2d(width[0], eps=layer.eps, momentum=layer.momentum, device="meta")
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attribute, new)
    # The new layers were made on the meta device (no memory for weights about to be replaced):
    # to_empty gives them real storage, which load_state_dict then fills.
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)) or any(
                b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
    return model


def save_pruned(model: nn.Module, path: Any, *, config: dict, names: list[str], imgsz: int,
                metrics: dict | None = None, half: bool = True) -> Any:
    """Write a pruned DetectionModel (after prune_detector) as a weights-only detector file: its
    YAML `config`, and the widths that differ from what the YAML builds (pruned_record).

    half: float16, as detector files are stored (save_detector); False keeps float32 (the start
    of a fine-tuning run, which then trains from exactly the pruned weights).
    """
    from core.trainer import save_checkpoint
    from manufacturing.defects.detector import DETECTOR_KIND

    stored = copy.deepcopy(model).float()
    return save_checkpoint(path, stored.half() if half else stored, config=config, metrics=metrics or {},
                           extra={"kind": DETECTOR_KIND, "names": list(names), "imgsz": int(imgsz),
                                  PRUNED_KEY: yaml_record(model, config, len(names))})
