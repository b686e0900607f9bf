"""A build folder's state on disk: durable JSON records and the one-build-at-a-time lock.

Records (``.fillup/build.json``, a completion record per shard, ``manifest.json``...) are written the
way a power cut or a SIGKILL cannot leave half of: a uniquely named temporary file beside the target,
fsynced, renamed over the target, then the folder fsynced so the rename itself is on disk.  A record
that is missing, empty or not JSON reads as ``None``: "not done", and the work is redone.

The lock is ``fcntl.flock`` on ``.fillup/lock``: the kernel drops it when the process ends, however
it ends, so a SIGKILLed build never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from fillup_data.errors import FillupError

LOCK_NAME = "lock"

# Lock descriptors this process holds.  A forked child (a ProcessPoolExecutor worker) closes its
# copies at once: a worker orphaned by a SIGKILLed build lingers, and through an inherited
# descriptor it would hold the build's lock for ever.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)  # closes the child's copy only: the parent keeps its lock
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: the folder entry is data too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems (and all of Windows) cannot fsync a folder
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Temp file (unique name: two writers never share one) -> fsync -> rename -> fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def replace_durably(tmp: Path, path: Path) -> None:
    """Flush a finished temporary file to disk and rename it over ``path``, durably."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def unique_temp_path(path: Path) -> Path:
    """``NAME.PID-RANDOM@HOST.tmp`` beside ``path``: two processes never write the same temporary file,
    and a reader can tell whether the writer was a process of this host that is gone."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}@{socket.gethostname()}.tmp")


def temp_writer(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that named a temp file ``unique_temp_path``, or None."""
    if not name.endswith(".tmp") or "@" not in name:
        return None
    stem, host = name[: -len(".tmp")].rsplit("@", 1)
    pid = stem.rsplit(".", 1)[-1].split("-", 1)[0]
    return (host, int(pid)) if pid.isdigit() else None


def process_gone_on_this_host(host: str, pid: int) -> bool:
    """True only when ``pid`` ran on this host and no longer exists (a reused pid reads as alive)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def encode_json(path: Path, data) -> bytes:
    """``data`` as UTF-8 JSON; a string that is not valid Unicode (a file name with undecodable
    bytes, read through surrogateescape) is a FillupError naming the file, not a traceback."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        from fillup_data.shards.writer import show_undecodable

        raise FillupError(
            f"{path}: cannot write '{show_undecodable(_first_undecodable(data) or '?')}': it is not valid UTF-8; a "
            "source file name probably holds bytes in another encoding: rename it to UTF-8 (e.g. with convmv) and rerun"
        ) from None


def _first_undecodable(data) -> str | None:
    from fillup_data.shards.writer import encodes_as_utf8

    if isinstance(data, str):
        return None if encodes_as_utf8(data) else data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for k, v in items:
        found = _first_undecodable(k) if isinstance(k, str) else None
        found = found or _first_undecodable(v)
        if found:
            return found
    return None


def write_json_atomic(path: Path, data) -> None:
    write_bytes_durably(Path(path), encode_json(Path(path), data))


def read_json_record(path: Path) -> dict | None:
    """The record at ``path``, or None when it is missing, empty, unreadable or not a JSON object."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return None
    return data if isinstance(data, dict) else None


class BuildLock:
    """An exclusive, non-blocking lock on one build folder, held for the whole build.

    ``flock`` belongs to the open file: the kernel releases it when the last descriptor closes,
    i.e. when this process ends however it ends, so there is no stale lock to clean up after a
    crash (forked children drop their copies, above).  On NFS, Linux maps ``flock`` to an NFS lock
    that other hosts see.  The file's content (pid, host, start time) only serves the error message
    of a second build."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> "BuildLock":
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise FillupError(
                f"{state_dir.parent}: another build ({holder}) is running in this folder; wait for it to end, "
                "or stop it, before relaunching (two builds in one folder would overwrite each other's shards)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _HELD_LOCK_FDS.add(fd)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "BuildLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown: it has only just started"


# --------------------------------------------------------------------------- shard completion records
STATE_DIR = ".fillup"


def shard_record_path(out: Path, shard_name: str) -> Path:
    return Path(out) / STATE_DIR / "shards" / f"{shard_name}.json"


def shard_record(shard, num_samples: int, num_bytes: int, sha256: str, rows: list[dict], skipped: list,
                 retries: int = 0, pixel_setup: dict | None = None) -> dict:
    """What a task writes when its shard is renamed into place (``shard``: a ``plan.ShardPlan``);
    a synthetic shard also records the ``fastpath.pixel_setup`` its images were made with."""
    record = {
        "path": shard.path, "split": shard.split, "origin": shard.origin, "num_samples": num_samples,
        "num_bytes": num_bytes, "sha256": sha256, "rows": rows, "skipped": skipped, "retries": retries,
    }
    if pixel_setup is not None:
        record["pixel_setup"] = pixel_setup
    return record


def save_shard_record(out: Path, shard, record: dict) -> None:
    write_json_atomic(shard_record_path(out, shard.name), record)


def completed_shard(out: Path, shard) -> dict | None:
    """The shard's completion record when the shard looks done: a readable record and a tar of the
    recorded size (cheap, for deciding what to run; ``verify_shard`` reads the bytes)."""
    rec = read_json_record(shard_record_path(out, shard.name))
    if rec is None or not isinstance(rec.get("num_bytes"), int) or not isinstance(rec.get("sha256"), str):
        return None
    tar = Path(out) / shard.path
    try:
        if tar.stat().st_size != rec["num_bytes"]:
            return None
    except OSError:
        return None
    return rec


def verify_shard(out: Path, shard, record: dict) -> bool:
    """True when the tar's sha256 is the one its completion record holds."""
    from fillup_data.shards.writer import sha256_file

    try:
        return sha256_file(Path(out) / shard.path) == record["sha256"]
    except OSError:
        return False


def forget_shard(out: Path, shard) -> None:
    """Mark a shard not done: its record and its tar go, so the next pass rewrites it."""
    shard_record_path(out, shard.name).unlink(missing_ok=True)
    (Path(out) / shard.path).unlink(missing_ok=True)
