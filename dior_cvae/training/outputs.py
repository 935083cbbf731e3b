"""The one policy for every file and folder the example scripts write.

- Nothing a run did not create is overwritten or deleted. A script refuses, naming the flag and the path, to write
  over an existing file unless its overwrite flag is given (`check_output_file`); a training folder records what
  its runs wrote in `.dior-outputs.json` (`OutputFolder`), and even with `--overwrite_output_dir` only those
  entries are replaced: a file the user put there, or a recorded file the user has changed since, is refused.
- Every output is written atomically: a temporary sibling, flushed, then `os.replace` (`write_atomic`,
  `atomic_file`). A kill or a full disk leaves the old file or the new one, never half of one.
- A training folder is locked for the run's lifetime (`OutputFolder.lock`, an exclusive `flock` on
  `.dior.lock` holding the holder's pid): a second run on the same folder is refused with that pid.
- A multi-file save into an existing folder (the final model beside checkpoints and logs) is journalled: the new
  files are staged in `.model.tmp/`, a `COMMIT` list is written, then the files are moved in. A kill in between
  leaves the `COMMIT`: `complete_interrupted_save` (run by the next training run on the folder) finishes the moves,
  and `interrupted_save` lets a loader refuse the folder until then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".dior-outputs.json"
LOCK = ".dior.lock"
STAGING = ".model.tmp"
COMMIT = "COMMIT"
_HELD: dict[str, int] = {}  # folder -> the open lock file of this process (the lock lives as long as the process)


def fail(prog: str, message: str) -> SystemExit:
    return SystemExit(f"{prog}: error: {message}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# single files
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "w") -> Iterator:
    """Open a temporary sibling of `path` for writing; on success flush it to disk and rename it to `path`; on any
    error remove it (the old `path`, if any, is untouched)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(path: Path | str, data: str | bytes) -> None:
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def check_output_file(prog: str, flag: str, path: str | Path, overwrite: bool, inputs: Iterable[tuple[str, str]] = (),
                      overwrite_flag: str = "--overwrite") -> None:
    """Refuse (SystemExit naming `flag` and the path) an output path that is a folder, that is one of the `inputs`
    ((flag, path) pairs; the same file also through a link), or that exists without `overwrite_flag`."""
    target = Path(path)
    if target.is_dir():
        raise fail(prog, f"{flag} {path} is a folder; give a file name")
    if not target.parent.resolve().is_dir() and target.parent.resolve().exists():
        raise fail(prog, f"{flag} {path}: {target.parent} is not a folder")
    for input_flag, input_path in inputs:
        if input_path and Path(input_path).exists() and target.exists() and os.path.samefile(target, input_path):
            raise fail(prog, f"{flag} {path} is the {input_flag} {input_path}: it would overwrite its own input")
        if input_path and target.resolve() == Path(input_path).resolve():
            raise fail(prog, f"{flag} {path} is the {input_flag} {input_path}: it would overwrite its own input")
    if target.exists() and not overwrite:
        raise fail(prog, f"{flag} {path} exists: pass {overwrite_flag} to replace it, or choose another file")


# ---------------------------------------------------------------------------------------------------------------
# training folders
# ---------------------------------------------------------------------------------------------------------------


def interrupted_save(folder: Path | str) -> Path | None:
    """The staging folder of a journalled save into `folder` that was killed after its COMMIT (else None)."""
    staging = Path(folder) / STAGING
    return staging if (staging / COMMIT).is_file() else None


