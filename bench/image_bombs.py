"""Peak memory (RSS) of decoding hostile images: decompression bombs and the largest images edgeface accepts.

Each image is decoded in a fresh process (`edgeface.vision.images.decode_image`, the path every camera folder, enroll
and identify image takes); the table gives that process's peak RSS (ru_maxrss, imports included) and what the
decoder said. `--before` also runs the old path (OpenCV imported before edgeface, so its pixel cap is its
default 2^30, then cv2.imdecode(IMREAD_UNCHANGED) and the size check after decoding) for comparison, under an
address-space cap of 6 GiB so a bomb cannot take the machine down.

    python bench/image_bombs.py [--before]     # prints a table, writes bench/results/image_bombs.json

Target (the image-decoding hardening): every hostile image (bomb) refused, under 300 MB peak RSS. The largest images edgeface
accepts (49 MP JPEG/PNG, 16 MP TIFF) are reported too: edgeface decodes them at half size (a bare full-size
cv2.imdecode peaks ~325 MB); OpenCV cannot decode a TIFF at half size, so a TIFF over 16 MP is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from edgeface.testing import jpeg_header_bomb, tiff_image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "image_bombs.json"

_CHILD = r"""
import json, os, resource, sys, time
mode, path = sys.argv[1], sys.argv[2]
if mode == "before":
    import cv2  # first: OpenCV's cap stays at its default
    import numpy as np
    from edgeface.vision.images import to_rgb
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
else:
    from edgeface.vision.images import decode_image
from edgeface.errors import ImageError
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = open(path, "rb").read()
t = time.perf_counter()
try:
    if mode == "before":
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ImageError("cannot decode")
        img = to_rgb(img, name=path, bgr=True)
    else:
        img = decode_image(data, name=path)
    result = f"decoded {img.shape[1]}x{img.shape[0]}"
except ImageError as exc:
    result = "refused: " + str(exc).replace(path, "<file>")
except Exception as exc:
    result = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:120]}"
ms = (time.perf_counter() - t) * 1000
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_rss_mb": round(base / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
                  "ms": round(ms, 1), "result": result}))
"""


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(w: int, h: int, *, color_type: int = 0, bit_depth: int = 8) -> bytes:
    """A complete, valid PNG of w x h black pixels, compressed row by row (never held decoded in memory)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\0" * (1 + w * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(h)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")



def jpeg_real(w: int, h: int) -> bytes:
    import cv2
    import numpy as np

    ok, enc = cv2.imencode(".jpg", np.zeros((h, w, 3), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return enc.tobytes()


CASES = [  # name, maker, hostile (must be refused)
    ("PNG bomb 30000x30000 grey (complete)", lambda: png_bomb(30000, 30000), True),
    ("PNG bomb 20000x20000 RGB (complete)", lambda: png_bomb(20000, 20000, color_type=2), True),
    ("PNG bomb 12000x12000 RGBA 16-bit (complete)", lambda: png_bomb(12000, 12000, color_type=6, bit_depth=16), True),
    ("JPEG bomb 20000x20000 (SOF says so)", lambda: jpeg_header_bomb(20000, 20000), True),
    ("JPEG bomb 65000x65000 (SOF says so)", lambda: jpeg_header_bomb(65000, 65000), True),
    ("TIFF bomb 20000x20000, size tags twice (100x100 after)",
     lambda: tiff_image(20000, 20000, hidden_by=(100, 100), truncated=True), True),
    ("largest accepted: PNG 7000x7000 RGB", lambda: png_bomb(7000, 7000, color_type=2), False),
    ("largest accepted: PNG 7000x7000 grey", lambda: png_bomb(7000, 7000), False),
    ("largest accepted: PNG 7000x7000 RGBA 16-bit", lambda: png_bomb(7000, 7000, color_type=6, bit_depth=16), False),
    ("largest accepted: JPEG 7000x7000", lambda: jpeg_real(7000, 7000), False),
    ("largest accepted: TIFF 4000x4000 grey (deflate)", lambda: tiff_image(4000, 4000), False),
    ("largest accepted: TIFF 4000x4000 RGB (deflate)", lambda: tiff_image(4000, 4000, channels=3), False),
    ("TIFF 7000x7000 RGB (over the 16 MP TIFF limit)", lambda: tiff_image(7000, 7000, channels=3), False),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", action="store_true", help="also measure the old decode path (uses GBs of RAM)")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    env["PYTHONPATH"] = str(REPO)
    modes = ["after", "before"] if args.before else ["after"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, hostile in CASES:
            path = Path(tmp) / "image"
            data = make()
            path.write_bytes(data)
            row = {"case": name, "file_bytes": len(data), "hostile": hostile}
            for mode in modes:
                done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(path)], env=env, capture_output=True,
                                      text=True, timeout=600)
                try:
                    row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    row[mode] = {"peak_rss_mb": None, "ms": None, "result": f"crashed rc={done.returncode}: "
                                 f"{done.stderr.strip().splitlines()[-1:] or ''}"}
            rows.append(row)
            b = row.get("before", {})
            print(f"{name:<46} {len(data) / 1e6:>7.2f} MB  after {row['after']['peak_rss_mb']:>7} MB  "
                  + (f"before {b.get('peak_rss_mb')!s:>7} MB  " if b else "") + row["after"]["result"][:70],
                  flush=True)
    worst = max(r["after"]["peak_rss_mb"] or 0 for r in rows if r["hostile"])
    accepted = max(r["after"]["peak_rss_mb"] or 0 for r in rows if not r["hostile"])
    ok = all(r["after"]["result"].startswith("refused") for r in rows if r["hostile"])
    print(f"\nhostile images: worst peak RSS {worst} MB (target < 300 MB); every one refused: {ok}")
    print(f"largest accepted images (49 MP JPEG/PNG, just under the 50 MP limit; 16 MP TIFF): peak RSS {accepted} MB "
          "(decoded at half size; a bare full-size cv2.imdecode holds two full-size buffers, ~41 MB + 5.8 bytes per "
          "pixel; OpenCV decodes a TIFF at full size whatever the flags: 370 MB at 49 MP, so TIFF stops at 16 MP)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "target_peak_rss_mb": 300, "worst_hostile_peak_rss_mb": worst,
                                   "worst_accepted_peak_rss_mb": accepted, "all_hostile_refused": ok,
                                   "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0 if ok and worst < 300 else 1


if __name__ == "__main__":
    raise SystemExit(main())
