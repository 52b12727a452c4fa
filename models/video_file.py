"""Refuse a file that is not a video before FFmpeg opens it: FFmpeg's text demuxer renders any
text file (a det.txt, a CSV given by mistake) as frames of text, so a wrong path would 'work'."""
from __future__ import annotations

from pathlib import Path

# formats with a text header that FFmpeg reads as video (raw YUV, HLS playlists, SDP, concat lists)
TEXT_MEDIA = (b"YUV4MPEG2", b"#EXTM3U", b"v=0", b"ffconcat")


def not_a_video(path: str | Path) -> str | None:
    """Why the file at ``path`` cannot be a video, or None when it may be one (FFmpeg decides)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except IsADirectoryError:
        return "is a directory, not a video file"
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not head:
        return "is empty"
    if head.startswith(TEXT_MEDIA):
        return None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is a text file (UTF-16), not a video"
    if b"\0" in head:  # every container's header holds zero bytes (box sizes, PIDs, start codes)
        return None
    try:
        head.decode("utf-8")
        return "is a text file, not a video"
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3:  # a character cut at the 4 KiB edge
            return "is a text file, not a video"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    # mostly printable ASCII: text in a legacy encoding, e.g. a cp1252 CSV (random bytes: ~37%)
    return "is a text file, not a video" if printable >= 0.8 * len(head) else None
