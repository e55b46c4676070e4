"""One exception type for every user-facing error: the CLI prints its message and exits non-zero."""
from __future__ import annotations

import sys
from pathlib import Path

#: the exit status of every refusal of bad input (argparse's own usage errors exit 2 too)
BAD_INPUT = 2


class LrbenchError(Exception):
    """A problem with the user's input (config, data, model name) that deserves a clear message, not a traceback."""


def choices(valid) -> str:
    return ", ".join(sorted(map(str, valid)))


def closest(word: str, candidates) -> str | None:
    """The candidate most like `word` (difflib, ratio >= 0.6), for a "did you mean" in a refusal; None if none."""
    import difflib

    match = difflib.get_close_matches(word, sorted(set(map(str, candidates))), n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(word: str, candidates) -> str:
    match = closest(word, candidates)
    return f" (did you mean {match}?)" if match else ""


def input_text(path, what: str) -> str:
    """The text of a file the user named (`what`: "results CSV", "hypotheses file", ...): a missing path, a folder,
    an unreadable file or bytes that are not UTF-8 are one line naming it, never a traceback. A BOM is dropped."""
    path = Path(path)
    if path.is_dir():
        raise LrbenchError(f"{what} {path} is a folder; give a file")
    if not path.exists():
        raise LrbenchError(f"{what} {path}: no such file; give the path of an existing file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LrbenchError(f"{what} {path}: cannot be read ({err.strerror}); give a readable file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise LrbenchError(f"{what} {path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x}); save the file as "
                           "UTF-8") from None


def report(err: LrbenchError, prog: str = "lrbench") -> int:
    """A side tool's refusal: `<prog> error: <message>` on stderr, as `lrbench` prints it; returns BAD_INPUT."""
    print(f"{prog} error: {err}", file=sys.stderr, flush=True)
    return BAD_INPUT
