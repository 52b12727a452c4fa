"""Pydantic settings for cameras, detector, tracker, zones, storage and API."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Strict):
    """One video source. ``source`` is a file path or an rtsp:// / http:// URL."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    source: str
    loop: bool = Field(False, description="restart a file source at its end (demo feeds)")
    realtime: bool = Field(True, description="pace a file source at its own fps, like a camera (frames "
                           "may drop); false = process every frame as fast as the detector goes")
    reconnect_initial_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)
    stall_timeout_s: float = Field(5.0, gt=0, description="no frame for this long = stalled, reconnect")
    open_timeout_s: float = Field(10.0, gt=0)

    @field_validator("source")
    @classmethod
    def _source_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("source must not be empty")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> "CameraConfig":
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class StrideConfig(_Strict):
    """Detection stride: the detector runs on every k-th frame of a camera; on the frames
    between, tracks move by Kalman prediction corrected with sparse optical flow inside
    each box (service/motion.py). ``adaptive`` raises k while the detector cannot keep
    up (frames dropped, frame age over target) and lowers it again when there is slack."""

    k: int = Field(1, ge=1, le=30, description="detect every k-th frame (1 = every frame); the start value "
                   "when adaptive")
    adaptive: bool = Field(False, description="adapt k to load between k_min and k_max")
    detect_async: bool = Field(False, description="the detector runs beside the frames, on the newest frame "
                               "of each camera whenever it is free (at most every k-th): every frame is "
                               "tracked at once by flow, and detections are moved by flow onto the frame "
                               "they arrive with (service/async_detect.py); excludes adaptive. For live cameras "
                               "and realtime files: a file read as fast as possible would outrun the detector")
    k_min: int = Field(1, ge=1, le=30)
    k_max: int = Field(4, ge=1, le=30)
    target_age_ms: float = Field(250.0, gt=0, description="adaptive: frame age (read -> detected) p90 above "
                                 "this raises k")
    max_drop_share: float = Field(0.1, ge=0, le=1, description="adaptive: share of camera frames dropped "
                                  "unprocessed above this raises k")
    busy_low: float = Field(0.7, gt=0, le=1, description="adaptive: k is lowered only when the detector's busy "
                            "share at k-1 would stay below this")
    interval_s: float = Field(1.0, gt=0, le=60, description="adaptive: seconds between k decisions")
    flow: bool = Field(True, description="correct the Kalman prediction with optical flow (false: prediction only)")
    flow_points: int = Field(30, ge=4, le=500, description="corners tracked per box")
    flow_min_points: int = Field(4, ge=1, le=500, description="fewer consistent points: prediction only")
    flow_fb_px: float = Field(1.0, gt=0, le=20, description="max forward-backward error of a flow point")
    flow_noise: float = Field(4.0, gt=0, le=1000, description="flow measurement noise relative to a detection's")

    @model_validator(mode="after")
    def _bounds(self) -> "StrideConfig":
        if self.k_max < self.k_min:
            raise ValueError("stride.k_max must be >= stride.k_min")
        if self.detect_async and self.adaptive:
            raise ValueError("stride.detect_async and stride.adaptive exclude each other: asynchronous detection "
                             "adapts by itself (the detector takes the newest frame whenever it is free)")
        if self.detect_async and not self.flow:
            raise ValueError("stride.detect_async needs stride.flow: detections arrive frames late and are moved "
                             "onto the current frame by optical flow")
        if self.adaptive and not self.k_min <= self.k <= self.k_max:
            raise ValueError("adaptive stride: k must lie within k_min..k_max")
        return self


