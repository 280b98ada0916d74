"""Publishing files and directories so that readers see the old version or the new, never half.

Everything planc writes for a user goes through here: a temporary sibling is written, flushed
to disk (fsync), then renamed over the destination. A compile that fails or is killed leaves
no half-written artifact; the temporaries of killed processes are swept by the next publish
to the same place. (The emitted training program's `save_atomically` is the one copy outside:
that program runs without planc.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


def copy_file(source: str | Path, path: str | Path) -> None:
    """Copy `source` to `path` atomically (a reader never sees a partial copy)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(source, temporary)
        _fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporaries of earlier publishes to `out_dir` whose process is gone (killed)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            pid = int(stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def replace_dir(new: Path, out_dir: Path, keep: Sequence[str] = ()) -> None:
    """Rename the finished directory `new` to `out_dir`, replacing an older one.

    `keep` names entries (relative paths) of the old directory that move into the new one
    when the new one lacks them (e.g. a training run's checkpoints).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    for name in keep:
        if (out_dir / name).exists() and not (new / name).exists():
            (new / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out_dir / name, new / name)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, old)
    os.replace(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, keep: Sequence[str] | Callable[[Path], Sequence[str]] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out_dir` to fill; publish it as `out_dir` on success.

    On any exception (a missed verification goal, Ctrl-C) the temporary is removed and
    `out_dir` keeps its previous content. `keep`: see `replace_dir`; a function of the filled
    temporary when what to keep depends on what was written.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield temporary
        _fsync_tree(temporary)
        replace_dir(temporary, out_dir, keep(temporary) if callable(keep) else keep)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
