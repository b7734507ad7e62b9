"""Where each record of a CSV file starts and ends, in bytes: the batch job's chunk plan.

Counting newlines is wrong for CSV: a quoted field may hold a newline, and blank lines are no
records. This scanner follows RFC 4180 quoting (a field in double quotes, `""` an escaped quote):
a newline ends a record only outside quotes, which is where the number of quotes seen so far is
even. It runs vectorised over blocks of the decompressed bytes (a few ms per 4 MB), checks that
the text is UTF-8 and that no record has more fields than the header, and skips blank and
whitespace-only lines as pandas does. The batch job then hands pandas' C parser exactly the bytes
of one chunk (after the header), and checks that the parser found as many rows as planned.
"""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from finance.errors import CreditDataError

BLOCK_BYTES = 1 << 22
_QUOTE, _COMMA, _NEWLINE = ord('"'), ord(","), ord("\n")
_BLANK = np.zeros(256, dtype=bool)
_BLANK[[ord(" "), ord("\t"), ord("\r"), _NEWLINE]] = True


class UnreadableFile(CreditDataError):
    """A file that cannot be read as a whole (bad gzip, not UTF-8, broken quoting, extra fields):
    the batch job quarantines the whole file with this reason."""


@dataclass
class Records:
    """Records found in a run of bytes (positions are offsets in the decompressed text)."""

    starts: np.ndarray  # (n,) int64 first byte of each non-blank record
    ends: np.ndarray  # (n,) int64 one past its last byte (its newline included)
    lines: np.ndarray  # (n,) int64 1-based physical line where it starts
    fields: np.ndarray  # (n,) int64 fields in it (commas outside quotes + 1)


@dataclass
class _State:
    offset: int = 0  # bytes before this block
    quotes: int = 0  # quotes seen so far (odd: inside a quoted field)
    lines: int = 0  # newlines seen so far
    record_start: int = 0
    record_line: int = 1
    record_commas: int = 0
    record_content: int = 0  # non-blank bytes in the record so far
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")())


def open_text_bytes(path: Path) -> BinaryIO:
    """The file's decompressed bytes (.gz files through gzip)."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def read_error_reason(error: Exception) -> str:
    """One line for why a data file could not be read."""
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text (a Latin-1 or Windows-1252 export? save it as UTF-8)"
    if isinstance(error, gzip.BadGzipFile):
        return f"not a gzip file ({error})"
    if isinstance(error, EOFError):
        return "truncated gzip file (the compressed stream ends early)"
    if isinstance(error, zlib.error):
        return f"corrupt gzip data ({error})"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(error, PermissionError):
        return "permission denied"
    return " ".join(str(error).split())[:300] or type(error).__name__


def scan_records(stream: BinaryIO, *, block_bytes: int = BLOCK_BYTES, check_utf8: bool = True) -> Iterator[Records]:
    """Yield the records of `stream` block by block, in order (blank lines left out).

    Raises UnreadableFile for text that is not UTF-8 or a quoted field never closed.
    """
    state = _State()
    while block := stream.read(block_bytes):
        if check_utf8:
            _check_utf8(state, block)
        found = _scan_block(state, np.frombuffer(block, dtype=np.uint8))
        if len(found.starts):
            yield found
    if check_utf8:
        try:
            state.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UnreadableFile(f"not UTF-8 text: the file ends inside a character (line {state.lines + 1})") from None
    if state.quotes % 2:
        raise UnreadableFile(f"a quoted field opened in the record at line {state.record_line} is never closed")
    if state.record_content:  # a last record without a newline
        yield Records(np.array([state.record_start]), np.array([state.offset]), np.array([state.record_line]),
                      np.array([state.record_commas + 1]))


def _check_utf8(state: _State, block: bytes) -> None:
    try:
        state.decoder.decode(block)
    except UnicodeDecodeError as error:
        # the decoder may hold back up to 3 bytes of the previous block; the position is close enough
        at = max(error.start, 0)
        line = state.lines + block[:at].count(b"\n") + 1
        raise UnreadableFile(f"not UTF-8 text: byte 0x{block[at]:02x} at line {line} (a Latin-1 or "
                             "Windows-1252 export? save it as UTF-8)") from None


def _scan_block(state: _State, buf: np.ndarray) -> Records:
    n = len(buf)
    quote = buf == _QUOTE
    inside = ((np.cumsum(quote, dtype=np.int64) + state.quotes) & 1).astype(bool)  # after each byte
    newline = buf == _NEWLINE
    ends = np.flatnonzero(newline & ~inside)  # positions of record-ending newlines in this block
    commas = np.cumsum((buf == _COMMA) & ~inside, dtype=np.int64)
    content = np.cumsum(~_BLANK[buf], dtype=np.int64)
    newlines = np.cumsum(newline, dtype=np.int64)
    # per record ending here: counts since the previous end (the first one carries the state)
    prev = np.concatenate([[-1], ends[:-1]])
    def since(cum: np.ndarray, carry: int) -> np.ndarray:
        before = np.where(prev >= 0, cum[np.maximum(prev, 0)], 0)
        out = cum[ends] - before
        if len(out):
            out[0] += carry
        return out

    record_commas = since(commas, state.record_commas)
    record_content = since(content, state.record_content)
    starts = np.where(prev >= 0, prev + 1 + state.offset, 0)
    if len(starts):
        starts[0] = state.record_start
    lines = np.where(prev >= 0, newlines[np.maximum(prev, 0)] + state.lines + 1, 0)
    if len(lines):
        lines[0] = state.record_line
    keep = record_content > 0
    found = Records(starts[keep], ends[keep] + 1 + state.offset, lines[keep], record_commas[keep] + 1)
    # carry the open record into the next block
    last = ends[-1] if len(ends) else -1
    if last >= 0:  # counts restart after the last record end
        state.record_commas = int(commas[-1] - commas[last])
        state.record_content = int(content[-1] - content[last])
    elif n:  # no record ended in this block: the open record grows
        state.record_commas += int(commas[-1])
        state.record_content += int(content[-1])
    if last >= 0:
        state.record_start = state.offset + last + 1
        state.record_line = state.lines + int(newlines[last]) + 1
    state.quotes += int(quote.sum())
    state.lines += int(newlines[-1]) if n else 0
    state.offset += n
    return found


@dataclass
class CsvPlan:
    """A CSV file's header and its data records cut into chunks of `chunk_rows` records."""

    header: bytes
    rows: int
    chunk_bytes: list[tuple[int, int]]  # [begin, end) bytes of each chunk
    chunk_first_line: list[int]


