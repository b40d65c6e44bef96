"""Video frames for the ``video`` sample kind: PyAV decoding (files, GIFs) or a folder of frame images.

Frames are chosen by uniform-segment sampling as in the reference: the clip is cut into ``n`` equal segments and one
frame is taken from each, a random one in training (``rand``) or the middle one in evaluation (``middle``).
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from internvl_tune.data.images import load_image
from internvl_tune.errors import MediaError

_FRAME_NUMBER = re.compile(r"_(\d+)\.jpg$")


def frame_indices(num_frames: int, vlen: int, sample: str, rng: np.random.Generator | None = None) -> list[int]:
    """Indices of ``min(num_frames, vlen)`` frames out of ``vlen``, one per equal segment.

    Args:
        num_frames: frames wanted.
        vlen: frames in the clip.
        sample: ``rand`` (a uniformly random frame inside each segment; needs ``rng``) or ``middle``.
        rng: random generator for ``rand``.
    """
    if vlen <= 0:
        return []
    n = max(1, min(num_frames, vlen))
    # Integer segment edges; every segment holds at least one frame because n <= vlen.
    edges = np.linspace(0, vlen, n + 1).astype(int)
    starts, ends = edges[:-1], edges[1:]
    if sample == "rand":
        if rng is None:
            raise ValueError("sample='rand' needs an rng")
        return [int(rng.integers(s, e)) for s, e in zip(starts, ends)]
    if sample == "middle":
        return [int((s + e - 1) // 2) for s, e in zip(starts, ends)]
    raise ValueError(f"unknown frame sampling {sample!r} (use 'rand' or 'middle')")


def _folder_frames(path: str) -> list[str]:
    """Frame files of a folder, ordered by the number in ``name_<n>.jpg`` (others first, by name), as the reference."""
    names = sorted(os.listdir(path))

    def number(name: str) -> int:
        m = _FRAME_NUMBER.search(name)
        return int(m.group(1)) if m else -1

    return [os.path.join(path, n) for n in sorted(names, key=number)]


def load_video_frames(
    path: str,
    num_frames: int,
    sample: str = "middle",
    rng: np.random.Generator | None = None,
    clip: tuple[float, float] | None = None,
    where: str | None = None,
) -> tuple[list[Image.Image], list[int]]:
    """Decode up to ``num_frames`` RGB frames of ``path`` (a video file, a GIF or a folder of frame images).

    Args:
        path: the video.
        num_frames: frames wanted; a shorter clip gives all of its frames.
        sample: ``rand`` or ``middle`` (see :func:`frame_indices`).
        rng: random generator for ``rand``.
        clip: optional ``(start_s, end_s)`` window in seconds (the JSONL ``clip`` field).
        where: ``file:line`` for error messages.

    Returns:
        The frames and their indices in the file.
    """
    if os.path.isdir(path):
        files = _folder_frames(path)
        idx = frame_indices(num_frames, len(files), sample, rng)
        if not idx:
            raise MediaError(f"video folder {path} holds no frames", where, "put the frame images (name_<n>.jpg) in it")
        return [load_image(files[i], where) for i in idx], idx

    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            vlen = int(stream.frames)
            fps = float(stream.average_rate or stream.guessed_rate or 1)
            decode = (f.to_image() for f in container.decode(stream))
            if vlen and clip is None:
                # The header knows the length: decode only up to the last frame we need.
                idx = frame_indices(num_frames, vlen, sample, rng)
                decoded = [f for _, f in zip(range(idx[-1] + 1), decode)]
                if len(decoded) <= idx[-1]:  # the header over-counted: sample from the frames that exist
                    idx = frame_indices(num_frames, len(decoded), sample, rng)
                frames = [decoded[i].convert("RGB") for i in idx]
            else:
                decoded = list(decode)
                offset = 0
                if clip is not None:
                    offset = int(clip[0] * fps)
                    decoded = decoded[offset : offset + int((clip[1] - clip[0]) * fps)]
                idx = frame_indices(num_frames, len(decoded), sample, rng)
                frames = [decoded[i].convert("RGB") for i in idx]
                idx = [i + offset for i in idx]
    except FileNotFoundError:
        raise MediaError(f"video not found: {path}", where, "check the path and that the file is there") from None
    except PermissionError:
        raise MediaError(f"video {path} is not readable (permission denied)", where,
                         "give the training user read access") from None
    except IndexError:  # streams.video[0]: a file with audio or subtitles only
        raise MediaError(f"video {path} has no video stream", where, "re-encode it or drop the sample") from None
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot decode video {path}: {_reason(path, exc)}", where,
                         "re-encode it (e.g. H.264 MP4) or drop the sample") from None
    if not frames:
        raise MediaError(f"video {path} has no decodable frames", where, "re-encode it or drop the sample")
    return frames, idx


def _reason(path: str, exc: Exception) -> str:
    """What went wrong, in words: FFmpeg's own message without its errno (``[Errno 1094995529] ...``)."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass
    return getattr(exc, "strerror", None) or str(exc)
