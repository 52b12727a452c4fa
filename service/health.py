"""Health, liveness and readiness verdicts over a running pipeline.

Separate from the routes so the rules are in one place: ``/health`` is
``failing`` (HTTP 503) when events are not being persisted, a camera never
delivered a frame within its open timeout, or the pipeline loop is dead or
stuck — conditions an orchestrator should act on; ``degraded`` (HTTP 200) is a
camera that streamed before and is reconnecting."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .ingest import SourceState
from .pipeline import Pipeline


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...]
    checks: dict


def pipeline_problems(pipeline: Pipeline, stuck_s: float, now: float | None = None) -> list[str]:
    """Why the processing loop is not alive (empty = alive): thread gone, or no iteration for ``stuck_s``."""
    now = time.time() if now is None else now
    if pipeline.finished.is_set():
        return []  # every source ended and was flushed: idle by design
    if not pipeline.alive:
        return ["pipeline thread is not running"]
    if pipeline.loop_at is not None and now - pipeline.loop_at > stuck_s:
        return [f"pipeline loop stuck: no iteration for {now - pipeline.loop_at:.1f}s (limit {stuck_s:g}s)"]
    return []


def camera_problems(pipeline: Pipeline, statuses: dict, now: float) -> list[str]:
    """Cameras in the error state, or that have not delivered one frame within their open timeout."""
    out = []
    for cam, st in statuses.items():
        reader = pipeline.readers[cam]
        if st.state is SourceState.ERROR:  # the reader's errors mostly name their camera already
            err = str(st.last_error)
            out.append(err if err.startswith(f"camera {cam}:") else f"camera {cam}: {err}")
        elif (st.frames_read == 0 and reader.started_at is not None
              and now - reader.started_at > reader.cfg.open_timeout_s):
            out.append(f"camera {cam}: no frame within open_timeout_s={reader.cfg.open_timeout_s:g}"
                       + (f" ({st.last_error})" if st.last_error else ""))
    return out


def persist_problems(pipeline: Pipeline) -> list[str]:
    if pipeline.unsaved:
        return [f"{len(pipeline.unsaved)} checkout events not persisted: {pipeline.persist_error}"]
    return []


def store_writable(path: str) -> bool:
    """The database file (or, before it exists, its folder) can be written by this process."""
    if path == ":memory:":
        return True
    return os.access(path, os.W_OK) if os.path.exists(path) else os.access(os.path.dirname(path) or ".", os.W_OK)


def health(pipeline: Pipeline, stuck_s: float) -> tuple[str, list[str], dict]:
    """(status ``ok``/``degraded``/``failing``, failing reasons, per-camera statuses)."""
    now = time.time()
    # cluster: cameras another node reads are not this node's health
    statuses = {cam: r.status() for cam, r in list(pipeline.readers.items()) if pipeline.is_local(cam)}
    reasons = persist_problems(pipeline) + camera_problems(pipeline, statuses, now) + \
        pipeline_problems(pipeline, stuck_s, now)
    if reasons:
        status = "failing"
    elif all(st.state in (SourceState.STREAMING, SourceState.ENDED) for st in statuses.values()):
        status = "ok"
    else:
        status = "degraded"
    return status, reasons, statuses


def liveness(pipeline: Pipeline, stuck_s: float) -> Verdict:
    reasons = pipeline_problems(pipeline, stuck_s)
    return Verdict(not reasons, tuple(reasons), {"process": True, "pipeline": not reasons})


def readiness(pipeline: Pipeline, store_path: str) -> Verdict:
    streaming = [cam for cam, r in pipeline.readers.items() if r.status().state is SourceState.STREAMING]
    checks = {"model_loaded": pipeline.detector is not None,
              "store_writable": store_writable(store_path) and not pipeline.unsaved,
              "camera_streaming": bool(streaming)}
    reasons = []
    if not checks["model_loaded"]:
        reasons.append("detector not loaded")
    if not checks["store_writable"]:
        reasons.append(persist_problems(pipeline)[0] if pipeline.unsaved else f"{store_path} is not writable")
    if not checks["camera_streaming"]:
        reasons.append("no camera is streaming")
    return Verdict(not reasons, tuple(reasons), checks)
