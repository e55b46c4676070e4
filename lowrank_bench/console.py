"""The rich consoles every part of a run prints to: `console` (stderr, so that stdout stays clean for tables) and
`out` (stdout: the run's summary). While a job runs (`copied_to_run_log`, train.job), what they print also goes, as
plain text, to the log files of the root logger: Hydra's job log, the run folder's train.log. The terminal shows it
once, as before; `to_run_log` writes a line to the log alone."""
from __future__ import annotations

import io
import logging
from contextlib import contextmanager

from rich.console import Console
from rich.control import Control

_log_files: list[logging.Handler] = []  # the job's log file handlers, while a job runs
LOG_WIDTH = 160  # the log's lines wrap at this width, or the terminal's when it is wider


class RunConsole(Console):
    """A rich console whose prints (tracebacks from `print_exception` too) are copied to the run's log, plain."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        if _log_files and not self.quiet and not all(isinstance(o, Control) for o in objects):
            to_run_log(plain(objects, kwargs, max(self.width, LOG_WIDTH)))


def plain(objects, kwargs: dict, width: int) -> str:
    """What `print(*objects, **kwargs)` shows, without colours or styles."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, no_color=True, highlight=False).print(*objects, **kwargs)
    return buffer.getvalue().rstrip()


def to_run_log(text: str) -> None:
    """`text` in the job's log files only (not on the terminal); nothing outside a job, for blank text, or on a
    data-parallel rank other than 0 (whose console is quiet)."""
    if not text.strip() or console.quiet:
        return
    text = f"\n{text}" if "\n" in text else text  # a table starts on its own line, below the log line's prefix
    for handler in _log_files:
        handler.handle(logging.LogRecord("lrbench", logging.INFO, __file__, 0, text, None, None))


@contextmanager
def copied_to_run_log():
    """While it lasts, the consoles' prints also go to the root logger's log files (Hydra's job logging: train.log
    in the run folder; none with `hydra/job_logging=disabled`)."""
    _log_files[:] = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    try:
        yield
    finally:
        _log_files.clear()


console = RunConsole(stderr=True)
out = RunConsole()


def print_refusal(message) -> None:
    """A refusal of bad input, as every lrbench command prints it: `lrbench error: <message>`, one line, on stderr."""
    from rich.text import Text

    console.print(Text.assemble(("lrbench error: ", "bold red"), str(message)), soft_wrap=True)
