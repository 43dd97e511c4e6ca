"""User-facing errors: one line that names the problem and says what to do."""
from __future__ import annotations


class CompressError(Exception):
    """An error the user can fix. The CLI prints `str(err)` as one line, without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class RecipeError(CompressError):
    """A recipe that cannot be used as written (unknown key, wrong type, bad value, empty target)."""


class CheckpointError(CompressError):
    """A checkpoint that cannot be read, or does not fit the architecture it claims."""


class DataError(CompressError):
    """A data source that cannot be found or does not fit the model."""


class DivergedError(CompressError):
    """Training produced a NaN/inf loss: the run stops and nothing is written."""


class ResourceError(CompressError):
    """The machine ran out of memory or disk mid-run: the message says what to lower or free."""


class StageError(CompressError):
    """A stage whose params or targets cannot apply to this model: a configuration problem the engine
    reports with the recipe and stage, unlike any other exception from a method, which is a bug."""
