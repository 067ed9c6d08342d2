"""Safe extraction of zip and tar archives: nothing is ever written outside the target folder.

Members with absolute paths, ``..`` components, or links (symbolic or hard) that point outside the
target are refused with :class:`UnsafeArchiveError` before anything is written; device files and FIFOs
are refused too. Each file is written under a temporary name and renamed, and a marker file records a
completed extraction so that re-running skips it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from evlp.errors import DataNotFoundError, EvlpError


class UnsafeArchiveError(EvlpError):
    """An archive member would land outside the extraction folder."""


def _member_target(dest: Path, name: str, archive: Path) -> Path:
    """Where member ``name`` goes under ``dest``; refuse anything that escapes it."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member with an empty or NUL name refused")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in pure.parts:
        raise UnsafeArchiveError(f"{archive}: member '{name}' would be written outside {dest}; refusing "
                                 "the archive (it may be malicious)")
    target = (dest / Path(*pure.parts)) if pure.parts else dest
    root = dest.resolve()
    if not (target.resolve() == root or root in target.resolve().parents):
        raise UnsafeArchiveError(f"{archive}: member '{name}' resolves outside {dest}; refusing the archive")
    return target


def _link_inside(dest: Path, member_path: Path, link: str, archive: Path, name: str) -> None:
    pure = PurePosixPath(link)
    resolved = (member_path.parent / link).resolve() if not pure.is_absolute() else Path(link)
    root = dest.resolve()
    if pure.is_absolute() or not (resolved == root or root in resolved.parents):
        raise UnsafeArchiveError(f"{archive}: link '{name}' -> '{link}' points outside {dest}; refusing the archive")


def _marker(dest: Path, archive: Path) -> Path:
    return dest / f".extracted-{archive.name}"


def _write_atomic(target: Path, src, size_hint: int | None = None) -> None:  # noqa: ANN001 - file object
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, target)


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                 keep: Callable[[str], bool] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Extract a ``.zip`` or a (compressed) tar archive into ``dest``, safely and resumably.

    Every member is checked first; an unsafe one refuses the whole archive before any file is written.

    Args:
        archive: the archive file.
        dest: target folder (created).
        keep: optional filter on member names; members it rejects are skipped.
        progress: called with (members done, members in total) as files are written.

    Returns:
        The number of files written (0 when a previous extraction completed).

    Raises:
        UnsafeArchiveError: a member escapes ``dest`` (``..``, absolute path, outward link, device file).
        DataNotFoundError: the archive is missing or not a zip/tar.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataNotFoundError(f"archive {archive} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    if _marker(dest, archive).exists():
        return 0
    if zipfile.is_zipfile(archive):
        written = _extract_zip(archive, dest, keep, progress)
    elif tarfile.is_tarfile(archive):
        written = _extract_tar(archive, dest, keep, progress)
    else:
        raise DataNotFoundError(f"{archive} is neither a zip nor a tar archive (is the download complete?)")
    _marker(dest, archive).write_text("ok\n", encoding="utf-8")
    return written


def _extract_zip(archive: Path, dest: Path, keep: Callable[[str], bool] | None,
                 progress: Callable[[int, int], None] | None) -> int:
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if keep is None or keep(m.filename)]
        plan = []
        for m in members:
            target = _member_target(dest, m.filename, archive)
            mode = (m.external_attr >> 16) & 0o177777
            if stat.S_ISLNK(mode):
                _link_inside(dest, target, zf.read(m).decode("utf-8", "replace"), archive, m.filename)
                raise UnsafeArchiveError(f"{archive}: symbolic link member '{m.filename}' refused "
                                         "(links are not extracted from zip files)")
            plan.append((m, target))
        written = 0
        for done, (m, target) in enumerate(plan, 1):
            if progress is not None:
                progress(done, len(plan))
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if target.is_file() and target.stat().st_size == m.file_size:
                continue  # a previous, interrupted run already wrote it
            with zf.open(m) as src:
                _write_atomic(target, src)
            written += 1
    return written


def _extract_tar(archive: Path, dest: Path, keep: Callable[[str], bool] | None,
                 progress: Callable[[int, int], None] | None) -> int:
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if keep is None or keep(m.name)]
        for m in members:
            target = _member_target(dest, m.name, archive)
            if m.issym() or m.islnk():
                base = target if m.issym() else dest / "x"
                _link_inside(dest, base, m.linkname, archive, m.name)
            elif m.isdev() or m.isfifo():
                raise UnsafeArchiveError(f"{archive}: device or FIFO member '{m.name}' refused")
        written = 0
        for done, m in enumerate(members, 1):
            if progress is not None:
                progress(done, len(members))
            target = _member_target(dest, m.name, archive)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                if target.is_file() and target.stat().st_size == m.size:
                    continue
                src = tf.extractfile(m)
                assert src is not None
                with src:
                    _write_atomic(target, src)
                written += 1
            elif m.issym() or m.islnk():
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists() or target.is_symlink():
                    target.unlink()
                if m.issym():
                    os.symlink(m.linkname, target)
                else:
                    os.link(_member_target(dest, m.linkname, archive), target)
                written += 1
    return written