class DetectorConfig(_Strict):
    kind: Literal["centernet", "checkpoint"] = "centernet"
    checkpoint: str | None = Field(None, description="a file written by `dishtrack train` (kind=checkpoint)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    input_size: int | None = Field(None, ge=128, le=1024, multiple_of=32,
                                   description="network input side; null: 512 for centernet, the trained size for a checkpoint")
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    max_detections: int = Field(100, ge=1, le=1000)
    classes: list[str] | None = Field(None, description="keep only these labels; null keeps all")
    batch_max: int = Field(8, ge=1, le=64, description="most frames (one per camera) per forward pass")
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="inference runtime; auto: torch on CUDA, else onnxruntime, else openvino, else torch "
        "(onnxruntime/openvino: pip install 'dishtrack[fast]'; they run on CPU)")
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto", description="auto: fp16 on CUDA, fp32 on CPU; int8: onnxruntime static quantization calibrated "
        "on calibration_images")
    calibration_images: str | None = Field(None, description="folder of camera images for precision int8")
    cache_dir: str | None = Field(None, description="where ONNX exports are cached; null: ~/.cache/dishtrack "
                                  "($XDG_CACHE_HOME, $DISHTRACK_CACHE_DIR)")
    threads: int | None = Field(None, ge=1, le=256, description="onnxruntime/openvino intra-op threads; "
                                "null: the runtime's default (all cores)")
    batch_wait_ms: float = Field(5.0, ge=0.0, le=100.0, description="the detector stage waits this long for "
                                 "more cameras' frames before running a partial batch")
    stride: StrideConfig = StrideConfig()

    @model_validator(mode="after")
    def _checkpoint_needed(self) -> "DetectorConfig":
        if self.kind == "checkpoint" and not self.checkpoint:
            raise ValueError("detector.kind=checkpoint needs detector.checkpoint")
        if self.precision == "int8" and not self.calibration_images:
            raise ValueError("detector.precision=int8 needs detector.calibration_images")
        if self.precision == "int8" and self.backend not in ("auto", "onnxruntime"):
            raise ValueError("detector.precision=int8 needs detector.backend onnxruntime (or auto)")
        if self.backend in ("onnxruntime", "openvino") and self.device == "cuda":
            raise ValueError(f"detector.backend={self.backend} runs on CPU; use backend torch for device cuda")
        return self


class TrackerConfig(_Strict):
    iou_threshold: float = Field(0.3, gt=0.0, lt=1.0, description="min IoU to associate")
    min_hits: int = Field(3, ge=1, description="matched frames before a track is confirmed")
    max_coast_s: float = Field(1.0, gt=0.0, le=60.0, description="seconds a track that vanished in the open coasts")
    max_coast_occluded_s: float = Field(3.0, gt=0.0, le=60.0,
                                        description="seconds a track hidden behind another object (dish, hand) coasts")
    occlusion_ioa: float = Field(0.3, gt=0.0, le=1.01, description="covered share of a coasting box that counts as hidden")
    max_age: int | None = Field(None, ge=1, description="optional hard cap in frames on coasting (legacy; prefer max_coast_s)")
    tentative_max_age: int = Field(2, ge=1, description="misses that remove a tentative track")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="detections below this are ignored")
    high_score: float = Field(0.55, ge=0.0, le=1.0,
                              description="ByteTrack split: detections below only extend existing tracks")
    low_iou_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="min IoU for the low-score pass")
    low_score_coast_s: float = Field(1.0, ge=0.0, le=60.0,
                                     description="low-score detections extend tracks last matched within this many seconds")
    direction_weight: float = Field(0.0, ge=0.0, le=5.0, description="OC-SORT direction consistency weight")
    delta_t: int = Field(3, ge=1, le=30, description="observations back for a track's direction")
    direction_after_gap: bool = Field(True, description="direction consistency only for tracks re-found after a gap")
    observation_reupdate: bool = Field(False, description="OC-SORT re-update over a gap on virtual observations")
    observation_recovery: bool = Field(True, description="OC-SORT match of the last observed box")
    appearance_weight: float = Field(0.5, ge=0.0, le=5.0, description="weight of embedding cosine similarity")
    appearance_min_cos: float = Field(0.7, ge=-1.0, le=1.0, description="min cosine to re-identify beyond IoU")
    appearance_gate: float = Field(2.0, ge=0.0, le=20.0, description="centre distance / box diagonal for re-id")
    appearance_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA of a track's embedding")
    group_motion: bool = Field(True, description="a hidden dish follows the motion of its tray neighbours")
    group_radius: float = Field(1.5, gt=0.0, le=10.0, description="neighbour distance / box diagonal")
    group_velocity_tol: float = Field(0.05, ge=0.0, le=1.0, description="min group speed / box diagonal per frame")
    trajectory_len: int = Field(64, ge=2, le=10000, description="bounded per-track trajectory history")
    exit_visible: float = Field(0.25, ge=0.0, le=1.0,
                                description="a coasting track is removed once less than this share of its box is in the image")
    occluded_gate: float = Field(0.0, ge=0.0, le=5.0,
                                 description="2nd-chance match of occluded tracks by centre distance / box diagonal; 0 = off")
    buffer_iou: float = Field(0.0, ge=0.0, le=2.0,
                              description="C-BIoU pass for hidden tracks: boxes widened by this share per side; 0 = off")
    class_vote: Literal["soft", "top"] = Field(
        "soft", description="a track's lifetime class vote when the detector gives class probabilities: 'soft' sums "
        "them (score-weighted; the margin says how sure the dish was), 'top' counts each frame's top class")