def plan_csv(path: Path, chunk_rows: int, *, block_bytes: int = BLOCK_BYTES) -> CsvPlan:
    """Scan a whole CSV(.gz) file; raises UnreadableFile with the reason it cannot be read.

    Empty files and files with a header only are planned with 0 rows (the caller reports them).
    """
    header_fields = header_end = None
    header = b""
    rows = 0
    chunks: list[tuple[int, int]] = []
    first_lines: list[int] = []
    try:
        with open_text_bytes(path) as stream:
            for found in scan_records(stream, block_bytes=block_bytes):
                starts, ends, lines, fields = found.starts, found.ends, found.lines, found.fields
                if header_fields is None:
                    header_fields, header_end = int(fields[0]), int(ends[0])
                    starts, ends, lines, fields = starts[1:], ends[1:], lines[1:], fields[1:]
                too_many = np.flatnonzero(fields > header_fields)
                if len(too_many):
                    at = too_many[0]
                    raise UnreadableFile(f"the record at line {lines[at]} has {fields[at]} fields, the header "
                                         f"{header_fields}")
                rows, chunks = _extend_chunks(rows, chunks, first_lines, starts, ends, lines, chunk_rows)
            if header_end is not None:
                stream.seek(0)
                header = stream.read(header_end)
    except (OSError, EOFError, zlib.error) as error:
        raise UnreadableFile(read_error_reason(error)) from None
    return CsvPlan(header, rows, chunks, first_lines)


def _extend_chunks(rows: int, chunks: list[tuple[int, int]], first_lines: list[int], starts: np.ndarray,
                   ends: np.ndarray, lines: np.ndarray, chunk_rows: int) -> tuple[int, list[tuple[int, int]]]:
    """Add records (starts, ends) to the chunk list: a chunk opens every `chunk_rows` records."""
    i = 0
    while i < len(starts):
        filled = rows % chunk_rows
        if filled == 0:
            chunks.append((int(starts[i]), int(ends[i])))
            first_lines.append(int(lines[i]))
        take = min(chunk_rows - filled, len(starts) - i)
        begin = chunks[-1][0]
        chunks[-1] = (begin, int(ends[i + take - 1]))
        rows += take
        i += take
    return rows, chunks


def read_chunk_bytes(stream: BinaryIO, begin: int, end: int) -> bytes:
    """Bytes [begin, end) of a decompressed stream (gzip seeks forward by decompressing)."""
    stream.seek(begin)
    data = stream.read(end - begin)
    if len(data) != end - begin:
        raise UnreadableFile(f"the file ended at byte {begin + len(data)}, the plan read up to {end}: "
                             "it changed during the job")
    return data


def record_lines(data: bytes, first_line: int) -> np.ndarray:
    """(n,) physical line of each non-blank record in `data` (a chunk's bytes, starting a record)."""
    lines = [found.lines for found in scan_records(io.BytesIO(data), check_utf8=False)]
    return (np.concatenate(lines) if lines else np.zeros(0, dtype=np.int64)) + first_line - 1
