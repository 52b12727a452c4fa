"""`dishtrack shots` (issue 10 item 1): frames picked by the dish model's own embeddings (diversity) and
class margins (uncertainty), near-duplicates removed; on the shared video and on a slideshow video of
real tray photos where every photo is shown for three frames (the duplicates a camera produces)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import DATA, VIDEO

HOLD = 3  # frames per photo in the slideshow


@pytest.fixture(scope="module")
def dish_detector(tiny_checkpoint):
    from dishtrack.models.dish_detector import DishDetector

    return DishDetector.from_checkpoint(tiny_checkpoint[0], "cpu")


@pytest.fixture(scope="module")
def slideshow(tmp_path_factory):
    photos = sorted((DATA / "mealtray_kiosk_dev" / "labelled").glob("*.jpg"))[::29][:8]
    out = tmp_path_factory.mktemp("slides") / "trays.mp4"
    vw = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (640, 480))
    for p in photos:
        img = cv2.resize(cv2.imread(str(p)), (640, 480), interpolation=cv2.INTER_AREA)
        for _ in range(HOLD):
            vw.write(img)
    vw.release()
    return out, len(photos)


def test_shots_pick_diverse_uncertain_frames_without_duplicates(dish_detector, slideshow, tmp_path):
    from dishtrack.models.shots import frame_feature, pick_shots

    video, n_photos = slideshow
    shots = pick_shots(dish_detector, str(video), tmp_path / "out", n=n_photos, every=1, progress=False)
    # every photo is picked once: its repeats are near-duplicates, never a second pick
    assert len(shots) == n_photos
    assert sorted(s.frame // HOLD for s in shots) == list(range(n_photos))
    assert all(s.detections > 0 for s in shots) and any(s.uncertainty > 0 for s in shots)
    # asking for more than there is gives the distinct frames only
    more = pick_shots(dish_detector, str(video), tmp_path / "more", n=n_photos * HOLD, every=1, progress=False)
    assert len(more) == n_photos
    # novelty: distance to the nearest earlier pick (1.0 for the first), never below the duplicate cut
    assert shots[0].novelty == 1.0 and all(0.02 <= s.novelty <= 1.0 for s in shots[1:])
    cap = cv2.VideoCapture(str(video))
    frames = [cap.read()[1] for _ in range(n_photos * HOLD)]
    assert frame_feature(dish_detector, frames[shots[0].frame]).detections == shots[0].detections
    # images and manifests agree
    rows = list(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))
    js = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [int(r["frame"]) for r in rows] == [s.frame for s in shots] == [s["frame"] for s in js["shots"]]
    assert js["candidates"] == n_photos * HOLD
    for r in rows:
        img = cv2.imread(str(tmp_path / "out" / r["image"]))
        assert img is not None and img.shape[:2] == (480, 640)
        assert np.abs(img.astype(int) - frames[int(r["frame"])].astype(int)).mean() < 3  # the picked frame itself


def test_shots_cli_on_the_shared_video(tiny_checkpoint, tmp_path):
    from dishtrack.models.importers import IMAGE_EXTS

    out = tmp_path / "shots"
    r = subprocess.run([sys.executable, "-m", "dishtrack.service.cli", "shots", "--source", str(VIDEO), "--n", "4",
                        "--out", str(out), "--checkpoint", str(tiny_checkpoint[0]), "--every", "5", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "scoring frames" in r.stderr and "4 frames" in r.stdout
    js = json.loads((out / "manifest.json").read_text())
    assert js["candidates"] == 15 and len(js["shots"]) == 4
    frames = [s["frame"] for s in js["shots"]]
    assert len(set(frames)) == 4 and all(f % 5 == 0 for f in frames)
    assert sorted(p.name for p in (out / "images").iterdir() if p.suffix in IMAGE_EXTS) == sorted(
        s["image"].split("/")[-1] for s in js["shots"])
    nov = [s["novelty"] for s in js["shots"]]
    assert nov[0] == 1.0 and all(0.02 <= v <= 1.0 for v in nov[1:])
    bad = subprocess.run([sys.executable, "-m", "dishtrack.service.cli", "shots", "--source", str(tmp_path / "no.mp4"),
                          "--n", "2", "--out", str(out), "--checkpoint", str(tiny_checkpoint[0])],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cannot open video source" in bad.stderr


def _cands(groups):
    """Candidates in tight clusters: (direction index, frames, uncertainty) per group."""
    from dishtrack.models.shots import Candidate

    rng = np.random.default_rng(0)
    out = []
    for axis, count, unc in groups:
        for _ in range(count):
            f = np.full(16, 0.05, np.float32)
            f[axis] = 1.0
            f += rng.uniform(0, 0.01, 16).astype(np.float32)
            out.append(Candidate(len(out), len(out) / 5, f / np.linalg.norm(f), unc, 1, ("Plate",)))
    return out


def test_select_picks_frames_that_stand_for_many_before_outliers_and_weighs_uncertainty():
    from dishtrack.models.shots import select

    # a big group, a small group and one odd frame: the groups first (k-center took the odd frame second)
    cands = _cands([(0, 6, 0.1), (1, 3, 0.1), (2, 1, 0.1)])
    picks = select(cands, 2)
    assert [cands[i].feature.argmax() for i, _ in picks] == [0, 1]
    # near-duplicates are never picked: asking for everything gives one frame per group
    assert sorted(cands[i].feature.argmax() for i, _ in select(cands, 10)) == [0, 1, 2]
    # a group of 4 sure frames and one of 3 unsure frames: the unsure one first; with the weight off, the bigger
    cands = _cands([(0, 4, 0.0), (1, 3, 0.9)])
    assert cands[select(cands, 1)[0][0]].feature.argmax() == 1
    assert cands[select(cands, 1, uncertainty_weight=0.0)[0][0]].feature.argmax() == 0
