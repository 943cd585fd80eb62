"""The data layer's error type: every message names the file and, where there is one, the row and id."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad or missing input data. ``str(err)`` reads ``<file>: row <i> (id <id>): <reason>``."""

    def __init__(
        self,
        reason: str,
        path: str | os.PathLike | None = None,
        row: int | None = None,
        id: str | None = None,  # noqa: A002 - the natural name for a structure id
    ) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.row = row
        self.id = id
        where = []
        if self.path is not None:
            where.append(self.path)
        if row is not None:
            where.append(f"row {row}" + (f" (id {id})" if id is not None and str(id) != str(row) else ""))
        elif id is not None:
            where.append(f"id {id}")
        super().__init__(": ".join(where + [reason]))
