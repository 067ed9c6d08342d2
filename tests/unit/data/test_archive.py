"""evlp.data.download.archive: normal archives, malicious members (links, link chains, escaping paths, special
files, polyglots), writes that never go through a link, idempotent re-runs, and the other readers of archives
(ImageNet's tar stream, Karpathy's zip, COCO over http)."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from evlp.data.download.archive import UnsafeArchiveError, safe_extract
from evlp.errors import DataNotFoundError, EvlpError

FILES = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(256)) * 40, "c.txt": b"gamma"}
ZipMember = tuple[str, bytes, int]  # (name, data, unix mode incl. file type); mode 0 = a plain zipfile entry


def _zip(path: Path, members: dict[str, bytes] | list[ZipMember]) -> Path:
    items = [(n, d, 0) for n, d in members.items()] if isinstance(members, dict) else members
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in items:
            info = zipfile.ZipInfo(name)  # ZipInfo keeps the name exactly as given
            if mode:
                info.create_system, info.external_attr = 3, mode << 16
            zf.writestr(info, data)
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


def _zip_link(name: str, target: str) -> ZipMember:
    return name, target.encode(), stat.S_IFLNK | 0o777


def _snapshot(folder: Path) -> dict[str, object]:
    """Every path under ``folder``, links not followed: file bytes, link targets, or 'dir'."""
    out: dict[str, object] = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(base, name)
            rel = str(p.relative_to(folder))
            out[rel] = (f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes())
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in _snapshot(folder).items() if isinstance(v, bytes) and not Path(k).name.startswith(".")}


def _deep_target(tmp_path: Path, depth: int = 9) -> Path:
    """An empty target ``depth`` folders below ``tmp_path``, so that any escape lands inside ``tmp_path``."""
    target = tmp_path.joinpath(*[f"d{i}" for i in range(depth)], "out")
    target.mkdir(parents=True)
    return target


def _assert_refused(archive: Path, target: Path, sandbox: Path, member: str, match: str = "") -> None:
    """Extraction raises naming the archive and ``member``, and nothing changes in ``sandbox`` or ``target``."""
    existed = target.exists()
    before = _snapshot(sandbox)
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract(archive, target)
    message = str(info.value)
    assert str(archive) in message and repr(member) in message, message
    assert "malicious" in message and "official source" in message
    assert match in message, message
    assert _snapshot(sandbox) == before  # nothing outside the target, nothing inside it, no marker
    assert not existed or not any(target.iterdir())
    assert isinstance(info.value, EvlpError) and info.value.exit_code == 1


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(archives folder, parent folder whose only child is the extraction target ``out``)."""
    archives = tmp_path / "archives"
    archives.mkdir()
    parent = tmp_path / "parent"
    (parent / "out").mkdir(parents=True)
    return archives, parent