class LineConfig(_Strict):
    """A checkout line in normalised image coordinates (0..1). Crossing it in
    ``direction`` (the side the normal points to) checks an object out."""

    p1: tuple[float, float]
    p2: tuple[float, float]
    direction: Literal["any", "left_to_right", "right_to_left"] = "any"

    @field_validator("p1", "p2")
    @classmethod
    def _normalised(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= c <= 1.0 for c in v):
            raise ValueError("line points are normalised image coordinates in [0, 1]")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "LineConfig":
        if self.p1 == self.p2:
            raise ValueError("p1 and p2 must differ")
        return self


class ZoneConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    camera: str
    line: LineConfig
    tray_gap_s: float = Field(1.5, gt=0, description="crossings closer than this belong to one tray")
    tray_max_s: float = Field(10.0, gt=0, description="a tray open this long is closed regardless")
    min_track_hits: int = Field(3, ge=1, description="only tracks seen this often count")
    tray_link_gap: float = Field(1.0, ge=0, description="a crossing dish within this many dish sizes of a "
                                 "tray member (box gap) moves with that tray")
    tray_speed_tol: float = Field(0.5, ge=0, description="relative velocity difference still 'moving together'")
    velocity_window_s: float = Field(0.5, gt=0, description="trajectory span a track's velocity is fitted over")
    tray_closing_speed: float = Field(0.3, ge=0, description="a crossing dish that closed in on every tray member "
                                      "it was tracked beside faster than this many dish sizes (the smaller) per "
                                      "second, in every third of some stretch of 2 x tray_rigid_span_s, is on "
                                      "another tray (one tray catching up another); 0: off")
    tray_rigid_span_s: float = Field(0.75, gt=0, description="shared in-view trajectory time a dish pair needs "
                                     "before tray_closing_speed judges it")
    review_margin: float = Field(0.3, ge=0, le=1, description="items whose class vote margin (top share minus "
                                 "runner-up) is below this are marked needs_review")
    review_confidence: float | None = Field(
        None, ge=0, le=1, description="items whose track's mean detection score is below this are marked needs_review "
        "(0: off). Default: a dish checkpoint's calibrated threshold (its scores read 0.6 at each dish's validated "
        "threshold); other detectors' scores are raw: 0 (off)")
    same_dish_overlap: float = Field(0.3, gt=0, le=1, description="two crossings of one tray named the same dish "
                                     "whose boxes (the earlier moved along its velocity to the later one's time) "
                                     "cover this share of the smaller are one dish counted twice; 1: off")


class MenuConfig(_Strict):
    """Prices for receipts: a YAML/JSON menu file (see tracking/menu.py)."""

    path: str
    timezone: str | None = Field(None, description="IANA zone deciding an event's menu date; null = local time")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str | None) -> str | None:
        if v is not None:
            from zoneinfo import ZoneInfo

            try:
                ZoneInfo(v)
            except (KeyError, ValueError) as e:  # ZoneInfoNotFoundError is a KeyError
                raise ValueError(f"unknown IANA timezone {v!r}") from e
        return v


