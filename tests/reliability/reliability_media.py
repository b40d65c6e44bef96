"""Bad image and video files for the reliability tests (imported by the test modules)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (what a decompression bomb looks like to PIL)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def write_bad_media(folder: Path) -> None:
    """Every kind of image and video file a user can hand us, good and bad, under fixed names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (10, 20, 30)).save(folder / "ok.jpg")
    Image.new("CMYK", (64, 48), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(folder / "gray16.png")
    palette = Image.new("P", (64, 48))
    palette.putpalette([0, 0, 0, 255, 0, 0] * 128)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("RGBA", (64, 48), (1, 2, 3, 0)).save(folder / "rgba.png")
    rotated = Image.new("RGB", (64, 48))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    rotated.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    (folder / "zero.jpg").write_bytes(b"")
    good = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "not_an_image.jpg").write_bytes(b"<html>404 Not Found</html>" * 10)
    (folder / "bomb.png").write_bytes(png_claiming(40_000, 40_000))  # above twice PIL's limit: PIL raises
    (folder / "big.png").write_bytes(png_claiming(12_000, 9_000))  # between 1x and 2x: PIL only warns
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "garbage.mp4").write_bytes(bytes(range(256)) * 4)
    os.symlink("/etc/hostname", folder / "escape_link.jpg")
