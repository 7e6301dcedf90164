"""The one error type users see: its message is a single line naming the file/field and what to do."""


class SpecError(Exception):
    """A problem with user input or files; printed as `error: <message>` with a non-zero exit."""