# ------------------------------------------------------------------------------------------------ normal archives
def test_zip_extracts(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    assert safe_extract(_zip(archives / "ok.zip", FILES), parent / "out") == len(FILES)
    assert _files(parent / "out") == FILES
    assert (parent / "out" / ".extracted-ok.zip").is_file()


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_extracts(sandbox: tuple[Path, Path], mode: str) -> None:
    archives, parent = sandbox
    members = [_link("top", "", tarfile.DIRTYPE), *FILES.items(), ("./d.txt", b"delta"), ("top/../e.txt", b"e")]
    assert safe_extract(_tar(archives / "ok.tar", members, mode), parent / "out") == len(FILES) + 2
    assert _files(parent / "out") == {**FILES, "d.txt": b"delta", "e.txt": b"e"}


def test_format_is_told_by_content_not_name(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    safe_extract(_tar(archives / "tar-really.zip", list(FILES.items())), parent / "a")
    safe_extract(_zip(archives / "zip-really.tar.gz", FILES), parent / "b")
    assert _files(parent / "a") == FILES == _files(parent / "b")


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
    (out / "top" / ".a.txt.evlp-part").write_bytes(b"half")  # and the temporary file it left
    assert safe_extract(archive, out) == len(FILES) - 1
    assert _files(out) == FILES


@pytest.mark.parametrize("linked", ["target", "ancestor"])
def test_target_that_the_user_made_a_symlink_works(tmp_path: Path, linked: str) -> None:
    archive = _tar(tmp_path / "ok.tar.gz", list(FILES.items()))
    disk = tmp_path / "other_disk"
    if linked == "target":  # ROOT/coco -> /other_disk/coco
        (disk / "coco").mkdir(parents=True)
        (tmp_path / "root").mkdir()
        (tmp_path / "root" / "coco").symlink_to(disk / "coco")
    else:  # ROOT -> /other_disk, ROOT/coco created by the extraction
        disk.mkdir()
        (tmp_path / "root").symlink_to(disk)
    assert safe_extract(archive, tmp_path / "root" / "coco") == len(FILES)
    assert _files(disk / "coco") == FILES and (disk / "coco" / ".extracted-ok.tar.gz").is_file()
    assert safe_extract(archive, tmp_path / "root" / "coco") == 0


def test_a_link_at_a_final_name_is_replaced_not_written_through(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    outside = parent / "outside.txt"
    outside.write_bytes(b"precious")
    out = parent / "out"
    (out / "c.txt").symlink_to(outside)  # e.g. left by an older evlp that extracted links
    (out / ".extracted-ok.zip").symlink_to(outside)  # a planted marker does not count
    assert safe_extract(_zip(archives / "ok.zip", FILES), out) == len(FILES)
    assert outside.read_bytes() == b"precious"
    assert not (out / "c.txt").is_symlink() and (out / "c.txt").read_bytes() == b"gamma"
    assert not (out / ".extracted-ok.zip").is_symlink() and outside.read_bytes() == b"precious"


def test_a_link_inside_the_target_is_never_written_through(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    elsewhere = parent / "elsewhere"
    elsewhere.mkdir()
    out = parent / "out"
    (out / "top").symlink_to(elsewhere)
    archive = _zip(archives / "ok.zip", FILES)
    before = _snapshot(parent)
    with pytest.raises(UnsafeArchiveError, match="top/a.txt"):
        safe_extract(archive, out)
    assert not any(elsewhere.iterdir())
    assert {k: v for k, v in _snapshot(parent).items() if k.startswith("elsewhere")} == \
        {k: v for k, v in before.items() if k.startswith("elsewhere")}
    assert not (out / ".extracted-ok.zip").exists()


# ------------------------------------------------------------------------------------------------ link chains
def _chain_tar(path: Path, n: int, payload: str) -> Path:
    links = [_link("l0", ".", tarfile.SYMTYPE)] + [_link(f"l{i}", f"l{i - 1}/..", tarfile.SYMTYPE) for i in range(1, n)]
    return _tar(path, [*links, (f"l{n - 1}/{payload}", b"pwned")])


def _chain_zip(path: Path, n: int, payload: str) -> Path:
    links = [_zip_link("l0", ".")] + [_zip_link(f"l{i}", f"l{i - 1}/..") for i in range(1, n)]
    return _zip(path, [*links, (f"l{n - 1}/{payload}", b"pwned", 0)])


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("fmt", ["tar", "zip", "tar named .zip"])
@pytest.mark.parametrize("payload", ["escape.txt", "marker"])
def test_symlink_chains_are_refused(tmp_path: Path, n: int, fmt: str, payload: str) -> None:
    name = {"tar": "evil.tar.gz", "zip": "evil.zip", "tar named .zip": "evil.zip"}[fmt]
    written = f".extracted-{name}" if payload == "marker" else payload
    archive = (_chain_zip if fmt == "zip" else _chain_tar)(tmp_path / name, n, written)
    if fmt == "tar named .zip":
        assert tarfile.is_tarfile(archive) and not zipfile.is_zipfile(archive)
    target = _deep_target(tmp_path)
    _assert_refused(archive, target, tmp_path, "l0", match="symbolic link")


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_any_link_is_refused_even_one_pointing_inside(tmp_path: Path, fmt: str) -> None:
    if fmt == "tar":
        archive = _tar(tmp_path / "in.tar", [*FILES.items(), _link("top/link.txt", "a.txt", tarfile.SYMTYPE)])
    else:
        plain = [(n, d, 0) for n, d in FILES.items()]
        archive = _zip(tmp_path / "in.zip", [*plain, _zip_link("top/link.txt", "a.txt")])
    _assert_refused(archive, _deep_target(tmp_path), tmp_path, "top/link.txt", match="symbolic link")


@pytest.mark.parametrize("target", ["top/a.txt", "/etc/passwd", "../../secret"])
def test_hardlinks_are_refused(tmp_path: Path, target: str) -> None:
    archive = _tar(tmp_path / "hard.tar", [*FILES.items(), _link("hard.txt", target, tarfile.LNKTYPE)])
    _assert_refused(archive, _deep_target(tmp_path), tmp_path, "hard.txt", match="hard link")


def test_links_are_refused_even_when_the_keep_filter_skips_them(tmp_path: Path) -> None:
    archive = _chain_tar(tmp_path / "evil.tar", 3, "x.jpg")
    target = _deep_target(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="'l0'"):
        safe_extract(archive, target, keep=lambda n: n.endswith(".jpg"))
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ escaping paths
ESCAPES = ["../evil.jpg", "../evil.txt", "../evil", "a/../../evil.jpg", "./../evil", "a/b/../../../evil.txt",
           "/abs/evil.jpg", "//abs/evil", "C:/evil.jpg", "c:evil.txt", "..\\evil.jpg", "a\\..\\..\\evil"]


@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("bad", ESCAPES)
@pytest.mark.parametrize("keep", [None, "jpg only", "nothing"])
def test_escaping_members_are_refused_whatever_their_name(tmp_path: Path, fmt: str, bad: str, keep: str | None) -> None:
    members = [("fine.jpg", b"ok"), (bad, b"pwned")]
    archive = _tar(tmp_path / "e.tar", members) if fmt == "tar" else _zip(tmp_path / "e.zip", dict(members))
    target = _deep_target(tmp_path)
    before = _snapshot(tmp_path)
    filters = {None: None, "jpg only": lambda n: n == "fine.jpg", "nothing": lambda n: False}
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract(archive, target, keep=filters[keep])
    assert repr(bad) in str(info.value) and str(archive) in str(info.value)
    assert _snapshot(tmp_path) == before
    assert not Path("/abs/evil.jpg").exists()


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_a_member_named_like_the_marker_is_refused(tmp_path: Path, fmt: str) -> None:
    name = f"m.{fmt}"
    members = [("a.txt", b"a"), (f"./.extracted-{name}", b"ok\n")]
    archive = _tar(tmp_path / name, members, "w") if fmt == "tar" else _zip(tmp_path / name, dict(members))
    _assert_refused(archive, _deep_target(tmp_path), tmp_path, f"./.extracted-{name}", match="marker")


# ------------------------------------------------------------------------------------------------ special files
@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_devices_and_fifos_are_refused(tmp_path: Path, kind: bytes) -> None:
    archive = _tar(tmp_path / "dev.tar.gz", [("a.txt", b"a"), _link("null", "", kind)])
    _assert_refused(archive, _deep_target(tmp_path), tmp_path, "null", match="FIFO")


@pytest.mark.parametrize("kind", [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK])
def test_zip_special_files_are_refused(tmp_path: Path, kind: int) -> None:
    archive = _zip(tmp_path / "dev.zip", [("a.txt", b"a", 0), ("null", b"", kind | 0o644)])
    _assert_refused(archive, _deep_target(tmp_path), tmp_path, "null", match="FIFO")


def test_a_zip_tar_polyglot_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "poly.zip", [("PK\x03\x04.txt", b"x")], "w")
    assert archive.read_bytes()[:4] == b"PK\x03\x04" and tarfile.is_tarfile(archive)
    target = _deep_target(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="polyglot"):
        safe_extract(archive, target)
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="tarfile.data_filter needs Python 3.10.12+/3.11.4+")
def test_tarfile_data_filter_is_the_second_line_of_defence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def refuse(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        seen.append(member.name)
        if member.name == "c.txt":
            raise tarfile.OutsideDestinationError(member, os.path.join(dest, member.name))
        return member

    monkeypatch.setattr(tarfile, "data_filter", refuse)
    archive = _tar(tmp_path / "ok.tar", list(FILES.items()))
    _assert_refused(archive, _deep_target(tmp_path), tmp_path, "c.txt", match="data filter")
    assert seen == list(FILES)


# ------------------------------------------------------------------------------------------------ the old list
def _evil_archives(archives: Path, parent: Path) -> dict[str, tuple[Path, str]]:
    outside = parent / "abs_evil.txt"  # an absolute path that, if written, would land beside the target
    return {
        "zip ../": (_zip(archives / "dotdot.zip", {"fine.txt": b"ok", "../evil.txt": b"pwned"}), "../evil.txt"),
        "tar absolute": (_tar(archives / "abs.tar", [("fine.txt", b"ok"), (str(outside), b"pwned")], "w"),
                         str(outside)),
        "tar outward symlink": (_tar(archives / "symlink.tar.gz", [
            ("fine.txt", b"ok"), _link("escape", "../", tarfile.SYMTYPE), ("escape/evil.txt", b"pwned")]), "escape"),
        "tar absolute symlink": (_tar(archives / "abssym.tar.gz", [
            _link("passwd", "/etc/passwd", tarfile.SYMTYPE)]), "passwd"),
    }


@pytest.mark.parametrize("kind", ["zip ../", "tar absolute", "tar outward symlink", "tar absolute symlink"])
def test_unsafe_archives_are_refused_and_write_nothing(sandbox: tuple[Path, Path], kind: str) -> None:
    archives, parent = sandbox
    archive, member = _evil_archives(archives, parent)[kind]
    _assert_refused(archive, parent / "out", parent, member)


def test_missing_or_foreign_archive(sandbox: tuple[Path, Path]) -> None:
    archives, parent = sandbox
    with pytest.raises(DataNotFoundError, match="does not exist"):
        safe_extract(archives / "nope.zip", parent / "out")
    (archives / "page.zip").write_text("<html>not an archive</html>")
    with pytest.raises(DataNotFoundError, match="neither a zip nor a tar"):
        safe_extract(archives / "page.zip", parent / "out")


# ------------------------------------------------------------------------------------------------ other readers
def _val_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    return _tar(path / "val_images.tar.gz", members)


@pytest.mark.parametrize("bad", ["chain", "hardlink", "fifo", "dotdot"])
def test_imagenet_tar_stream_refuses_links_and_escapes(tmp_path: Path, bad: str) -> None:
    from evlp.data.download.imagenet import download_imagenet

    image = "ILSVRC2012_val_00000001_n01440764.JPEG"
    members: list[tarfile.TarInfo | tuple[str, bytes]] = {
        "chain": [_link("l0", ".", tarfile.SYMTYPE), _link("l1", "l0/..", tarfile.SYMTYPE), (f"l1/{image}", b"x")],
        "hardlink": [_link(image, "/etc/passwd", tarfile.LNKTYPE)],
        "fifo": [_link(image, "", tarfile.FIFOTYPE)],
        "dotdot": [("../notes.txt", b"not an image")],  # would be skipped as not an image: refused all the same
    }[bad]
    src = tmp_path / "hf"
    src.mkdir()
    _val_tar(src, members)
    root = _deep_target(tmp_path, 3)
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="malicious"):
        download_imagenet(root, from_dir=src)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(str(root.relative_to(tmp_path)))} == \
        {k: v for k, v in before.items() if not k.startswith(str(root.relative_to(tmp_path)))}
    assert not [k for k, v in _snapshot(root).items() if v != "dir"]  # no image, no marker, no link


@pytest.mark.parametrize("bad", ["link", "other member escapes"])
def test_karpathy_zip_refuses_links_and_escapes(tmp_path: Path, bad: str) -> None:
    from evlp.data.download.karpathy_sets import extract_member

    if bad == "link":
        members = [_zip_link("dataset_coco.json", "/etc/passwd")]
    else:
        members = [("dataset_coco.json", b"{}", 0), ("../dataset_flickr30k.json", b"{}", 0)]
    archive = _zip(tmp_path / "caption_datasets.zip", members)
    dest = tmp_path / "data" / "_downloads" / "dataset_coco.json"
    with pytest.raises(UnsafeArchiveError, match="caption_datasets.zip"):
        extract_member(archive, "dataset_coco.json", dest)
    assert not (tmp_path / "data").exists() and not (tmp_path / "dataset_flickr30k.json").exists()


def test_coco_archive_over_http_with_a_link_chain_writes_nothing(tmp_path: Path, http_server) -> None:  # noqa: ANN001
    from evlp.data.download.coco import CocoSources, download_coco

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps({"images": []}))
    karpathy = http_server.put("caption_datasets.zip", buf.getvalue())
    evil = _chain_tar(tmp_path / "evil.tar.gz", 8, "escape.txt").read_bytes()  # a tar served as a .zip
    sources = CocoSources(train_zip=http_server.put("zips/train2014.zip", evil),
                          val_zip=http_server.put("zips/val2014.zip", evil), karpathy_zip=karpathy)
    root = _deep_target(tmp_path / "sandbox")
    sandbox = tmp_path / "sandbox"
    before = _snapshot(sandbox)
    with pytest.raises(UnsafeArchiveError, match="val2014.zip.*'l0'"):
        download_coco(root, sources=sources)
    after = _snapshot(sandbox)
    coco = str((root / "coco").relative_to(sandbox))
    assert {k: v for k, v in after.items() if not k.startswith(coco)} == before
    assert all(k.startswith("_downloads") for k in _snapshot(root / "coco"))  # no image folder, no marker


def test_coco_extracts_only_its_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evlp.data.download import coco

    folder = tmp_path / "data" / "coco"
    downloads = folder / "_downloads"
    downloads.mkdir(parents=True)
    for name in ("val2014", "train2014"):  # each also carries files that belong elsewhere in ROOT/coco
        _zip(downloads / f"{name}.zip", {f"{name}/{name}.jpg": b"x", f"_downloads/{name}.extracted": b"forged",
                                         "MANIFEST.json": b"{}", "train/00000.tar": b"forged"})
    monkeypatch.setattr(coco, "fetch", lambda url, folder, progress: folder / coco.archive_name(url))
    sources = coco.CocoSources(val_zip="http://x/val2014.zip", train_zip="http://x/train2014.zip")
    coco._images(sources, folder, downloads, None)
    assert (folder / "val2014" / "val2014.jpg").read_bytes() == b"x"
    assert (folder / "train2014" / "train2014.jpg").read_bytes() == b"x"
    assert not (folder / "MANIFEST.json").exists() and not (folder / "train").exists()
    assert (downloads / "val2014.extracted").read_text() == "ok\n" == (downloads / "train2014.extracted").read_text()
