"""Benchmark: ``evlp.data.download.cc.download_cc`` (img2dataset) vs a plain thread-pool downloader.

Serves N generated "full resolution" JPEGs (640x480 to 1024x768, photo-like, 70-180 KB) from a loopback
HTTP server in its own process, writes a CC3M-style TSV (caption TAB url) and measures, one after the
other:

(a) ``download_cc("cc3m", ...)``: img2dataset in a child process, shorter side resized to 256, webdataset
    shards with status parquets;
(b) the reference's kind of downloader (``download_cc3m_images.py``): urllib, ``ThreadPoolExecutor(4 x
    cpu)``, 5 s timeout, up to 3 tries, PIL decode, one full-resolution JPEG per row in a folder.

Prints one table: images, wall seconds, images/s, files and bytes on disk. Nothing leaves 127.0.0.1.

    python scripts/bench_download.py --n 2000
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZES = [(640, 480), (800, 600), (1024, 768), (768, 1024), (960, 720), (720, 540)]
UA = "datasets/2.x; python/3 (reference-style benchmark)"


def make_jpeg(seed: int) -> bytes:
    """A photo-like JPEG: smooth gradient, blurred shapes, mild sensor noise, quality 90."""
    rng = random.Random(seed)
    w, h = rng.choice(SIZES)
    base = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    tint = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    img = Image.blend(base, tint, 0.6)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(20, max(21, w // 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    noise = Image.merge("RGB", [Image.effect_noise((w, h), 60) for _ in range(3)])
    img = Image.blend(img, noise, 0.1)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _serve(folder: str, port: "mp.Value", ready: "mp.Event") -> None:
    files = {f"/{p.name}": p.read_bytes() for p in Path(folder).iterdir()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = files.get(self.path.split("?")[0])
            self.send_response(200 if body is not None else 404)
            body = body if body is not None else b"not found"
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    port.value = server.server_address[1]
    ready.set()
    server.serve_forever()


def plain_download(rows: list[tuple[str, str]], out: Path, workers: int) -> int:
    """The reference's approach: every row scheduled at once, urllib + PIL, full-resolution re-save."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)

    def fetch(item: tuple[int, str]) -> bool:
        row, url = item
        for _ in range(3):
            try:
                request = urllib.request.Request(url, headers={"User-Agent": UA})
                with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback only
                    data = response.read()
                img = Image.open(io.BytesIO(data))
                if img.width <= 1 or img.height <= 1:
                    return False
                img.save(images / f"{row}.jpg", "JPEG")
                return True
            except Exception:  # noqa: BLE001 - the reference swallows every error, as measured here
                continue
        return False

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(fetch, [(i, url) for i, (_, url) in enumerate(rows)]))


def disk(folder: Path, suffixes: tuple[str, ...]) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes)]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images (URLs) to serve")
    parser.add_argument("--distinct", type=int, default=64, help="distinct JPEGs generated (URLs reuse them)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp dir)")
    args = parser.parse_args()

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from evlp.data.download.cc import CCOptions, download_cc

    work = args.keep or Path(tempfile.mkdtemp(prefix="evlp-bench-"))
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    blobs = [make_jpeg(s) for s in range(min(args.distinct, args.n))]
    for i in range(args.n):
        (www / f"img{i:06d}.jpg").write_bytes(blobs[i % len(blobs)])
    served = sum(len(blobs[i % len(blobs)]) for i in range(args.n))

    ctx = mp.get_context("spawn")
    port, ready = ctx.Value("i", 0), ctx.Event()
    server = ctx.Process(target=_serve, args=(str(www), port, ready), daemon=True)
    server.start()
    ready.wait(30)
    base = f"http://127.0.0.1:{port.value}"
    rows = [(f"a generated photo number {i}", f"{base}/img{i:06d}.jpg") for i in range(args.n)]
    tsv = work / "Train-GCC-training.tsv"
    tsv.write_text("".join(f"{c}\t{u}\n" for c, u in rows), encoding="utf-8")

    table = []
    try:
        opts = CCOptions(image_size=256, processes=args.processes, threads=args.threads,
                         shard_size=args.shard_size, timeout=5.0, retries=2)  # 3 tries, as (b)
        t0 = time.perf_counter()
        result = download_cc("cc3m", work / "data", index=tsv, options=opts)
        wall = time.perf_counter() - t0
        files, size = disk(work / "data" / "cc3m", (".tar", ".parquet", "_stats.json"))
        stats = [json.loads(p.read_text()) for p in (work / "data" / "cc3m").glob("*_stats.json")]
        busy = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
        table.append(("evlp download_cc (img2dataset, 256px shards)", result.ok, wall, files, size,
                      result.ok / busy))
        failures = ", ".join(f"{k} {v}" for k, v in result.failed.items() if v) or "none"

        workers = 4 * (os.cpu_count() or 1)
        t0 = time.perf_counter()
        ok = plain_download(rows, work / "plain", workers)
        wall = time.perf_counter() - t0
        files, size = disk(work / "plain", (".jpg",))
        table.append((f"thread pool ({workers} threads, full-res JPEGs)", ok, wall, files, size, ok / wall))
    finally:
        server.terminate()
        server.join()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.n} URLs on 127.0.0.1, {served / 1e6:.1f} MB served per pass "
          f"({served / args.n / 1e3:.0f} KB/image), {os.cpu_count()} CPUs")
    head = (f"{'method':<48} {'ok':>6} {'wall s':>8} {'images/s':>9} {'steady/s':>9} {'files':>7} "
            f"{'MB on disk':>11}")
    print(head)
    print("-" * len(head))
    for name, ok, wall, files, size, steady in table:
        print(f"{name:<48} {ok:>6} {wall:>8.1f} {ok / wall:>9.1f} {steady:>9.1f} {files:>7} {size / 1e6:>11.1f}")
    print(f"img2dataset failures by reason: {failures}")
    print("images/s = ok / wall (start-up included); steady/s = img2dataset's first shard start to last "
          "shard end (the thread pool has no start-up: same as images/s)")


if __name__ == "__main__":
    main()
