"""Draw tracks on frames and encode JPEG for the MJPEG stream."""
from __future__ import annotations

import cv2
import numpy as np

from dishtrack.tracking.tracker import TrackUpdate
from dishtrack.tracking.types import TrackState

_OCCLUDED_COLOR = (0, 165, 255)  # orange: coasting on the Kalman prediction


def _color(track_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(track_id)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


class Annotator:
    """Stage object: (image, tracks, line) -> annotated JPEG bytes."""

    def __init__(self, quality: int = 75) -> None:
        self.quality = quality

    def annotate(self, image: np.ndarray, update: TrackUpdate | None,
                 lines: list[tuple[tuple[float, float], tuple[float, float]]] = (),
                 caption: str = "") -> bytes:
        img = image.copy()
        h, w = img.shape[:2]
        for p1, p2 in lines:
            cv2.line(img, (int(p1[0] * w), int(p1[1] * h)), (int(p2[0] * w), int(p2[1] * h)), (0, 0, 255), 2)
        for t in (update.tracks if update else ()):
            if t.state is TrackState.TENTATIVE:
                continue
            x1, y1, x2, y2 = (int(v) for v in t.box)
            col = _color(t.track_id) if t.state is TrackState.CONFIRMED else _OCCLUDED_COLOR
            thick = 2 if t.state is TrackState.CONFIRMED else 1
            cv2.rectangle(img, (x1, y1), (x2, y2), col, thick)
            if t.state is TrackState.OCCLUDED:
                # coasting on the prediction: thin box and id only, keeps the picture readable
                cv2.putText(img, f"#{t.track_id}?", (x1 + 2, y1 + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, col, 1,
                            cv2.LINE_AA)
                continue
            pts = np.array([(x, y) for _, x, y in t.trajectory[-32:]], np.int32)
            if len(pts) > 1:
                cv2.polylines(img, [pts], False, col, 1)
            text = f"#{t.track_id} {t.label} {t.confidence:.2f}"
            (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
            cv2.rectangle(img, (x1, max(y1 - th - 4, 0)), (x1 + tw + 2, max(y1, th + 4)), col, -1)
            cv2.putText(img, text, (x1 + 1, max(y1 - 3, th)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                        cv2.LINE_AA)
        if caption:
            cv2.putText(img, caption, (8, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        return self._encode(img)

    def annotate_offline(self, last_image: np.ndarray | None, camera_id: str, state: str) -> bytes:
        """A dimmed last frame (or a black one) saying the camera is not streaming."""
        img = (last_image // 4) if last_image is not None else np.zeros((360, 640, 3), np.uint8)
        h, w = img.shape[:2]
        cv2.putText(img, "NO SIGNAL", (w // 2 - 110, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 255), 2,
                    cv2.LINE_AA)
        cv2.putText(img, f"{camera_id}: {state}", (w // 2 - 110, h // 2 + 32), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (255, 255, 255), 1, cv2.LINE_AA)
        return self._encode(img)

    def _encode(self, img: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()
