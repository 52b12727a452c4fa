"""Camera ingest: one reader thread per camera feeding a latest-frame slot.

A slot holds one frame; a frame not taken before the next one arrives is
dropped and counted (the detector always sees the newest image, latency stays
bounded). Readers reconnect with exponential backoff and treat "no frame for
``stall_timeout_s``" as a stall (FFmpeg's read timeout makes a hung stream
return), then reconnect.
"""
from __future__ import annotations

import enum
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import cv2

from dishtrack.config import CameraConfig
from dishtrack.models.video_file import not_a_video
from dishtrack.tracking.types import Frame

log = logging.getLogger(__name__)


class SourceState(str, enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STALLED = "stalled"
    RECONNECTING = "reconnecting"
    ENDED = "ended"  # a file source without loop reached its end
    ERROR = "error"  # a file source that cannot be opened (missing, not a file, undecodable): no retry
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class CameraStatus:
    camera_id: str
    source: str
    state: SourceState
    frames_read: int
    frames_dropped: int
    reconnects: int
    stalls: int
    last_frame_at: float | None
    fps_nominal: float | None
    last_error: str | None

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["state"] = self.state.value
        d["source"] = redact(self.source)
        return d


# query parameters some cameras take credentials in (…?user=admin&password=…)
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:password|passwd|pass|pwd|pw|token|secret|key|auth|sig)=)[^&;#]*")


def redact(url: str) -> str:
    """Hide credentials in a source URL, whatever characters the password holds.

    Operators paste passwords unencoded (``rtsp://admin:p@ss/w0rd@10.0.0.5/s``), so
    the userinfo is taken up to the *last* ``@`` (a host cannot contain one) rather
    than ending at the first ``/``; it is replaced whole (``***@host``). Secret-looking
    query parameters are masked too. Over-masking a path that contains ``@`` is
    accepted: a leaked password is not."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    at = rest.rfind("@")
    if at >= 0:
        rest = "***@" + rest[at + 1:]
    return f"{scheme}://" + _SECRET_QUERY.sub(r"\1***", rest)


class LatestFrameSlot:
    """Single-frame mailbox: ``put`` replaces, ``take`` empties."""

    def __init__(self, notify: threading.Event | None = None) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self.dropped = 0
        self._notify = notify  # shared by all cameras' slots: the detector stage wakes on any new frame

    def put(self, frame: Frame, wait: threading.Event | None = None) -> None:
        """Replace the held frame (counted as dropped). With ``wait`` (an event
        that aborts the wait when set), block until the held frame was taken
        instead: back-pressure for offline files, where every frame counts."""
        with self._cond:
            while wait is not None and self._frame is not None and not wait.is_set():
                self._cond.wait(0.1)
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()
        if self._notify is not None:
            self._notify.set()

    def take(self) -> Frame | None:
        with self._cond:
            f, self._frame = self._frame, None
            self._cond.notify_all()
            return f

    def wait(self, timeout: float) -> bool:
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout)
            return self._frame is not None


class StreamClock:
    """Capture time of live-stream frames from their presentation timestamps.

    Stamping a frame with the wall clock when it is read makes frames that sat in a
    buffer (a camera that hung and then bursts, a reader that fell behind) look fresh,
    so frame age understates. Here ``origin + pts`` is used, with ``origin`` the lowest
    ``read time - pts`` seen (the least-delayed frame is the best estimate of the
    camera's clock against ours): a frame that arrives late is stamped when it was
    captured. The origin may rise ``drift`` s per s (a camera clock running slower than
    ours must not make every frame look older and older); a PTS that goes backwards for
    a few frames in a row (a looped source, a camera restart) resets it; single bad
    PTS values are stamped with the read time and otherwise ignored."""

    def __init__(self, drift: float = 1e-3, resets_after: int = 3) -> None:
        self.drift, self.resets_after = drift, resets_after
        self._origin: float | None = None
        self._pts = 0.0
        self._at = 0.0
        self._backwards = 0

    def stamp(self, pts: float, now: float) -> float:
        if pts != pts:  # NaN: the backend has no timestamp for this frame
            return now
        if self._origin is not None and pts < self._pts - 1e-3:
            self._backwards += 1
            if self._backwards < self.resets_after:
                return now
            self._origin = None
        self._backwards = 0
        if self._origin is None:
            self._origin = now - pts
        else:
            self._origin = min(self._origin + self.drift * max(0.0, now - self._at), now - pts)
        self._pts, self._at = pts, now
        return self._origin + pts


def is_stream(source: str) -> bool:
    """A network source (rtsp://, http:// ...) rather than a file."""
    return "://" in source


_TCP_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443, "rtmp": 1935}  # udp://, srt://: not tried


def stream_endpoint_problem(url: str, timeout_s: float = 2.0) -> str | None:
    """Why a network source's host:port takes no TCP connection, or None when it does (or the scheme is
    not TCP): OpenCV says only "cannot open" for a wrong port and a wrong path alike (FFmpeg's reason
    goes to stderr unnamed). The host is read as FFmpeg reads it (credentials end at the first '/'),
    so a camera whose path holds an '@' (``/user=admin&password=p@ss``) is not misread."""
    from urllib.parse import urlsplit

    # an '@' after the host part may be a password's ('admin:12/34@cam': FFmpeg reads host 'admin', port 12):
    # then the host and port are not shown, they may be pieces of the password
    u = urlsplit(url)
    shown = "@" not in url.split(u.netloc, 1)[-1] if u.netloc else False
    try:
        scheme = u.scheme.lower()
        host, port = u.hostname, u.port or _TCP_PORTS.get(scheme)
    except ValueError:  # a port that is not a number; its text is not echoed (it may be a password's)
        return ("has no readable host:port (a password holding '/', '?', '#' or '@' must be percent-encoded, "
                "e.g. '/' as %2F)")
    if scheme not in _TCP_PORTS or not host or not port:
        return None  # nothing to try: let FFmpeg say
    why = tcp_problem(host, port, timeout_s)
    if why is None:
        return None
    if why == NOT_A_HOST_NAME:
        return f"host {host!r} is {why}" if shown else f"its host is {why}"
    return f"{host}:{port} takes no connection ({why})" if shown else f"its host:port takes no connection ({why})"


NOT_A_HOST_NAME = "not a valid host name"


def tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    """Why ``host:port`` takes no TCP connection (the OS's reason, or NOT_A_HOST_NAME), or None: a camera's
    server, the MQTT broker."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except UnicodeError:  # an empty or over-long label ('10.0.0..21'): idna refuses it
        return NOT_A_HOST_NAME
    except OSError as e:
        return str(e.strerror or e)


def source_file_problem(path: str) -> str | None:
    """Why a camera's file source cannot be read as video, or None (a FIFO or device is never opened
    here: reading it would block)."""
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isfile(path):
        return "is not a regular file"
    return not_a_video(path)


def open_capture(cfg: CameraConfig) -> cv2.VideoCapture:
    """Open a file or network source through OpenCV's FFmpeg backend."""
    if is_stream(cfg.source) and cfg.source.startswith("rtsp"):
        # TCP interleaved: no UDP ports to open, survives NAT/firewalls; a stall
        # then shows up as a read timeout instead of silent packet loss.
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
    elif not is_stream(cfg.source) and (why := source_file_problem(cfg.source)) is not None:
        # missing, not a regular file, or not video: retrying does not heal a file (the reader stops in error)
        raise FileNotFoundError(f"camera {cfg.id}: video file {cfg.source} {why}")
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cfg.open_timeout_s * 1000),
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cfg.stall_timeout_s * 1000)]
    cap = cv2.VideoCapture(cfg.source, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        why = ""
        if is_stream(cfg.source):
            why = (f": {p}" if (p := stream_endpoint_problem(cfg.source)) else
                   ": the server answers but would not play it (wrong path or credentials?)")
        raise ConnectionError(f"camera {cfg.id}: cannot open {redact(cfg.source)}{why}")
    return cap


class CameraReader:
    """Reads one camera in its own thread into a LatestFrameSlot."""

    def __init__(self, cfg: CameraConfig, slot: LatestFrameSlot | None = None) -> None:
        self.cfg = cfg
        self.slot = slot or LatestFrameSlot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader-{cfg.id}", daemon=True)
        self.started_at: float | None = None  # wall clock of start(); health: "never delivered a frame"
        self._lock = threading.Lock()
        self._state = SourceState.CONNECTING
        self._frames = 0
        self._reconnects = 0
        self._stalls = 0
        self._last_at: float | None = None
        self._fps: float | None = None
        self._error: str | None = None
        # file sources: frame time = wall clock at first open + media time (kept
        # increasing across loops), so it is epoch seconds but does not stretch
        # when the pipeline is slower than real time
        self._media_origin: float | None = None
        self._media_offset = 0.0  # media seconds played by earlier loops

    # -- control
    def start(self) -> "CameraReader":
        self.started_at = time.time()
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the thread to end without waiting for it (see ``stop``)."""
        self._stop.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.started_at is not None:  # a camera another cluster node reads was never started here
            self._thread.join(timeout)
        self._set(SourceState.STOPPED)

    @property
    def ended(self) -> bool:
        return self._state in (SourceState.ENDED, SourceState.ERROR, SourceState.STOPPED)

    def status(self) -> CameraStatus:
        with self._lock:
            state = self._state
            if (state is SourceState.STREAMING and self._last_at is not None
                    and time.time() - self._last_at > self.cfg.stall_timeout_s):
                state = SourceState.STALLED
            return CameraStatus(self.cfg.id, self.cfg.source, state, self._frames, self.slot.dropped,
                                self._reconnects, self._stalls, self._last_at, self._fps, self._error)

    def _set(self, state: SourceState, error: str | None = None) -> None:
        with self._lock:
            self._state = state
            if error is not None:
                self._error = error

    # -- thread
    def _run(self) -> None:
        backoff = self.cfg.reconnect_initial_s
        index = 0
        first = True
        while not self._stop.is_set():
            try:
                cap = open_capture(self.cfg)
            except FileNotFoundError as e:
                log.error("%s", e)
                self._set(SourceState.ERROR, str(e))
                return
            except ConnectionError as e:
                if not is_stream(self.cfg.source):  # a file that will not decode does not heal by retrying
                    log.error("%s", e)
                    self._set(SourceState.ERROR, f"{e} (not a readable video file)")
                    return
                log.warning("%s; retrying in %.1fs", e, backoff)
                self._set(SourceState.RECONNECTING, str(e))
                if self._stop.wait(backoff):
                    break
                backoff = self._next_backoff(backoff)
                continue
            looped = not first and not is_stream(self.cfg.source)  # a file reopened by `loop`: not news
            if not first and is_stream(self.cfg.source):
                with self._lock:
                    self._reconnects += 1
            first = False
            fps = cap.get(cv2.CAP_PROP_FPS)
            self._fps = fps if fps and 0 < fps < 1000 else None
            self._set(SourceState.STREAMING)
            log.log(logging.DEBUG if looped else logging.INFO, "camera %s: streaming %s (%.1f fps nominal)",
                    self.cfg.id, redact(self.cfg.source), fps or 0)
            got_any, why, index = self._pump(cap, index)
            cap.release()
            if got_any:
                backoff = self.cfg.reconnect_initial_s
            if why == "eof" and not is_stream(self.cfg.source):
                if not self.cfg.loop:
                    log.info("camera %s: end of file after %d frames", self.cfg.id, self._frames)
                    self._set(SourceState.ENDED)
                    return
                continue  # loop the file
            if self._stop.is_set():
                break
            if why == "stall":
                with self._lock:
                    self._stalls += 1
                self._set(SourceState.STALLED, "no frame within stall_timeout_s")
                log.warning("camera %s: stalled, reconnecting", self.cfg.id)
            else:
                self._set(SourceState.RECONNECTING, "stream ended")
                log.warning("camera %s: stream ended, reconnecting in %.1fs", self.cfg.id, backoff)
            if self._stop.wait(backoff):
                break
            backoff = self._next_backoff(backoff)

    def _media_time(self, cap: cv2.VideoCapture, n: int, prev: float, elapsed: float) -> float:
        """Seconds into the file of the frame just read: the decoder's position,
        else frame index / fps, else (no fps) wall time since the file opened."""
        pos = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        if pos == pos and pos >= 0 and pos > prev:  # pos == pos: not NaN
            return pos
        if self._fps:
            return max(n / self._fps, prev + 1e-6)
        return max(elapsed, prev + 1e-6)

    def _next_backoff(self, backoff: float) -> float:
        return min(backoff * 2, self.cfg.reconnect_max_s)

    def _pump(self, cap: cv2.VideoCapture, index: int) -> tuple[bool, str, int]:
        """Read until EOF / error / stop. Returns (got any frame, why it ended, next index)."""
        is_file = not is_stream(self.cfg.source)
        pace = self.cfg.realtime and is_file and self._fps
        backpressure = self._stop if is_file and not self.cfg.realtime else None
        t0 = time.monotonic()
        n = 0
        got_any = False
        media = -1.0
        if is_file and self._media_origin is None:
            self._media_origin = time.time()
        clock = StreamClock()  # per connection: a reconnect may restart the camera's timestamps
        while not self._stop.is_set():
            t_req = time.monotonic()
            ok, img = cap.read()
            now = time.time()
            # a read that ran into FFmpeg's read timeout is a stall even when it returns a frame:
            # on the timeout OpenCV drains frames still inside the decoder, one per timed-out read,
            # which used to count as signs of life (a frozen camera reported stalled 3x too late)
            timed_out = not is_file and time.monotonic() - t_req >= self.cfg.stall_timeout_s * 0.9
            if not ok or img is None or timed_out:
                if is_file and media >= 0:  # a loop continues after this file's last frame
                    self._media_offset += media + 1.0 / (self._fps or 25.0)
                if timed_out:
                    return got_any, "stall", index
                return got_any, "eof", index
            got_any = True
            with self._lock:
                self._frames += 1
                self._last_at = now
            if is_file:
                media = self._media_time(cap, n, media, time.monotonic() - t0)
                ts = self._media_origin + self._media_offset + media
            else:
                ts = clock.stamp(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0, now)
            self.slot.put(Frame(self.cfg.id, index, ts, img, read_at=now), wait=backpressure)
            index += 1
            n += 1
            if pace:
                delay = t0 + n / self._fps - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
        return got_any, "stop", index
