"""Surface defect detection: YOLO (ultralytics) + an MoE second stage, with sizes in millimetres."""

from manufacturing.defects.errors import DefectDataError

__all__ = ["DefectDataError"]