class RetentionConfig(_Strict):
    """Pruning of stored checkout events (the oldest go first); null disables a rule."""

    max_age_days: float | None = Field(365.0, gt=0, description="delete events that ended longer ago than this")
    max_events: int | None = Field(None, ge=1, description="keep at most this many events")
    max_db_mb: float | None = Field(1024.0, gt=0, description="keep the database's used pages under this "
                                    "(freed pages are reused, so the file stops growing near it)")
    interval_s: float = Field(60.0, gt=0, description="how often the rules are applied")


class StorageConfig(_Strict):
    sqlite_path: str = "dishtrack.sqlite3"
    url: str | None = Field(None, pattern=r"^postgres(ql)?://", description="postgresql://user:pass@host:port/db: "
                            "events in PostgreSQL (shared by every node; websockets see all nodes' events); "
                            "null: the embedded SQLite file sqlite_path")
    retention: RetentionConfig = RetentionConfig()
    spool_max: int = Field(10000, ge=1, description="checkout events kept in memory while they cannot be "
                           "written (disk full, read-only); retried every second, oldest dropped beyond this")


class ApiConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    mjpeg_fps: float = Field(10.0, gt=0, le=60)
    mjpeg_quality: int = Field(75, ge=10, le=100)
    ws_queue: int = Field(256, ge=1, description="per-client bounded queue; a slow client is dropped")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (corrections, login); "
                                "a larger one is answered 413 (FastAPI max_body_size)")
    ws_client_messages_per_s: float = Field(1.0, gt=0, description="what a /ws/events client may send "
                                            "(heartbeats, answered with a pong): this many messages a second "
                                            "on average; beyond the budget it is closed with 1008")
    ws_client_burst: int = Field(32, ge=1, description="messages a /ws/events client may send at once "
                                 "before ws_client_messages_per_s applies")
    health_stuck_s: float = Field(30.0, gt=0, description="no pipeline loop iteration for this long = stuck "
                                  "(/health failing, /livez 503)")
    cache_s: float = Field(0.2, ge=0, le=5, description="/health, /livez, /readyz, /metrics, /cameras and tracks "
                           "are reused for this long, so polling them fast cannot starve the pipeline; 0 = off")
    shutdown_grace_s: float = Field(2.0, ge=0, le=60, description="on SIGTERM, seconds open requests get before "
                                     "they are cancelled (streams end at once); exit stays within ~5 s")
    # Linux niceness is per thread and inherited by the threads a thread creates. The pipeline's threads
    # (readers, detect and its torch threads, tracking, annotation) are started by the lifespan, and
    # ONNX Runtime's pool when the model loads, all before this is applied, so they keep the process's
    # nice; the event loop and the sync-endpoint worker threads it starts later get this many steps
    # more. When both want the same core the scheduler then prefers the pipeline (issue 7, API load).
    # Off by default: on the shared bench machine it raised no throughput ratio measurably but did raise
    # API latency under a flood (README, "API load"); an A/B on an idle core is still to be done.
    nice: int = Field(0, ge=0, le=19, description="the HTTP server's threads run this many nice steps "
                      "below the pipeline (capped at nice 19; raising needs no privilege); 0 = same priority")


