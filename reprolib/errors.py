"""Errors that the CLI turns into one-line messages and a non-zero exit."""


class ReprolibError(Exception):
    """A problem the user can fix (bad input, missing file, bad option)."""


class DataError(ReprolibError):
    """A problem in a data file, located by file and (when known) line."""

    def __init__(self, path, line, problem):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {problem}")
