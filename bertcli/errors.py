"""User-facing errors. Anything raised as a BertcliError is the user's input at fault:
the CLI prints its message (no traceback) and exits with code 2."""


class BertcliError(Exception):
    """A problem in the user's input: recipe, data, arguments or checkpoint."""


class RecipeError(BertcliError):
    """One or more problems in a recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {count}:\n{lines}")


class DataError(BertcliError):
    """Malformed data: the message names the file and the line (or field)."""


class NonFinite(DataError):
    """A model gave outputs that are not finite numbers (NaN or infinite): never scored, never answered."""


class CheckpointError(BertcliError):
    """A checkpoint directory that is missing, incomplete or not a BERT checkpoint."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during training, after a resumable checkpoint was saved (exit code 128 +
    the signal's number: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception from a library, for a one-line message (its type's name
    when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__