class TokenConfig(_Strict):
    """One API token, stored only as its hash (``dishtrack hash-token`` makes both)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="who holds it (logs, rate-limit key)")
    role: Literal["viewer", "admin"] = Field(description="viewer: streams, events, snapshots, cameras; "
                                             "admin: also config (and corrections)")
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256:<hex> of the token")


class AuthConfig(_Strict):
    """API tokens, browser sessions and Host/Origin allow-lists (see service/auth.py)."""

    enabled: bool | None = Field(None, description="null: on whenever api.host is not a loopback address")
    tokens: list[TokenConfig] = []
    tokens_file: str | None = Field(None, description="YAML/JSON list of tokens ({name, role, hash}) added to tokens")
    allow_open: bool = Field(False, description="serve without auth on a non-loopback address (else: refuse to start)")
    session_secret: str | None = Field(None, min_length=32, description="HMAC key for login cookies; null: random "
                                       "per process (logins end at restart)")
    session_ttl_s: float = Field(43200.0, gt=0, description="a login cookie is valid this long")
    cookie_secure: bool = Field(False, description="mark the session cookie Secure (serve over https)")
    allowed_hosts: list[str] = Field([], description="Host names served besides localhost/127.0.0.1/::1; "
                                     "'*.example.org' wildcards, '*' = any")
    allowed_origins: list[str] = Field([], description="foreign Origins (scheme://host[:port]) allowed besides "
                                       "the page's own")

    @model_validator(mode="after")
    def _unique_names(self) -> "AuthConfig":
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError(f"token names must be unique, got {names}")
        return self


class RateLimitConfig(_Strict):
    """Per-client limits (client = token name when authenticated, else IP address)."""

    enabled: bool = True
    requests_per_s: float = Field(20.0, gt=0, description="token-bucket refill rate per client")
    burst: int = Field(60, ge=1, description="bucket size: requests a client may send at once")
    max_streams: int = Field(4, ge=1, description="concurrent MJPEG streams + websockets per client")
    stream_grace_s: float = Field(1.0, ge=0, le=10, description="a stream opened at max_streams waits this "
                                  "long for one of the client's streams to end before 429: a page reload's new "
                                  "websocket can arrive before the server has seen the old one's goodbye")
    max_clients: int = Field(10000, ge=1, description="buckets kept (least recently used dropped)")


class MqttConfig(_Strict):
    """Events published to an MQTT broker (Frigate-style topics), QoS 1, from the outbox."""

    host: str
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    client_id: str | None = Field(None, description="null: dishtrack-<hostname>-<pid>")
    prefix: str = Field("dishtrack", pattern=r"^[^#+]+$", description="first topic level")
    site: str | None = Field(None, pattern=r"^[^#+/]+$", description="optional second level: <prefix>/<site>/...")
    topic: str = Field("{base}/{camera}/events", description="event topic; {base} = prefix[/site], "
                       "{camera}, {zone}")
    keepalive_s: int = Field(30, ge=5)
    reconnect_min_s: float = Field(1.0, gt=0, description="first wait before retrying the broker (whole seconds)")
    reconnect_max_s: float = Field(5.0, gt=0, description="longest wait between tries: events reach a broker that "
                                   "is back within this (was 30 s)")


class WebhookConfig(_Strict):
    """One point-of-sale endpoint: each event POSTed as JSON, signed with HMAC-SHA256."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://")
    secret: str = Field(min_length=16, description="HMAC-SHA256 key; header X-Dishtrack-Signature: sha256=<hex>")
    timeout_s: float = Field(5.0, gt=0)
    max_attempts: int | None = Field(None, ge=1, description="give up (status failed) after this many; null: "
                                     "retry forever (later events wait: deliveries stay in order)")


class IntegrationsConfig(_Strict):
    """Sinks fed from an on-disk outbox: events produced while a sink is down are delivered later, in order."""

    outbox_path: str = Field("dishtrack-outbox.sqlite3", description="SQLite file of pending/delivered messages")
    mqtt: MqttConfig | None = None
    webhooks: list[WebhookConfig] = []
    retry_initial_s: float = Field(1.0, gt=0, description="first retry delay; doubles per failure")
    retry_max_s: float = Field(300.0, gt=0)
    queue_max: int = Field(10000, ge=1, description="events waiting to be written to the outbox (in memory)")
    keep_delivered_days: float = Field(7.0, gt=0, description="delivered rows kept this long (GET /admin/deliveries)")
    behind_s: float = Field(60.0, gt=0, description="/health says degraded (HTTP 200, `sinks_behind`) while a sink's "
                            "oldest undelivered event is older than this")

    @model_validator(mode="after")
    def _unique_names(self) -> "IntegrationsConfig":
        names = [w.name for w in self.webhooks]
        if len(set(names)) != len(names):
            raise ValueError(f"webhook names must be unique, got {names}")
        return self


