"""Errors a user can act on. Each message names the file or value at fault and what to do about it."""


class StemqueryError(Exception):
    """Base class: the CLI and the server turn these into one-line messages, not tracebacks."""

    code = "error"


class AudioInputError(StemqueryError):
    """An input file is missing, unreadable, empty, non-finite or has an unsupported layout."""

    code = "bad_audio"


class QueryError(StemqueryError):
    """The query cannot describe a sound: silent, too short, or a range outside the mix."""

    code = "bad_query"


class OutputError(StemqueryError):
    """Results cannot be written where asked."""

    code = "bad_output"


class Aborted(StemqueryError):
    """The progress callback asked to stop (it raised); nothing was written."""

    code = "aborted"
