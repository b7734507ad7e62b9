"""Level 1 and 2 for images: exact copies (SHA-256 of the bytes), near copies by perceptual hash
(imagehash's DCT pHash, 64 bits) and a small appearance feature for clustering when no detector
gives embeddings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def perceptual_hash(image) -> np.uint64:
    """64-bit pHash of a PIL image (imagehash.phash: DCT of a 32x32 grey copy, signs of 8x8 low frequencies)."""
    import imagehash

    bits = imagehash.phash(image).hash.reshape(-1)  # (64,) bool
    return np.uint64(int("".join("1" if b else "0" for b in bits), 2))


def near_pairs(hashes: np.ndarray, *, max_distance: int, others: np.ndarray | None = None,
               block: int = 2048) -> list[tuple[int, int, int]]:
    """(i, j, bits differing) for pairs within `max_distance` bits: i < j inside `hashes`, or every
    (i in hashes, j in others) when `others` is given. Blocks bound memory at block x n."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    against = hashes if others is None else np.asarray(others, dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), block):
        distance = np.bitwise_count(hashes[start:start + block, None] ^ against[None, :])  # (block, n)
        i, j = np.nonzero(distance <= max_distance)
        i = i + start
        keep = (i < j) if others is None else np.ones(len(i), dtype=bool)
        pairs += [(int(a), int(b), int(distance[a - start, b])) for a, b in zip(i[keep], j[keep], strict=True)]
    return pairs


def appearance(image) -> np.ndarray:
    """(24,) float: a 4x4 grey thumbnail and an 8-bin intensity histogram of a PIL image, for
    clustering images by look when no detector embeddings are given."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    from PIL import Image

    thumb = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize((4, 4), Image.Resampling.BOX), dtype=np.float64)
    histogram = np.histogram(grey, bins=8, range=(0, 256))[0] / grey.size
    return np.concatenate([thumb.reshape(-1) / 255.0, histogram])
