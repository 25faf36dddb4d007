"""Exceptions a user can act on, and the exit codes the CLI maps them to.

Every error raised for bad input or a bad model derives from `StarcastError`, so the CLI can print
one line instead of a traceback. Messages name the file, row and column where they apply.
"""

EXIT_OK = 0
EXIT_PARTIAL = 3  # the run finished, but some rows or files failed (see the run manifest)
EXIT_ERROR = 2  # nothing useful was produced: bad arguments, unreadable model, etc.


class StarcastError(Exception):
    """An error whose message is meant for the user."""


class CatalogError(StarcastError):
    """A catalog (Parquet, CSV) that cannot be read or does not follow the schema."""

    def __init__(self, reason: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.reason, self.file, self.row, self.column = reason, file, row, column
        super().__init__(self._where(file=True))

    @property
    def detail(self) -> str:
        """The message without the file, for a report that names the file itself."""
        return self._where(file=False)

    def _where(self, *, file: bool) -> str:
        where = ", ".join(part for part in (
            f"file {self.file}" if file and self.file is not None else None,
            f"row {self.row}" if self.row is not None else None,
            f"column {self.column!r}" if self.column is not None else None) if part)
        return f"{where}: {self.reason}" if where else self.reason


class ModelError(StarcastError):
    """A model bundle that cannot be loaded: missing files, wrong hash, unknown schema version."""


class OutputError(StarcastError):
    """Results or a manifest could not be written (disk full, permission, I/O error): the run stops."""
