"""The one error bad defect-detection input raises; the CLI prints it as one line and exits 2."""


class DefectDataError(ValueError):
    """Bad input (an image, an annotation, a folder or a model file), naming the file and the field."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """A library's error message on one line, shortened: torch and onnxruntime write paragraphs."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
