"""The one exception type that the CLI turns into a single line on stderr and a non-zero exit."""


class PupilError(Exception):
    """A problem the user can fix (bad input, missing data, unknown name); printed without a traceback."""


class Interrupted(PupilError):
    """Raised after Ctrl-C once the resume state is safely on disk (training can be resumed)."""
