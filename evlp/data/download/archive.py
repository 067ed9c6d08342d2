"""Safe extraction of dataset archives (zip and tar): nothing is ever written outside the target folder.

Dataset archives (COCO, Flickr30K, ImageNet, Karpathy's splits) hold only folders and regular files, so an
archive is refused with :class:`UnsafeArchiveError` as a whole — every member is checked before anything is
written, and before any ``keep=`` filter is applied — when any member is:

* a symbolic or hard link (tar), or a zip entry whose Unix mode says symbolic link. Links are never created,
  which also defeats chains such as ``l0 -> .``, ``l1 -> l0/..``, ``l2 -> l1/..`` that each look harmless
  against the folder as it was before extraction;
* a device, FIFO or other special file;
* a path that leaves the target: absolute, a drive letter, a backslash, a NUL, or ``..`` that climbs above
  the target once the path is normalised (``a/../b`` is ``b`` and allowed); or the completion marker's name.

Tar members also pass the standard library's ``tarfile.data_filter`` (Python 3.11.4+ / 3.10.12+; skipped
where it is missing) as a second line of defence. Writes never go through a link: each folder on the way is
created and checked not to be one, the real path of a file's folder must lie inside the real path of the
target (so a target that is itself a symlink, or lies under one, works), and each file is written under a
temporary name opened with ``O_EXCL | O_NOFOLLOW`` and renamed with ``os.replace`` (which replaces a link at
the final name instead of following it). The completion marker ``.extracted-<archive name>`` is written the
same way; a re-run skips a finished archive and an interrupted one resumes, skipping files of full size.

Format rule (by content, never by the file name): a file that starts with a zip header (``PK\\3\\4``, or
``PK\\5\\6`` for an empty zip) is a zip; any other file that ``tarfile`` reads (plain, gzip, bzip2, xz) is a
tar. A file that starts with a zip header *and* reads as a tar is a polyglot and is refused: different tools
would see different members in it. A tar with a zip appended is read as the tar its first bytes say it is, so
the members that are checked are always the members that are written.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Union

from evlp.errors import DataNotFoundError, EvlpError
from evlp.io import write_atomic as io_write_atomic

__all__ = ["UnsafeArchiveError", "archive_format", "check_tar_member", "check_zip_member", "is_complete",
           "member_parts", "safe_extract", "write_atomic", "write_member", "write_text_atomic"]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_DRIVE = re.compile(r"^[A-Za-z]:")
_MARKER_PREFIX = ".extracted-"
_DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error)

StrPath = Union[str, "os.PathLike[str]"]


class UnsafeArchiveError(EvlpError):
    """An archive holds a link, a special file or a member that would land outside the target (exit code 1)."""


def _unsafe(archive: StrPath, name: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: member {name!r} {why}; refusing the whole archive, nothing was "
                              "extracted from it (it may be malicious) — delete it and download it again from "
                              "the official source")


def member_parts(name: str, archive: StrPath) -> tuple[str, ...]:
    """The normalised path components of member ``name`` below the target (``()`` is the target itself).

    Raises:
        UnsafeArchiveError: the name is empty, holds a NUL or a backslash, is absolute or has a drive letter,
            or climbs above the target with ``..``.
    """
    if not name or "\x00" in name:
        raise _unsafe(archive, name, "has an empty name or one with a NUL character")
    if "\\" in name:
        raise _unsafe(archive, name, "has a backslash in its path (a Windows path that may leave the target)")
    if name.startswith("/") or _DRIVE.match(name):
        raise _unsafe(archive, name, "has an absolute path (it would be written outside the target)")
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if not parts:
                raise _unsafe(archive, name, "climbs out of the target with '..'")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return tuple(parts)


def _check_parts(parts: tuple[str, ...], is_dir: bool, name: str, archive: StrPath) -> tuple[str, ...]:
    if not parts and not is_dir:
        raise _unsafe(archive, name, "is a file whose path is the target folder itself")
    if len(parts) == 1 and parts[0].startswith(_MARKER_PREFIX):
        raise _unsafe(archive, name, "has the name of evlp's completion marker")
    return parts


def check_tar_member(member: tarfile.TarInfo, archive: StrPath, dest: StrPath) -> tuple[str, ...]:
    """Refuse a tar member that is not a plain file or folder inside ``dest``; its normalised components.

    Raises:
        UnsafeArchiveError: a link, device, FIFO or special file, a path leaving ``dest``, or a member that
            ``tarfile.data_filter`` rejects.
    """
    parts = member_parts(member.name, archive)
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise _unsafe(archive, member.name, f"is a {kind} link to {member.linkname!r} (dataset archives hold "
                                            "no links)")
    if not (member.isfile() or member.isdir()):
        raise _unsafe(archive, member.name, "is a device, FIFO or other special file")
    if hasattr(tarfile, "data_filter"):
        try:
            tarfile.data_filter(member, os.path.realpath(dest))
        except tarfile.FilterError as exc:
            raise _unsafe(archive, member.name, f"is rejected by tarfile's data filter ({exc})") from None
    return _check_parts(parts, member.isdir(), member.name, archive)


def check_zip_member(info: zipfile.ZipInfo, archive: StrPath) -> tuple[str, ...]:
    """Refuse a zip entry that is a symbolic link, a special file or a path leaving the target; its components.

    Raises:
        UnsafeArchiveError: as for :func:`check_tar_member` (the file type is in ``external_attr``'s high bits).
    """
    parts = member_parts(info.filename, archive)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise _unsafe(archive, info.filename, "is a symbolic link (dataset archives hold no links)")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _unsafe(archive, info.filename, "is a device, FIFO or other special file")
    return _check_parts(parts, info.is_dir(), info.filename, archive)


def archive_format(archive: StrPath) -> str:
    """``"zip"`` or ``"tar"``, by content (see the module docstring for the rule).

    Raises:
        UnsafeArchiveError: the file is both a zip (by its first bytes) and a readable tar.
        DataNotFoundError: it is neither.
    """
    with open(archive, "rb") as fh:
        head = fh.read(4)
    is_tar = tarfile.is_tarfile(archive)
    if head in _ZIP_MAGIC:
        if is_tar:
            raise UnsafeArchiveError(f"{archive} reads both as a zip and as a tar archive (a polyglot); refusing "
                                     "it (it may be malicious) — delete it and download it again from the "
                                     "official source")
        return "zip"
    if is_tar:
        return "tar"
    raise DataNotFoundError(f"{archive} is neither a zip nor a tar archive (is the download complete?) — "
                            "delete it and download it again")


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def _folder(root: str, parts: Iterable[str], archive: StrPath, name: str) -> str:
    """Create ``root/parts...`` one folder at a time, refusing any link on the way; its path."""
    path = root
    for part in parts:
        path = os.path.join(path, part)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        if os.path.islink(path) or not os.path.isdir(path):
            raise UnsafeArchiveError(f"{archive}: member {name!r} would be written through {path}, which is a "
                                     "link or not a folder; evlp never writes through links inside the target "
                                     "— remove it (or point the target itself at the other disk) and run again")
    if not _inside(os.path.realpath(path), root):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would land in {os.path.realpath(path)}, outside "
                                 f"{root}; refusing (the target may hold a link) — remove it and run again")
    return path


def write_atomic(path: StrPath, src: IO[bytes] | bytes) -> None:
    """Write ``src`` (a binary file object or bytes) to ``path`` via a temporary name and ``os.replace``.

    :func:`evlp.io.write_atomic` with a fixed temporary name, ``.<name>.evlp-part``, so that the leftover of
    an interrupted extraction is removed when the file is written again. The temporary file is created
    exclusively without following links, and the rename replaces a link at ``path`` instead of writing
    through it.
    """
    name = os.path.basename(os.fspath(path))
    io_write_atomic(path, src, temp_name=f".{name[:200]}.evlp-part")


def write_text_atomic(path: StrPath, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, never through a link (see :func:`write_atomic`)."""
    write_atomic(path, text.encode("utf-8"))


def write_member(root: StrPath, parts: tuple[str, ...], src: IO[bytes], archive: StrPath) -> Path:
    """Write ``src`` to ``root/parts...`` atomically, creating folders; refuse any link inside ``root``.

    ``root`` should be a real path (``os.path.realpath`` of the target); what lies above it is not checked.

    Raises:
        UnsafeArchiveError: a folder on the way is a link (or not a folder), or resolves outside ``root``.
    """
    root = os.fspath(root)
    folder = _folder(root, parts[:-1], archive, "/".join(parts))
    write_atomic(os.path.join(folder, parts[-1]), src)
    return Path(folder, parts[-1])


def is_complete(path: StrPath, size: int) -> bool:
    """Whether ``path`` is a regular file (not a link) of ``size`` bytes: written by an earlier run."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _marker(root: str, archive: Path) -> str:
    return os.path.join(root, f"{_MARKER_PREFIX}{archive.name}")


def safe_extract(archive: StrPath, dest: StrPath, *, keep: Callable[[str], bool] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Extract a zip or a (compressed) tar archive into ``dest``, safely and resumably.

    Every member is checked first (links, special files, paths leaving ``dest``; see the module docstring);
    one unsafe member refuses the whole archive before anything is written or ``dest`` is created.

    Args:
        archive: the archive file; its format is told by its content, not its name.
        dest: target folder (created). It may be, or lie under, a symbolic link.
        keep: optional filter on member names, applied after the checks; members it rejects are skipped.
        progress: called with (members done, members in total) as files are written.

    Returns:
        The number of files written (0 when a previous extraction completed).

    Raises:
        UnsafeArchiveError: an unsafe member (the message names it), a polyglot, or a link inside ``dest``.
        DataNotFoundError: the archive is missing, damaged, or not a zip/tar.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataNotFoundError(f"archive {archive} does not exist — download it again")
    root = os.path.realpath(dest)
    marker = _marker(root, archive)
    if os.path.isfile(marker) and not os.path.islink(marker):
        return 0
    kind = archive_format(archive)
    try:
        if kind == "zip":
            written = _extract_zip(archive, root, keep, progress)
        else:
            written = _extract_tar(archive, root, keep, progress)
    except _DAMAGED as exc:
        raise DataNotFoundError(f"{archive} is damaged or incomplete ({exc}) — delete it and download it "
                                "again") from None
    write_text_atomic(marker, "ok\n")
    return written


def _write_plan(plan: list, root: str, archive: Path, open_member: Callable, size: Callable,
                progress: Callable[[int, int], None] | None) -> int:
    """Create ``root`` and write the checked members of ``plan`` ((member, parts, is_dir) triples)."""
    os.makedirs(root, exist_ok=True)
    written = 0
    for done, (member, parts, is_dir) in enumerate(plan, 1):
        if progress is not None:
            progress(done, len(plan))
        if is_dir:
            _folder(root, parts, archive, "/".join(parts))
            continue
        if is_complete(os.path.join(root, *parts), size(member)):
            continue  # a previous, interrupted run already wrote it
        with open_member(member) as src:
            write_member(root, parts, src, archive)
        written += 1
    return written


def _extract_zip(archive: Path, root: str, keep: Callable[[str], bool] | None,
                 progress: Callable[[int, int], None] | None) -> int:
    with zipfile.ZipFile(archive) as zf:
        checked = [(m, check_zip_member(m, archive), m.is_dir()) for m in zf.infolist()]
        plan = [c for c in checked if keep is None or keep(c[0].filename)]
        return _write_plan(plan, root, archive, zf.open, lambda m: m.file_size, progress)


def _extract_tar(archive: Path, root: str, keep: Callable[[str], bool] | None,
                 progress: Callable[[int, int], None] | None) -> int:
    with tarfile.open(archive) as tf:
        checked = [(m, check_tar_member(m, archive, root), m.isdir()) for m in tf.getmembers()]
        plan = [c for c in checked if keep is None or keep(c[0].name)]
        return _write_plan(plan, root, archive, tf.extractfile, lambda m: m.size, progress)
