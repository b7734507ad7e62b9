"""One error type for bad maintenance input, naming the field and the row."""

from __future__ import annotations


class MaintenanceDataError(ValueError):
    """Input that cannot be used: says which file, field and row, so the user can fix it.

    The CLI catches it, prints it on one line and exits with code 2.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None,
                 row: int | str | None = None) -> None:
        self.source, self.field, self.row = source, field, row
        where = []
        if source:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