class OutputFolder:
    """A training run's output folder: the lock, the record of what runs wrote, and guarded writes."""

    def __init__(self, folder: Path | str, prog: str, overwrite_flag: str = "--overwrite_output_dir"):
        self.folder = Path(folder)
        self.prog = prog
        self.overwrite_flag = overwrite_flag
        self._manifest: dict[str, str | None] | None = None

    # -- the lock ---------------------------------------------------------------------------------------------------

    def holder(self) -> str | None:
        """The pid holding the folder's lock, or None when it is free (the lock file is only opened, not created)."""
        import fcntl

        if str(self.folder.resolve()) in _HELD:
            return None  # this process's own
        try:
            fd = os.open(self.folder / LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def refuse_if_locked(self) -> None:
        pid = self.holder()
        if pid is not None:
            raise fail(self.prog, f"--output_dir {self.folder} is in use by another run (pid {pid}); wait for it to "
                                  "end or choose another folder")

    def lock(self) -> None:
        """Take the folder's exclusive lock for this process's lifetime (creating the folder), or refuse."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        if str(self.folder.resolve()) in _HELD:
            return
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise fail(self.prog, f"--output_dir {self.folder} is in use by another run (pid {pid}); wait for it to "
                                  "end or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[str(self.folder.resolve())] = fd  # never closed: the lock is held until the process exits

    # -- the record of what runs wrote -----------------------------------------------------------------------------

    def manifest(self) -> dict[str, str | None]:
        """{path relative to the folder: sha256 of the file as the run left it, or None for a folder / not yet
        hashed}; empty for a folder no run has written."""
        if self._manifest is None:
            try:
                data = json.loads((self.folder / MANIFEST).read_text())
                self._manifest = dict(data["files"])
            except (OSError, ValueError, KeyError, TypeError):
                self._manifest = {}
        return self._manifest

    def _save_manifest(self) -> None:
        write_atomic(self.folder / MANIFEST, json.dumps({"files": self.manifest()}, indent=1, sort_keys=True))

    def _relative(self, path: Path | str) -> str:
        path = Path(path)
        if not path.is_absolute():
            path = self.folder / path
        return path.resolve().relative_to(self.folder.resolve()).as_posix()

    def foreign(self, path: Path | str) -> str | None:
        """Why the existing `path` is not a run's to replace (None when it is absent or a run's, unchanged)."""
        full = self.folder / self._relative(path)
        if not full.exists() and not full.is_symlink():
            return None
        name = self._relative(path)
        record = self.manifest()
        if name not in record:
            return f"{full} was not written by {self.prog}"
        if record[name] is not None and full.is_file() and sha256(full) != record[name]:
            return f"{full} was changed since {self.prog} wrote it"
        return None

    def check_replaceable(self, names: Iterable[str]) -> None:
        """Refuse, naming the path and the flag, when any existing entry of `names` is not a run's unchanged file."""
        for name in names:
            problem = self.foreign(name)
            if problem:
                raise fail(self.prog, f"--output_dir {self.folder}: {problem}; it is never overwritten, even with "
                                      f"{self.overwrite_flag}: move it away or choose another folder")

    def claim(self, path: Path | str) -> Path:
        """Check that `path` (in the folder) may be written and record it as this run's; returns the full path."""
        self.check_replaceable([path])
        name = self._relative(path)
        if name not in self.manifest():
            self.manifest()[name] = None
            self._save_manifest()
        return self.folder / name

    def write(self, path: Path | str, data: str | bytes) -> None:
        """Claim `path` and write it atomically."""
        write_atomic(self.claim(path), data)

    def seal(self) -> None:
        """Record the sha256 of every recorded file as it is now (the end of a run): a later change by hand makes
        it the user's."""
        record = self.manifest()
        for name in list(record):
            full = self.folder / name
            if full.is_file():
                record[name] = sha256(full)
            elif not full.exists():
                del record[name]
        self._save_manifest()

    def remove(self, path: Path | str) -> None:
        """Delete a run's entry (a checkpoint beyond the limit); refused for anything else."""
        self.check_replaceable([path])
        full = self.folder / self._relative(path)
        shutil.rmtree(full) if full.is_dir() else full.unlink()
        self.manifest().pop(self._relative(path), None)
        self._save_manifest()

    # -- journalled multi-file saves --------------------------------------------------------------------------------

    def commit_staged(self, staging: Path) -> None:
        """Move every file of `staging` (this folder's STAGING) into the folder: first the record and the COMMIT
        list, then one `os.replace` per file (`_move_staged`)."""
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        self.check_replaceable(sorted({f.split("/")[0] for f in files}))
        for name in sorted({f.split("/")[0] for f in files}):
            self.manifest().setdefault(name, None)
        self._save_manifest()
        write_atomic(staging / COMMIT, json.dumps(files))
        self._move_staged(staging, files)

    def _move_staged(self, staging: Path, files: list[str]) -> None:
        for name in files:
            source, target = staging / name, self.folder / name
            if source.exists():  # a completed move's file is already in place
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
        shutil.rmtree(staging)

    def complete_interrupted_save(self) -> bool:
        """Finish a journalled save killed after its COMMIT (True if there was one); drop a staging folder that
        never reached its COMMIT (the folder then still holds the previous files)."""
        staging = self.folder / STAGING
        if (staging / COMMIT).is_file():
            self._move_staged(staging, json.loads((staging / COMMIT).read_text()))
            return True
        if staging.is_dir():
            shutil.rmtree(staging)
        return False
