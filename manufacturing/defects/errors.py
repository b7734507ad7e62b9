"""The one error bad defect-detection input raises; the CLI prints it as one line and exits 2."""


class DefectDataError(ValueError):
    """Bad input (an image, an annotation, a folder or a model file), naming the file and the field."""
