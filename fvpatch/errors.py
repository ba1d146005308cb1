"""fvpatch's own error: bad input, told in one line that names the input at fault.

The command line prints that line and exits 1; any other exception is a bug and keeps its traceback. The
error is a ValueError, and the kinds below are also the built-in error a Python caller would catch for them
(a missing file is a FileNotFoundError, a token outside the prompt an IndexError), so library code written
against those keeps working.
"""


class FvpatchError(ValueError):
    """Bad input: the message is one line naming the input at fault."""


class NotFound(FvpatchError, FileNotFoundError):
    """A file, model or vector the user named does not exist."""


class OutputExists(FvpatchError, FileExistsError):
    """An output file exists and --force was not given."""


class OutOfRange(FvpatchError, IndexError):
    """A token, row or layer index outside what it indexes."""
