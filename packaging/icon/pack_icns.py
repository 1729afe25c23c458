#!/usr/bin/env python3
"""Packs FineTune's PNG renderings into a macOS .icns (Python's standard library only).

An .icns is a big-endian container: the magic "icns" and the file length, a table of contents,
then one (type, length, PNG bytes) entry per size. macOS 10.7+ reads PNG data in every type used
here. The PNG bytes are copied as they are, so the 1024 px entry (ic10) is the master byte for byte
(tests/packaging.rs checks that).

    python3 packaging/icon/pack_icns.py [ICON_DIR] [OUT.icns]
    # defaults: assets/icon (finetune-<size>.png) -> assets/icon/FineTune.icns

On a Mac, `iconutil -c iconset FineTune.icns` reads the result back (the macOS workflow does).
"""

import struct
import sys
from pathlib import Path

# (type, pixel size): the 1x and 2x slots of the 16, 32, 128, 256 and 512 point icons.
ENTRIES = [
    (b"icp4", 16),
    (b"icp5", 32),
    (b"ic11", 32),  # 16 pt @2x
    (b"ic12", 64),  # 32 pt @2x
    (b"ic07", 128),
    (b"ic13", 256),  # 128 pt @2x
    (b"ic08", 256),
    (b"ic14", 512),  # 256 pt @2x
    (b"ic09", 512),
    (b"ic10", 1024),  # 512 pt @2x
]


def png_size(data, path):
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        sys.exit(f"not a PNG file: {path}")
    return struct.unpack(">II", data[16:24])


def main():
    root = Path(__file__).resolve().parents[2]
    icon_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "assets" / "icon"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else icon_dir / "FineTune.icns"

    chunks = []
    for kind, size in ENTRIES:
        path = icon_dir / f"finetune-{size}.png"
        if not path.is_file():
            sys.exit(f"missing {size}x{size} rendering (run packaging/icon/make_icon.py first): {path}")
        data = path.read_bytes()
        if png_size(data, path) != (size, size):
            sys.exit(f"expected {size}x{size} pixels, found {png_size(data, path)}: {path}")
        chunks.append(kind + struct.pack(">I", 8 + len(data)) + data)

    toc = b"TOC " + struct.pack(">I", 8 + 8 * len(ENTRIES))
    toc += b"".join(c[:8] for c in chunks)
    body = toc + b"".join(chunks)
    out.write_bytes(b"icns" + struct.pack(">I", 8 + len(body)) + body)
    print(f"wrote {out} ({8 + len(body)} bytes, {len(ENTRIES)} images)")


if __name__ == "__main__":
    main()
