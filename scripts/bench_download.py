"""Benchmark: ``evlp.data.download.cc.download_cc`` vs a plain thread-pool downloader vs img2dataset itself.

Serves N generated "full resolution" JPEGs (640x480 to 1024x768, photo-like, 70-180 KB) from a loopback
HTTP server in its own process (threaded: every request is served at once, so with ``--latency-ms`` the
answer's delay, not the server, bounds the rate), writes a CC3M-style TSV (caption TAB url) and measures,
one after the other, on the same rows:

(a) ``download_cc("cc3m", ...)`` with its default processes / threads (or those passed): img2dataset in a
    watched child process, shorter side resized to 256, webdataset shards with status parquets;
(b) the reference's kind of downloader (``download_cc3m_images.py``): urllib, ``ThreadPoolExecutor(4 x
    cpu)``, 5 s timeout, up to 3 tries, PIL decode, one full-resolution JPEG per row in a folder;
(c) the ``img2dataset`` command itself with the settings (a) resolved to: the same rows (and their row
    number, which evlp stores too), image size, resize mode, shard size, timeout, tries, processes, threads.

Prints one table per N: images, wall seconds, images/s, seconds before the first shard started, files and
bytes on disk. Nothing leaves 127.0.0.1.

    python scripts/bench_download.py --n 1000 5000 --latency-ms 200
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
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


def _serve(folder: str, port: "mp.Value", ready: "mp.Event", latency: float = 0.0) -> None:
    files = {f"/{p.name}": p.read_bytes() for p in Path(folder).iterdir()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if latency:
                time.sleep(latency)  # a far-away server: one round trip of waiting per request
            body = files.get(self.path.split("?")[0])
            self.send_response(200 if body is not None else 404)
            body = body if body is not None else b"not found"
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 4096  # the listen() backlog: read in __init__, so a class attribute

    server = Server(("127.0.0.1", 0), Handler)
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


def shard_disk(folder: Path) -> tuple[int, int]:
    """Files and bytes of the shards in ``folder``: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name[:5].isdigit()
             and p.name[5:] in (".tar", ".parquet", "_stats.json")]
    return len(files), sum(p.stat().st_size for p in files)


def shard_stats(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.glob("*_stats.json")]