class CorrectionsConfig(_Strict):
    """Evidence crops per checkout event and cashier corrections (service/evidence.py, service/corrections.py;
    stored in the event database, SQLite or PostgreSQL: service/review_db.py)."""

    evidence: bool = Field(True, description="keep a small JPEG per item, from its track's best frame")
    crop_max_px: int = Field(160, ge=32, le=512, description="long side of an evidence crop")
    crop_context: float = Field(0.15, ge=0.0, le=1.0, description="margin around the dish box, share of its size")
    jpeg_quality: int = Field(85, ge=10, le=100)
    max_tracks: int = Field(512, ge=8, le=100000, description="per camera: best-frame crops held for tracks "
                            "whose tray is still open (the least recently seen dropped beyond this)")
    dataset_dir: str | None = Field(None, description="corrected crops are written here as a manifest.jsonl "
                                    "dataset `train --data` reads; null: <sqlite_path without suffix>_corrections, "
                                    "with storage.url <database name>_corrections in the working directory")


class ClusterConfig(_Strict):
    """Camera sharding across nodes; active only with PostgreSQL storage (``storage.url``): every
    node lists all cameras, each camera is read by the one node holding its lease. With SQLite
    every camera is local."""

    node_id: str | None = Field(None, min_length=1, max_length=200, description="this node's name in "
                                "the lease table and /cameras; null: hostname-pid")
    lease_s: float = Field(10.0, ge=1, le=600, description="a lease not renewed for this long is taken "
                           "over; a dead node's cameras move within lease_s + heartbeat_s")
    heartbeat_s: float = Field(3.0, gt=0, description="how often leases are renewed, taken and rebalanced")

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> "ClusterConfig":
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError(f"cluster.heartbeat_s ({self.heartbeat_s:g}) must be at most half of lease_s "
                             f"({self.lease_s:g}): a lease must survive one missed renewal")
        return self


class AppConfig(_Strict):
    cameras: list[CameraConfig] = Field(min_length=1)
    detector: DetectorConfig = DetectorConfig()
    tracker: TrackerConfig = TrackerConfig()
    zones: list[ZoneConfig] = []
    storage: StorageConfig = StorageConfig()
    api: ApiConfig = ApiConfig()
    menu: MenuConfig | None = None
    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    integrations: IntegrationsConfig = IntegrationsConfig()
    corrections: CorrectionsConfig = CorrectionsConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _references(self) -> "AppConfig":
        ids = [c.id for c in self.cameras]
        if len(set(ids)) != len(ids):
            raise ValueError(f"camera ids must be unique, got {ids}")
        for z in self.zones:
            if z.camera not in ids:
                raise ValueError(f"zone {z.id!r} names unknown camera {z.camera!r} (cameras: {ids})")
        return self

    def zone_problems(self) -> list[str]:
        """Cameras no zone names: tracked and streamed, but never a checkout event. Valid (a camera
        only watched), yet a config written from scratch easily leaves ``zones:`` out, since
        ``--config`` replaces the bundled default rather than adding to it."""
        zoned = {z.camera for z in self.zones}
        return [f"camera {c.id}: no zone (zones[].camera) names it: it is tracked and streamed but produces no "
                "checkout events" for c in self.cameras if c.id not in zoned]


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and field."""


def default_config_path() -> Path:
    return Path(str(resources.files("dishtrack.config").joinpath("default.yaml")))


def _resolve_builtin(value: str) -> str:
    """``builtin:NAME`` points at a file shipped in the package (sample video, weights)."""
    if not value.startswith("builtin:"):
        return value
    name = value.removeprefix("builtin:")
    return str(resources.files("dishtrack.service").joinpath("assets", name))


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> AppConfig:
    """Read YAML (the bundled default when ``path`` is None) into an AppConfig.

    Raises ConfigError naming the file and the offending field(s).
    """
    p = Path(path) if path is not None else default_config_path()
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: no such config file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{p}: is a directory, not a config file") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text (UTF-8) file") from e
    except OSError as e:  # permission denied, I/O error, ...
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    for k, v in (overrides or {}).items():
        raw[k] = v
    for cam in raw.get("cameras") or []:
        if isinstance(cam, dict) and isinstance(cam.get("source"), str):
            cam["source"] = _resolve_builtin(cam["source"])
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(root)"
            parts.append(f"{loc}: {err['msg']}")
        raise ConfigError(f"{p}: invalid config: " + "; ".join(parts)) from e
