"""The one exception type users see: its message is a complete, one-line explanation."""


class FastpadimError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ImageError(FastpadimError):
    """One image could not be used; in a batch it is reported and skipped."""
