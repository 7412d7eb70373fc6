"""The library's error types.

Every error a user can cause (a bad config, a bad file, a bad argument) is a :class:`RecsysError`.
The command line prints it as one line on stderr and exits with code 2; anything else is a bug.
Messages name what was wrong and where: the config path or the file, line, field and value.
"""

from __future__ import annotations

#: The most characters of user text (a value, a line, a key) that a message shows: a 6 MB line
#: must not become a 6 MB message. Longer text is cut and marked "... (cut: N characters in all)".
SHOWN_CHARS = 300


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text``, cut to ``limit`` characters with a marker that gives its length when longer.

    Example:
        >>> clip("1" * 400)[-40:]
        '11111111... (cut: 400 characters in all)'
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... (cut: {len(text)} characters in all)"


class RecsysError(Exception):
    """Base class for errors caused by input (config, data, arguments), not by a bug."""


class ConfigError(RecsysError, ValueError):
    """A config file or override that does not match its schema."""


class DataError(RecsysError, ValueError):
    """Input data that cannot be used: a missing file or column, or a bad row in strict mode.

    Args:
        message: what was wrong.
        file: the file it was found in, if any.
        line: the 1-based line (CSV) or row (Parquet) number, if any.
        field: the column, if any.
        value: the offending value, if any.

    Example:
        >>> str(DataError("unknown behaviour", file="ub.csv", line=3, field="behavior_type", value="clk"))
        "ub.csv:3: field 'behavior_type' = 'clk': unknown behaviour"
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        value: object = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.value = value
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        what = ""
        if field is not None:
            what = f"field '{field}' = {value!r}: " if value is not None else f"field '{field}': "
        super().__init__(f"{where}{what}{message}")


class OutputExistsError(RecsysError):
    """The output location already holds data and overwriting was not asked for."""


class Interrupted(Exception):
    """Work stopped by a signal (Ctrl-C, SIGTERM) after saving what can be resumed.

    Not a :class:`RecsysError`: the input was fine. The command line prints the message and exits
    with 128 + the signal's number (130 for Ctrl-C).
    """

    def __init__(self, message: str, *, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum
