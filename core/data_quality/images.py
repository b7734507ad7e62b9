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


def nearest_earlier(hashes: np.ndarray, *, max_distance: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each hash, the first earlier one within `max_distance` bits: ((n,) its index or -1, (n,) bits).

    Vectorised per block of rows (memory block x n), never a list of pairs: a folder of blank
    images would otherwise make n^2 of them.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    match = np.full(len(hashes), -1, dtype=np.int64)
    bits = np.zeros(len(hashes), dtype=np.int64)
    for start in range(0, len(hashes), block):
        rows = np.arange(start, min(start + block, len(hashes)))
        distance = np.bitwise_count(hashes[rows, None] ^ hashes[None, :start + block]).astype(np.int64)
        close = (distance <= max_distance) & (np.arange(distance.shape[1])[None, :] < rows[:, None])  # earlier only
        found = close.any(axis=1)
        first = close.argmax(axis=1)
        match[rows[found]] = first[found]
        bits[rows[found]] = distance[found, first[found]]
    return match, bits


def near_any(hashes: np.ndarray, others: np.ndarray, *, max_distance: int, block: int = 1024) -> np.ndarray:
    """(n,) bool: the hash is within `max_distance` bits of one of `others`."""
    hashes, others = np.asarray(hashes, dtype=np.uint64), np.asarray(others, dtype=np.uint64)
    found = np.zeros(len(hashes), dtype=bool)
    for start in range(0, len(hashes), block):
        distance = np.bitwise_count(hashes[start:start + block, None] ^ others[None, :])
        found[start:start + block] = (distance <= max_distance).any(axis=1)
    return found


def appearance(image) -> np.ndarray:
    """(24,) float: a 4x4 grey thumbnail and an 8-bin intensity histogram of a PIL image, for
    clustering images by look when no detector embeddings are given."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    from PIL import Image

    thumb = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize((4, 4), Image.Resampling.BOX), dtype=np.float64)
    histogram = np.histogram(grey, bins=8, range=(0, 256))[0] / grey.size
    return np.concatenate([thumb.reshape(-1) / 255.0, histogram])
