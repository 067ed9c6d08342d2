"""evlp.data.download.archive.safe_extract: normal archives, malicious members, idempotent re-runs."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from evlp.data.download.archive import UnsafeArchiveError, safe_extract
from evlp.errors import DataNotFoundError

FILES = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(256)) * 40, "c.txt": b"gamma"}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps the name exactly as given
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (files with their bytes, folders and links as None)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def _files(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in _tree(folder).items() if v is not None and not Path(k).name.startswith(".")}


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(archives folder, parent folder whose only child is the extraction target ``out``)."""
    archives = tmp_path / "archives"
    archives.mkdir()
    parent = tmp_path / "parent"
    (parent / "out").mkdir(parents=True)
    return archives, parent


def test_zip_extracts(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    assert safe_extract(_zip(archives / "ok.zip", FILES), parent / "out") == len(FILES)
    assert _files(parent / "out") == FILES


def test_tar_gz_extracts_with_inner_links(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    members = [*FILES.items(), _link("top/link.txt", "a.txt", tarfile.SYMTYPE),
               _link("top/hard.txt", "top/a.txt", tarfile.LNKTYPE)]
    assert safe_extract(_tar(archives / "ok.tar.gz", members), parent / "out") == len(FILES) + 2
    out = parent / "out"
    assert {k: v for k, v in _files(out).items() if "link" not in k and "hard" not in k} == FILES
    assert os.readlink(out / "top" / "link.txt") == "a.txt"
    assert (out / "top" / "hard.txt").read_bytes() == b"alpha"


def test_keep_filter(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    safe_extract(_zip(archives / "ok.zip", FILES), parent / "out", keep=lambda n: n.endswith(".txt"))
    assert set(_files(parent / "out")) == {"top/a.txt", "c.txt"}


def test_rerun_after_completion_writes_nothing(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    for archive in (_zip(archives / "ok.zip", FILES), _tar(archives / "ok.tar.gz", list(FILES.items()))):
        out = parent / archive.name
        safe_extract(archive, out)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        assert safe_extract(archive, out) == 0
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_interrupted_extraction_skips_finished_files(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    archive = _zip(archives / "ok.zip", FILES)
    out = parent / "out"
    (out / "top").mkdir()
    (out / "top" / "a.txt").write_bytes(b"alpha")  # as if a previous run stopped after this file
    assert safe_extract(archive, out) == len(FILES) - 1
    assert _files(out) == FILES


def _evil_archives(archives: Path, parent: Path) -> dict[str, Path]:
    outside = parent / "abs_evil.txt"  # an absolute path that, if written, would land beside the target
    return {
        "zip ../": _zip(archives / "dotdot.zip", {"fine.txt": b"ok", "../evil.txt": b"pwned"}),
        "zip nested ../": _zip(archives / "nested.zip", {"a/../../evil.txt": b"pwned"}),
        "tar absolute": _tar(archives / "abs.tar", [("fine.txt", b"ok"), (str(outside), b"pwned")], "w"),
        "tar ../": _tar(archives / "dotdot.tar.gz", [("fine.txt", b"ok"), ("../evil.txt", b"pwned")]),
        "tar outward symlink": _tar(archives / "symlink.tar.gz", [
            ("fine.txt", b"ok"), _link("escape", "../", tarfile.SYMTYPE), ("escape/evil.txt", b"pwned")]),
        "tar absolute symlink": _tar(archives / "abssym.tar.gz", [
            _link("passwd", "/etc/passwd", tarfile.SYMTYPE)]),
        "tar hardlink /etc/passwd": _tar(archives / "hard.tar.gz", [
            ("fine.txt", b"ok"), _link("passwd", "/etc/passwd", tarfile.LNKTYPE)]),
        "tar hardlink ../": _tar(archives / "hard2.tar.gz", [
            ("fine.txt", b"ok"), _link("up", "../../secret", tarfile.LNKTYPE)]),
        "tar device": _tar(archives / "dev.tar.gz", [_link("null", "", tarfile.CHRTYPE)]),
    }


@pytest.mark.parametrize("kind", ["zip ../", "zip nested ../", "tar absolute", "tar ../", "tar outward symlink",
                                  "tar absolute symlink", "tar hardlink /etc/passwd", "tar hardlink ../",
                                  "tar device"])
def test_unsafe_archives_are_refused_and_write_nothing(sandbox: tuple[Path, Path], kind: str) -> None:
    archives, parent = sandbox
    archive = _evil_archives(archives, parent)[kind]
    before = _tree(parent)
    with pytest.raises(UnsafeArchiveError, match=archive.name):
        safe_extract(archive, parent / "out")
    assert _tree(parent) == before  # nothing beside the target, nothing inside it, no marker
    assert not any((parent / "out").iterdir())


def test_missing_or_foreign_archive(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    with pytest.raises(DataNotFoundError, match="does not exist"):
        safe_extract(archives / "nope.zip", parent / "out")
    (archives / "page.zip").write_text("<html>not an archive</html>")
    with pytest.raises(DataNotFoundError, match="neither a zip nor a tar"):
        safe_extract(archives / "page.zip", parent / "out")
