"""The one error bad credit data raises: it names the field, the row and what is wrong."""

from __future__ import annotations


class CreditDataError(ValueError):
    """Bad input data. The CLI prints `str(error)` as one line and exits with code 2.

    Args:
        message: what is wrong, in words.
        field: the column at fault, when there is one.
        row: the 1-based data row (header excluded) in `source`, when there is one.
        source: the file the row came from.
    """

    def __init__(self, message: str, *, field: str | None = None, row: int | None = None,
                 source: str | None = None) -> None:
        self.field, self.row, self.source = field, row, source
        where = []
        if source:
            where.append(f"file {source}")
        if row is not None:
            where.append(f"row {row}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
