"""One exception type for every user-facing error: the CLI prints its message and exits non-zero."""


class LrbenchError(Exception):
    """A problem with the user's input (config, data, model name) that deserves a clear message, not a traceback."""


def choices(valid) -> str:
    return ", ".join(sorted(map(str, valid)))