def run_img2dataset(tsv: Path, out: Path, knobs: dict) -> int:
    """The ``img2dataset`` command, as a user would call it, with evlp's resolved settings; returns ok rows."""
    command = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(tsv), "--input_format", "tsv",
               "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
               "--output_folder", str(out), "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
               "--save_additional_columns", '["row"]', "--enable_wandb", "False"]
    for key, value in knobs.items():
        command += [f"--{key}", str(value)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1"))
    return sum(s["successes"] for s in shard_stats(out))


def bench(n: int, args: argparse.Namespace, work: Path, blobs: list[bytes]) -> None:
    from evlp.data.download.cc import CCOptions, download_cc

    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (www / f"img{i:06d}.jpg").write_bytes(blobs[i % len(blobs)])
    served = sum(len(blobs[i % len(blobs)]) for i in range(n))

    ctx = mp.get_context("spawn")
    port, ready = ctx.Value("i", 0), ctx.Event()
    server = ctx.Process(target=_serve, args=(str(www), port, ready, args.latency_ms / 1000), daemon=True)
    server.start()
    ready.wait(30)
    base = f"http://127.0.0.1:{port.value}"
    rows = [(f"a generated photo number {i}", f"{base}/img{i:06d}.jpg") for i in range(n)]
    tsv = work / "Train-GCC-training.tsv"
    tsv.write_text("".join(f"{c}\t{u}\n" for c, u in rows), encoding="utf-8")
    headed = work / "urls.tsv"  # the same rows for the img2dataset command, which wants a header
    headed.write_text("url\tcaption\trow\n" + "".join(f"{u}\t{c}\t{i}\n" for i, (c, u) in enumerate(rows)),
                      encoding="utf-8")

    given = {k: v for k, v in (("processes", args.processes), ("threads", args.threads),
                               ("shard_size", args.shard_size)) if v is not None}
    opts = CCOptions(image_size=256, timeout=5.0, retries=2, **given)  # 3 tries, as (b)
    knobs = {"image_size": opts.image_size, "processes_count": min(opts.processes, -(-n // opts.shard_size)),
             "thread_count": opts.threads, "number_sample_per_shard": opts.shard_size, "timeout": opts.timeout,
             "retries": opts.retries}  # what download_cc hands img2dataset

    def run_evlp(out: Path) -> tuple[int, Path]:
        nonlocal failures
        result = download_cc("cc3m", out, index=tsv, options=opts)
        failures = ", ".join(f"{k} {v}" for k, v in result.failed.items() if v) or "none"
        return result.ok, out / "cc3m"

    def timed(method: str, attempt: int) -> tuple[int, float, float, int, int]:
        out = work / f"{method}{attempt}"
        t0, start = time.perf_counter(), time.time()
        if method == "evlp":
            ok, shards = run_evlp(out)
        else:
            ok, shards = run_img2dataset(headed, out, knobs), out
        wall = time.perf_counter() - t0
        first = min(s["start_time"] for s in shard_stats(shards)) - start
        return (ok, wall, first, *shard_disk(shards))

    failures = "?"
    best: dict[str, tuple] = {}
    try:
        for attempt in range(args.repeat):  # interleaved, so a busy spell of the machine hits both alike
            for method in ("evlp", "img2dataset"):
                run = timed(method, attempt)
                if method not in best or run[1] < best[method][1]:
                    best[method] = run
        workers = 4 * (os.cpu_count() or 1)
        t0 = time.perf_counter()
        ok = plain_download(rows, work / "plain", workers)
        wall = time.perf_counter() - t0
        table = [("evlp download_cc", *best["evlp"]),
                 (f"reference-style thread pool ({workers} threads)", ok, wall, 0.0, *disk(work / "plain", (".jpg",))),
                 ("img2dataset command, same settings", *best["img2dataset"])]
    finally:
        server.terminate()
        server.join()

    print(f"\n{n} URLs on 127.0.0.1, {args.latency_ms:g} ms per request, {served / 1e6:.1f} MB served per pass "
          f"({served / n / 1e3:.0f} KB/image), {os.cpu_count()} CPUs; evlp resolved: "
          + ", ".join(f"{k}={v}" for k, v in knobs.items() if k != "image_size"))
    head = (f"{'method':<46} {'ok':>6} {'wall s':>8} {'images/s':>9} {'start-up s':>10} {'files':>7} "
            f"{'bytes on disk':>14}")
    print(head)
    print("-" * len(head))
    for name, ok, wall, first, files, size in table:
        print(f"{name:<46} {ok:>6} {wall:>8.1f} {ok / wall:>9.1f} {first:>10.1f} {files:>7} {size:>14,}")
    print(f"evlp failures by reason: {failures}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000], help="images (URLs) to serve, one table each")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="milliseconds the server waits before answering each request (a far-away host)")
    parser.add_argument("--distinct", type=int, default=64, help="distinct JPEGs generated (URLs reuse them)")
    parser.add_argument("--processes", type=int, default=None, help="evlp's processes (default: its own choice)")
    parser.add_argument("--threads", type=int, default=None, help="evlp's threads per process (default: its own)")
    parser.add_argument("--shard-size", type=int, default=500,
                        help="rows per shard (small, so that even 1,000 rows keep every process busy)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of evlp and of img2dataset, interleaved; the fastest of each is shown (the thread "
                             "pool, bound by its 8 threads' waiting and not by the CPU, runs once)")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp dir)")
    args = parser.parse_args()

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    blobs = [make_jpeg(s) for s in range(min(args.distinct, max(args.n)))]
    for n in args.n:
        work = (args.keep / str(n)) if args.keep else Path(tempfile.mkdtemp(prefix="evlp-bench-"))
        try:
            bench(n, args, work, blobs)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    print(f"images/s = ok / wall, start-up included (evlp, img2dataset: fastest of {args.repeat}); start-up s = until the first shard started (the thread pool "
          "has none); bytes on disk: shards + status parquets + stats (evlp, img2dataset; evlp also keeps its normalised index in "
          "_index/), JPEGs (thread pool)")


if __name__ == "__main__":
    main()
