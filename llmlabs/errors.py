"""The lab's one exception type, in a module without torch so that `llmlabs --help` imports nothing heavy."""


class LabError(Exception):
    """A user-facing problem. The CLI prints it as one line (`error: ...`) and exits non-zero.
    The message names the file or value at fault and the fix."""
