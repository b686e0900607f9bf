"""Progress that suits a terminal and a cluster job's log alike, decided once per process.

Three modes (``FILLUP_PROGRESS`` carries the choice into worker processes):

* ``bars``: stderr is a terminal: tqdm bars, as a user watching expects;
* ``lines``: stderr is a file or a pipe (a Slurm log, ``| tee``): no carriage-return frames, one line per
  stage every ``FILLUP_PROGRESS_INTERVAL`` seconds (default 30) with what is done, the rate and an ETA, and
  a closing line for a stage that lasted that long;
* ``off`` (``--quiet``): nothing but warnings and the command's summary.

In ``lines`` and ``off`` the libraries' own bars (diffusers, transformers, huggingface_hub, datasets) are
silenced too: at ImageNet-LT's size their frames alone made gigabytes of log. A log file (``attach_log``:
a rank's or a Ray actor's ``OUT/.fillup/logs/*.log``) receives the same lines whatever the console shows.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

MODES = ("bars", "lines", "off")
ENV_MODE = "FILLUP_PROGRESS"
ENV_INTERVAL = "FILLUP_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0

_lock = threading.Lock()
_log_files: list[TextIO] = []


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def mode() -> str:
    """This process's mode: as configured (or inherited through ``FILLUP_PROGRESS``), else from stderr."""
    value = os.environ.get(ENV_MODE)
    if value in MODES:
        return value
    try:
        return "bars" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # stderr closed or replaced by something without isatty
        return "lines"


def configure(quiet: bool = False) -> str | None:
    """Decide the mode for this process and the workers it starts (they inherit the environment), and
    silence the libraries' bars unless bars are wanted. Returns the previous ``FILLUP_PROGRESS`` value,
    for ``restore`` (a command run in-process, e.g. from a test or a notebook, leaves no trace)."""
    previous = os.environ.get(ENV_MODE)
    chosen = "off" if quiet else mode()
    os.environ[ENV_MODE] = chosen
    if chosen != "bars":
        silence_library_bars()
    return previous


def restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(ENV_MODE, None)
    else:
        os.environ[ENV_MODE] = previous


def silence_library_bars() -> None:
    """The libraries' tqdm bars off: through their environment switches (read at import, and inherited by
    workers) and, for a library already imported or one without a switch (diffusers), its own call."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        import diffusers

        diffusers.utils.logging.disable_progress_bar()


def quiet_loading() -> None:
    """Called before a model loads: diffusers has no environment switch, so its bar is turned off here."""
    if mode() != "bars":
        import diffusers

        diffusers.utils.logging.disable_progress_bar()


def attach_log(path) -> TextIO:
    """Append every progress line and ``note`` of this process to ``path`` (a rank's or actor's log)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", encoding="utf-8", buffering=1)
    with _lock:
        _log_files.append(f)
    return f


def detach_log(f: TextIO) -> None:
    with _lock:
        if f in _log_files:
            _log_files.remove(f)
    f.close()


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def emit(text: str, console: bool | None = None) -> None:
    """One progress line: to stderr in ``lines`` mode (or where ``console`` says so), and to every
    attached log file, time-stamped."""
    line = f"[{_stamp()}] {text}"
    with _lock:
        if console if console is not None else mode() == "lines":
            try:
                print(line, file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass
        for f in _log_files:
            try:
                f.write(line + "\n")
            except (OSError, ValueError):
                pass


def note(text: str) -> None:
    """An information line of a command (``[3/6] real shards ...``): stdout unless ``--quiet``; log files too."""
    if mode() != "off":
        print(text, flush=True)
    with _lock:
        for f in _log_files:
            try:
                f.write(f"[{_stamp()}] {text}\n")
            except (OSError, ValueError):
                pass


def warn(text: str) -> None:
    """A line the user must see even with ``--quiet`` (what was deleted, what was left out): stderr, log files."""
    print(f"warning: {text}", file=sys.stderr, flush=True)
    with _lock:
        for f in _log_files:
            try:
                f.write(f"[{_stamp()}] warning: {text}\n")
            except (OSError, ValueError):
                pass


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _si(value: float) -> str:
    """1,962,354,769 -> '1.96 G' (decimal prefixes, as tqdm's unit_scale): byte counts a person can read."""
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(value) < 999.5 or prefix == "P":
            return f"{value:.0f}" if not prefix and value == int(value) else f"{value:.3g} {prefix}".rstrip()
        value /= 1000
    return f"{value:.3g}"  # pragma: no cover


class Progress:
    """A progress bar with tqdm's small interface (``update``, ``set_postfix_str``, ``close``, ``n``,
    ``total``; a context manager): a tqdm bar in ``bars`` mode, time-throttled lines otherwise."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
                 leave: bool = True, initial: int = 0, position: int | None = None, unit_scale: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._unit_scale = unit_scale
        self._initial, self._postfix = initial, ""
        self._start = self._last = time.monotonic()
        self._lines = 0
        self._interval = _interval()
        self._closed = False
        current = mode()
        self._tqdm = None
        if enabled and current == "bars":
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=leave, initial=initial, position=position,
                              unit_scale=unit_scale)
        # lines go to the console in ``lines`` mode, and to any attached log file in every mode
        self._console_lines = enabled and current == "lines"
        self._active = self._console_lines or bool(_log_files)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        if self._active:
            now = time.monotonic()
            if now - self._last >= self._interval:
                self._last = now
                self._write(now)

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)

    def _write(self, now: float, closing: bool = False) -> None:
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        count = _si if self._unit_scale else "{:,}".format
        if self.total:
            done = f"{count(self.n)}/{count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done = f"{count(self.n)} {self.unit}"
        text = f"{self.desc}: {done}, {_si(rate) if self._unit_scale else f'{rate:,.1f}'} {self.unit}/s"
        if closing:
            text += f", done in {duration(elapsed)}"
        elif self.total and rate > 0 and self.n < self.total:
            text += f", ETA {duration((self.total - self.n) / rate)}"
        if self._postfix:
            text += f"; {self._postfix}"
        self._lines += 1
        emit(text, console=self._console_lines)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        if self._active:
            now = time.monotonic()
            # a stage that showed progress, or lasted a tick, says how it ended; short ones stay silent
            if self._lines or now - self._start >= self._interval:
                self._write(now, closing=True)


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
                 leave: bool = True, initial: int = 0, position: int | None = None,
                 unit_scale: bool = False) -> Progress:
    """The one way this package shows progress (see the module docstring)."""
    return Progress(total, desc, unit, enabled=enabled, leave=leave, initial=initial, position=position,
                    unit_scale=unit_scale)


class Ticker:
    """Calls ``line()`` every interval in a background thread and emits what it returns (None: nothing):
    the build's one overall line. A failing ``line`` never stops the work it reports on."""

    def __init__(self, line, interval: float | None = None):
        self._line = line
        self._interval = _interval() if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fillup-progress", daemon=True)

    def __enter__(self) -> "Ticker":
        if mode() == "lines" or _log_files:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(max(self._interval, 0.05)):
            try:
                text = self._line()
            except Exception as err:  # noqa: BLE001 - a report must not break the build
                text = f"(progress unavailable: {type(err).__name__}: {err})"
            if text:
                emit(text)


def track(iterable, total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
          leave: bool = True):
    """``for x in track(items, ...)``: ``progress_bar`` over an iterable."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    with progress_bar(total, desc, unit, enabled=enabled, leave=leave) as bar:
        for item in iterable:
            yield item
            bar.update(1)
