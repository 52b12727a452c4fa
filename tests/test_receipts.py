"""Receipts: class-vote review flags, menu pricing, trays grouped by co-moving
dishes, media time for file sources, and the store migration."""
import dataclasses
import json
import sqlite3
import time
from decimal import Decimal

import numpy as np
import pytest

from conftest import MOT_DETS, VIDEO
from dishtrack.config import CameraConfig, ConfigError, ZoneConfig, load_config
from dishtrack.service.ingest import CameraReader
from dishtrack.service.store import EventStore
from dishtrack.tracking.checkout import CheckoutAssembler, LineCrossingCounter, LineSpec, TrayParams
from dishtrack.tracking.menu import Menu, MenuError
from dishtrack.tracking.mot import read_mot
from dishtrack.tracking.tracker import Tracker, TrackerParams
from dishtrack.tracking.types import CheckoutEvent, CheckoutItem, Detections

FPS = 25.0
LABELS = ("plate", "bowl", "cup")
SIZE = 60.0  # dish box side, px
LINE = ((0.5, 0.0), (0.5, 1.0))  # vertical line at x = 320 of a 640x480 image


class Dish:
    """A synthetic dish: ``path(t) -> (cx, cy)``, ``cls(t) -> class id``, a square box of ``size`` px."""

    def __init__(self, path, cls=lambda t: 0, size: float = SIZE):
        self.path, self.cls, self.size = path, cls, size


def tray_path(ref0: float, y: float, dx: float, v: float = 200.0, stop_at: float | None = None,
              stop_s: float = 0.0):
    """Centre of a dish ``dx`` behind its tray's reference point, which starts at
    ``ref0`` and moves right at ``v`` px/s, optionally stopping for ``stop_s``
    when the reference reaches ``stop_at``."""
    def path(t: float):
        ref = ref0 + v * t
        if stop_at is not None and ref > stop_at:
            t_stop = (stop_at - ref0) / v
            ref = stop_at + v * max(0.0, t - t_stop - stop_s)
        return ref + dx, y
    return path


def run_scene(dishes, seconds, params: TrayParams, motion: bool = True, t0: float = 1_800_000_000.0,
              cut: bool = False):
    """Synthetic detections -> the real Tracker -> line counter -> assembler.
    ``motion=False`` feeds the assembler no snapshots (the time-only rule); ``cut``: a dish partly out
    of the image is reported as a detector does, its box cut by the border (while a quarter is in view)."""
    tracker = Tracker("cam", TrackerParams())
    counter = LineCrossingCounter(LineSpec("z", "cam", *(params.line or LINE)))
    asm = CheckoutAssembler("z", "cam", params=params)
    crossings, events = [], []
    for f in range(int(seconds * FPS)):
        t = f / FPS
        boxes, cls = [], []
        for d in dishes:
            cx, cy = d.path(t)
            half = d.size / 2
            x0, x1 = (max(0.0, cx - half), min(640.0, cx + half)) if cut else (cx - half, cx + half)
            if x0 >= 0 and x1 <= 640 and x1 - x0 >= (d.size / 4 if cut else d.size):
                boxes.append((x0, cy - half, x1, cy + half))
                cls.append(d.cls(t))
        n = len(boxes)
        det = Detections("cam", f, t0 + t, np.array(boxes, np.float32).reshape(n, 4), np.full(n, 0.8, np.float32),
                         np.array(cls, np.int64), LABELS, (640, 480))
        upd = tracker.update(det)
        c = counter.count(upd)
        if not motion:
            c = [dataclasses.replace(x, track=None) for x in c]
        crossings += c
        events += asm.assemble(c, now=t0 + t, update=upd if motion else None)
        assert asm.tracked <= asm.pending  # member snapshots are bounded by the open tray
    events += asm.flush()
    assert asm.tracked == 0
    return crossings, events


PARAMS = TrayParams(gap_s=1.5, max_s=10.0, line=LINE)


def test_two_trays_close_in_time_but_apart_in_space_are_two_events():
    # tray B follows tray A by 260 px (1.3 s at 200 px/s): B's first dish crosses
    # 0.95 s after A's last one, inside tray_gap_s, but 130 px (> 1 dish) behind it
    dishes = [Dish(tray_path(100, 200, 0)), Dish(tray_path(100, 270, -70)),
              Dish(tray_path(-160, 200, 0)), Dish(tray_path(-160, 280, -70))]
    crossings, events = run_scene(dishes, 5.0, PARAMS)
    assert len(crossings) == 4
    gaps = np.diff(sorted(c.timestamp for c in crossings))
    assert gaps.max() < PARAMS.gap_s  # time alone cannot separate them ...
    _, time_only = run_scene(dishes, 5.0, PARAMS, motion=False)
    assert len(time_only) == 1  # ... the old rule makes one tray of four dishes
    assert [sum(i.count for i in e.items) for e in events] == [2, 2]
    a, b = events
    assert set(a.track_ids).isdisjoint(b.track_ids) and a.ended_at < b.started_at


def test_dishes_far_apart_on_one_tray_are_one_event_through_the_plate_between_them():
    """A fruit at the tray's bottom edge crosses first, a yogurt at its top edge next: 220 px apart (> one
    dish), so the yogurt started a second tray, and the big plate between them, crossing last, joined
    that one (a generated checkout video split such a tray in two). The plate is on screen, moving with
    both, when the yogurt crosses: dishes linked through a co-moving dish not yet across are one tray."""
    dishes = [Dish(tray_path(100, 400, 0)), Dish(tray_path(100, 120, -10)),
              Dish(tray_path(100, 260, -60), cls=lambda t: 1, size=200)]
    crossings, events = run_scene(dishes, 4.0, PARAMS)
    assert len(crossings) == 3 and [c.track.label for c in sorted(crossings, key=lambda c: c.timestamp)][-1] == "bowl"
    assert len(events) == 1 and sorted((i.label, i.count) for i in events[0].items) == [("bowl", 1), ("plate", 2)]


def test_a_big_plate_on_the_next_tray_does_not_chain_it_to_the_tray_ahead():
    """Tray B 260 px behind tray A (B's front cup 130 px behind A's rear dish) carries a 200 px plate
    behind its cup: within one *plate* size of A's rear dish and of the cup, so a chain step of the
    larger dish's size made A and B one event (found by review)."""
    a = [Dish(tray_path(100, 200, 0)), Dish(tray_path(100, 270, -70))]
    b = [Dish(tray_path(-160, 120, 0)), Dish(tray_path(-160, 330, -110), cls=lambda t: 1, size=200)]
    crossings, events = run_scene(a + b, 6.0, PARAMS)
    assert len(crossings) == 4
    assert [sum(i.count for i in e.items) for e in events] == [2, 2]


def test_a_still_big_dish_by_the_line_does_not_chain_two_trays():
    """A 200 px dish standing still on the counter, straddling the line below the lane, 50 px from
    each of two trays: with the size slack of the crossing rule (0.5 x 200 px/s) it 'moved with'
    both and linked them (found by review)."""
    two = [Dish(tray_path(100, 200, 0)), Dish(tray_path(100, 270, -70)),
           Dish(tray_path(-160, 200, 0)), Dish(tray_path(-160, 280, -70))]
    still = Dish(lambda t: (330.0, 390.0), size=200)
    crossings, events = run_scene(two + [still], 5.0, PARAMS)
    assert len(crossings) == 4
    assert [sum(i.count for i in e.items) for e in events] == [2, 2]


def test_a_tray_that_caught_up_with_the_tray_ahead_is_its_own_event():
    """Tray B (210 px/s) catches up with tray A (150 px/s): when B's front cup crosses, 0.6 s after A's
    rear dish, it is 30 px behind it and within the speed tolerance, so space, time and velocity all
    said "one tray" (a generated checkout video merged two trays so). But dishes of one tray keep
    their offsets, and B's cup closed 60 px/s on A's dishes for the whole time both were in view."""
    a = [Dish(tray_path(150, 200, 0, v=150)), Dish(tray_path(150, 270, -70, v=150))]
    b = [Dish(tray_path(-142, 200, 0, v=210)), Dish(tray_path(-142, 270, -70, v=210))]
    crossings, events = run_scene(a + b, 4.0, PARAMS)
    assert len(crossings) == 4
    _, merged = run_scene(a + b, 4.0, dataclasses.replace(PARAMS, closing_speed=0.0))
    assert [sum(i.count for i in e.items) for e in merged] == [4]  # without the history: one tray
    assert [sum(i.count for i in e.items) for e in events] == [2, 2]
    first, second = events
    assert set(first.track_ids).isdisjoint(second.track_ids)
    # the zone's settings reach the assembler: on for dishes by default, off in the people-counting sample
    dish_zone = ZoneConfig(id="z", camera="cam", line={"p1": [0.5, 0.0], "p2": [0.5, 1.0]})
    assert TrayParams.from_config(dish_zone).closing_speed == 0.3 == PARAMS.closing_speed
    assert TrayParams.from_config(load_config(None).zones[0]).closing_speed == 0.0
    tuned = TrayParams.from_config(dish_zone.model_copy(update={"tray_closing_speed": 0.1, "tray_rigid_span_s": 2.0}))
    assert (tuned.closing_speed, tuned.rigid_span_s) == (0.1, 2.0)


def _turning(centre_dx: float, y: float, r: float, a0: float, turn_deg: float, seconds: float, v: float = 200.0):
    """A dish ``r`` px from its tray's centre at angle ``a0`` (deg) while the tray turns by ``turn_deg``."""
    def path(t: float):
        a = np.radians(a0 + turn_deg * min(t / seconds, 1.0))
        return -100 + v * t + centre_dx + r * np.cos(a), y + r * np.sin(a)
    return path


@pytest.mark.parametrize("scene", ["leaving the image", "a cup moved by hand", "a cup moved mid-pass",
                                   "a turning tray"])
def test_one_tray_stays_one_event_whatever_moves_on_it(scene):
    """What moves dishes of one tray against each other without a second tray (found by review):
    the plate ahead leaving the image, its box cut by the border, as the cup 250 px behind crosses a line
    near that edge (a cut box's centre slows: it looked like closing in); a hand pushing the cup 35 px
    towards the plate 0.6 s before it crosses, or 60 px in the middle of its pass (one jump, not a
    steady approach). The first version of the rule (offset drift over the shared trajectory) split the
    first two, the second (the distance's fall in each half of it) the third; none split the tray
    turning by 20 degrees as it slides (distances kept), kept here as a scene."""
    params = PARAMS
    if scene == "leaving the image":
        params = dataclasses.replace(PARAMS, line=((0.8, 0.0), (0.8, 1.0)))
        dishes = [Dish(tray_path(100, 240, 0), size=180), Dish(tray_path(100, 240, -250))]
    elif scene == "a cup moved by hand":
        push = lambda t: 35.0 * min(max((t - 1.0) / 0.2, 0.0), 1.0)  # noqa: E731 - between 1.0 and 1.2 s
        dishes = [Dish(tray_path(100, 200, 0)), Dish(lambda t: (tray_path(100, 300, -100)(t)[0] + push(t), 300))]
    elif scene == "a cup moved mid-pass":
        push = lambda t: 60.0 * min(max((t - 0.5) / 0.5, 0.0), 1.0)  # noqa: E731 - between 0.5 and 1.0 s
        dishes = [Dish(tray_path(100, 200, 0)), Dish(lambda t: (tray_path(100, 300, -100)(t)[0] + push(t), 300))]
    else:
        dishes = [Dish(_turning(0, 240, 45, 180, 20, 4.0)), Dish(_turning(0, 240, 45, 0, 20, 4.0))]
    crossings, events = run_scene(dishes, 5.0, params, cut=True)
    assert len(crossings) == 2
    assert [sum(i.count for i in e.items) for e in events] == [2]


def test_tray_stopped_on_the_line_for_3s_is_one_event():
    # three dishes in a row; the tray stops with its rear dish straddling the line
    stop = dict(stop_at=430.0, stop_s=3.0)
    dishes = [Dish(tray_path(100, 240, 0, **stop)), Dish(tray_path(100, 240, -70, **stop)),
              Dish(tray_path(100, 240, -140, **stop))]
    crossings, events = run_scene(dishes, 7.0, PARAMS)
    ts = sorted(c.timestamp for c in crossings)
    assert len(ts) == 3 and ts[2] - ts[1] > 3.0  # a pause twice tray_gap_s
    assert len(events) == 1 and events[0].items[0].count == 3
    _, time_only = run_scene(dishes, 7.0, PARAMS, motion=False)
    assert len(time_only) == 2  # the old rule split the tray


def test_trays_in_opposite_directions_at_the_same_time_are_separate():
    # two dishes meet at the line at the same moment, moving in opposite directions
    dishes = [Dish(tray_path(100, 200, 0)), Dish(tray_path(540, 250, 0, v=-200.0))]
    crossings, events = run_scene(dishes, 3.0, PARAMS)
    assert len(crossings) == 2 and abs(crossings[0].timestamp - crossings[1].timestamp) < 0.1
    assert len(events) == 2


def test_receipt_uses_the_vote_at_tray_close_and_flags_low_margins():
    # dish 1 looks like a bowl until it crosses (t = 1.1 s), then clearly a plate:
    # the receipt uses the vote at tray close (plate, narrow margin -> review)
    flip = Dish(tray_path(100, 200, 0), cls=lambda t: 1 if t < 1.1 else 0)
    steady = Dish(tray_path(100, 280, -70), cls=lambda t: 2)
    crossings, events = run_scene([flip, steady], 4.0, PARAMS)
    first = min(crossings, key=lambda c: c.timestamp)
    assert first.label == "bowl" and first.class_margin > 0.8  # at crossing: (almost) all bowl votes
    (ev,) = events
    items = {i.label: i for i in ev.items}
    assert set(items) == {"plate", "cup"}
    assert items["plate"].needs_review and not items["cup"].needs_review
    assert ev.needs_review
    # same scene with a lower review threshold: nothing to review
    loose = TrayParams(gap_s=1.5, line=LINE, review_margin=0.05)
    (ev2,) = run_scene([flip, steady], 4.0, loose)[1]
    assert not ev2.needs_review and {i.label for i in ev2.items} == {"plate", "cup"}


def _crossing(track_id: int, t: float, box, label: str, conf: float, v: float = 200.0):
    """A crossing at time ``t`` of a dish moving right at ``v`` px/s, with its trajectory."""
    from dishtrack.tracking.types import Crossing, Track, TrackState

    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    traj = tuple((t - k / FPS, cx - v * k / FPS, cy) for k in range(10, -1, -1))
    tr = Track(track_id, "cam", TrackState.CONFIRMED, tuple(map(float, box)), 0, label, conf, 1.0, 20, 20, 0, traj)
    return Crossing("cam", "z", track_id, t, label, conf, track=tr)


def test_a_dish_tracked_twice_is_counted_once():
    """Boxes from the checkout videos of the kiosk trays: a lying bottle became two tracks (the
    whole bottle, and its cap end 0.16 s later); at the later crossing the first box, moved along
    the tray's motion, covers 58 % of the second. Two fruits side by side and two yogurts on one
    tray (overlap <= 0.17 there) stay two; so do two different dishes that overlap."""
    asm = CheckoutAssembler("z", "cam", params=PARAMS)
    t0 = 100.0
    cr = [_crossing(9, t0, (241, 90, 398, 268), "Drink", 0.7),           # the whole bottle
          _crossing(16, t0 + 0.16, (289, 178, 369, 332), "Drink", 0.62),  # its cap end: one dish
          _crossing(20, t0 + 0.05, (307, 300, 389, 373), "Fruit", 0.8),
          _crossing(21, t0 + 0.17, (292, 231, 364, 299), "Fruit", 0.8),   # a second fruit beside it
          _crossing(30, t0 + 0.1, (200, 300, 300, 400), "Plate", 0.9),
          _crossing(31, t0 + 0.1, (230, 320, 290, 380), "Bread", 0.7)]    # bread on the plate
    events = asm.assemble(cr, now=t0 + 0.2) + asm.flush()
    (ev,) = events
    assert {i.label: i.count for i in ev.items} == {"Drink": 1, "Fruit": 2, "Plate": 1, "Bread": 1}
    assert sorted(ev.track_ids) == [9, 20, 21, 30, 31]  # the counted tracks: one per unit (evidence, corrections)
    assert {i.label: i.confidence for i in ev.items}["Drink"] == 0.7  # the surer track counts
    # without a trajectory (no velocity) boxes crossing at different times are not compared:
    # both sat on the line, so any two would overlap
    still = [dataclasses.replace(c, track=dataclasses.replace(c.track, trajectory=c.track.trajectory[-1:]))
             for c in cr[:2]]
    asm2 = CheckoutAssembler("z", "cam", params=PARAMS)
    (ev,) = asm2.assemble(still, now=t0 + 0.2) + asm2.flush()
    assert {i.label: i.count for i in ev.items} == {"Drink": 2}
    # off (1): the bottle is two drinks again
    off = CheckoutAssembler("z", "cam", params=dataclasses.replace(PARAMS, same_dish_overlap=1.0))
    (ev,) = off.assemble(cr, now=t0 + 0.2) + off.flush()
    assert {i.label: i.count for i in ev.items}["Drink"] == 2


def test_tracker_reports_class_margin():
    tracker = Tracker("cam", TrackerParams(min_hits=1))
    box = np.array([[10, 10, 50, 50]], np.float32)
    for f, (cls, score) in enumerate([(0, 0.6), (1, 0.3), (0, 0.6), (2, 0.3)]):
        upd = tracker.update(Detections("cam", f, f / FPS, box, np.array([score], np.float32),
                                        np.array([cls], np.int64), LABELS, (640, 480)))
    (t,) = upd.tracks
    # votes: plate 1.2, bowl 0.3, cup 0.3 of 1.8 -> share 2/3, margin 2/3 - 1/6
    assert t.label == "plate" and t.class_share == pytest.approx(2 / 3) and t.class_margin == pytest.approx(0.5)


def test_soft_class_vote_keeps_how_sure_each_frame_was():
    """A dish the classifier calls 55 / 45 plate / bowl in every frame: counting each frame's top
    class gives plate with margin 1 (never reviewed); summing the probabilities gives plate with a
    margin of 0.1, below review_margin. Detections without probabilities keep the counted vote."""
    box = np.array([[10, 10, 50, 50]], np.float32)
    probs = np.array([[0.55, 0.45, 0.0]], np.float32)

    def run(params, with_probs=True):
        tracker = Tracker("cam", params)
        for f in range(6):
            upd = tracker.update(Detections("cam", f, f / FPS, box, np.array([0.8], np.float32), np.array([0], np.int64),
                                            LABELS, (640, 480), probs=probs if with_probs else None))
        (t,) = upd.tracks
        return t

    soft = run(TrackerParams(min_hits=1))
    assert soft.label == "plate" and soft.class_share == pytest.approx(0.55) and soft.class_margin == pytest.approx(0.1)
    top = run(TrackerParams(min_hits=1, class_vote="top"))
    assert top.label == "plate" and top.class_margin == 1.0
    assert run(TrackerParams(min_hits=1), with_probs=False).class_margin == 1.0
    # a dish whose frames disagree: the sums decide (plate 0.9 + 0.3, bowl 0.1 + 0.7)
    tracker = Tracker("cam", TrackerParams(min_hits=1))
    for f, p in enumerate([[0.9, 0.1, 0.0], [0.3, 0.7, 0.0]]):
        upd = tracker.update(Detections("cam", f, f / FPS, box, np.array([0.8], np.float32),
                                        np.array([int(np.argmax(p))], np.int64), LABELS, (640, 480),
                                        probs=np.array([p], np.float32)))
    (t,) = upd.tracks
    assert t.label == "plate" and t.class_margin == pytest.approx(0.2)
    with pytest.raises(ValueError, match="probs must be"):
        Detections("cam", 0, 0.0, box, np.array([0.8], np.float32), np.array([0], np.int64), LABELS, (640, 480),
                   probs=np.zeros((1, 2), np.float32))


def test_an_item_seen_mostly_under_its_threshold_needs_review():
    """A dish detector's scores read 0.6 at each dish's validated threshold: a track whose detections
    averaged below that was mostly seen where its dish is not counted, so its item is marked for
    review even when its class vote was unanimous. On the 62 cross-validated checkout videos this
    flag and the soft vote took the wrong receipts left unflagged from 21 to 9 (docs/dish_accuracy.md)."""
    t0 = 50.0
    cr = [_crossing(1, t0, (100, 100, 200, 200), "Plate", 0.8),
          _crossing(2, t0 + 0.1, (220, 100, 300, 180), "Yogurt", 0.45)]
    asm = CheckoutAssembler("z", "cam", params=dataclasses.replace(PARAMS, review_confidence=0.6))
    (ev,) = asm.assemble(cr, now=t0 + 0.2) + asm.flush()
    items = {i.label: i for i in ev.items}
    assert items["Yogurt"].needs_review and not items["Plate"].needs_review and ev.needs_review
    off = CheckoutAssembler("z", "cam", params=PARAMS)  # 0: off
    (ev,) = off.assemble(cr, now=t0 + 0.2) + off.flush()
    assert not ev.needs_review
    # the zone's setting defaults to the detector's calibrated threshold (a dish checkpoint: 0.6);
    # raw scores (COCO CenterNet) leave it off; a setting in the config wins
    zone = load_config(None).zones[0]
    assert zone.review_confidence is None
    assert TrayParams.from_config(zone, 0.6).review_confidence == 0.6
    assert TrayParams.from_config(zone).review_confidence == 0.0
    assert TrayParams.from_config(zone.model_copy(update={"review_confidence": 0.5}), 0.6).review_confidence == 0.5
    with pytest.raises(ValueError, match="class_vote"):
        TrackerParams(class_vote="sof")


# -- menu
MENU = {
    "currency": "EUR",
    "items": {"plate": {"name": "Main course", "price": 6.50}, "bowl": {"name": "Soup", "price": 2.80},
              "cup": {"name": "Coffee", "price": 0.10}},
    "dates": {"2026-11-23": {"items": {"plate": {"name": "Fish of the day", "price": 7.20}}}},
}


def event(items, ended_at, needs_review=False):
    return CheckoutEvent("e1", "cam", "z", ended_at - 1, ended_at,
                         tuple(CheckoutItem(lbl, n, 0.9) for lbl, n in items), (1, 2), 0.9, needs_review)


def write_menu(tmp_path, data, name="menu.yaml"):
    import yaml

    p = tmp_path / name
    p.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return p


def test_menu_prices_lines_and_total_in_exact_cents(tmp_path):
    menu = Menu.load(write_menu(tmp_path, MENU), timezone="UTC")
    ev = event([("bowl", 3), ("cup", 3), ("plate", 1)], ended_at=1795305600.0)  # 2026-11-22 UTC
    r = menu.price(ev)
    assert r.currency == "EUR" and r.unpriced == ()
    assert [(ln.name, ln.count, ln.unit_price, ln.line_total) for ln in r.lines] == [
        ("Soup", 3, Decimal("2.8"), Decimal("8.40")), ("Coffee", 3, Decimal("0.1"), Decimal("0.30")),
        ("Main course", 1, Decimal("6.5"), Decimal("6.50"))]
    assert r.total == Decimal("15.20")
    priced = menu.apply(ev)
    d = priced.to_dict()
    assert d["total"] == 15.2 and d["currency"] == "EUR" and not d["needs_review"]
    assert d["items"][0] == {"label": "bowl", "name": "Soup", "count": 3, "confidence": 0.9, "unit_price": 2.8,
                             "line_total": 8.4, "unpriced": False, "needs_review": False}


def test_missing_dish_is_flagged_never_priced_zero(tmp_path):
    menu = Menu.load(write_menu(tmp_path, MENU, "menu.json"))
    ev = menu.apply(event([("plate", 1), ("pizza", 2)], ended_at=1795305600.0))
    pizza = next(i for i in ev.items if i.label == "pizza")
    assert pizza.unpriced and pizza.unit_price is None and pizza.line_total is None and pizza.name is None
    assert ev.total == 6.5 and ev.needs_review  # excluded from the total, the event goes to review


def test_menu_of_the_day_uses_the_site_timezone(tmp_path):
    path = write_menu(tmp_path, MENU)
    late = 1795390200.0  # 2026-11-22 23:30 UTC = 2026-11-23 00:30 in Berlin
    ev = event([("plate", 2)], ended_at=late)
    assert Menu.load(path, "UTC").apply(ev).total == 13.0
    berlin = Menu.load(path, "Europe/Berlin").apply(ev)
    assert berlin.total == 14.4 and berlin.items[0].name == "Fish of the day"


@pytest.mark.parametrize("data, field", [
    ({**MENU, "items": {"plate": {"name": "x", "prize": 1}}}, "items.plate.prize"),
    ({**MENU, "items": {"plate": {"name": "x", "price": -1}}}, "items.plate.price"),
    ({**MENU, "currency": "euro"}, "currency"),
    ({**MENU, "dates": {"not-a-date": {"items": {}}}}, "dates.not-a-date"),
    ({"items": {}}, "currency"),
])
def test_bad_menu_names_file_and_field(tmp_path, data, field):
    path = write_menu(tmp_path, data)
    with pytest.raises(MenuError) as e:
        Menu.load(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_menu_file_errors_and_config(tmp_path):
    with pytest.raises(MenuError, match="no such menu file"):
        Menu.load(tmp_path / "nope.yaml")
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(MenuError, match="not valid JSON"):
        Menu.load(bad)
    import yaml

    cfg_path = tmp_path / "c.yaml"
    base = {"cameras": [{"id": "a", "source": "x.mp4"}]}
    cfg_path.write_text(yaml.safe_dump({**base, "menu": {"path": "m.yaml", "timezone": "Europe/Berlin"}}))
    assert load_config(cfg_path).menu.timezone == "Europe/Berlin"
    assert load_config(cfg_path).zones == [] and load_config(cfg_path).menu.path == "m.yaml"
    cfg_path.write_text(yaml.safe_dump({**base, "menu": {"path": "m.yaml", "timezone": "Mars/Base"}}))
    with pytest.raises(ConfigError, match="menu.timezone"):
        load_config(cfg_path)


# -- store
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    camera_id TEXT NOT NULL,
    zone_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    confidence REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_camera ON events(camera_id, seq);
CREATE INDEX IF NOT EXISTS events_time ON events(ended_at);
CREATE TABLE IF NOT EXISTS event_labels (
    seq INTEGER NOT NULL REFERENCES events(seq),
    label TEXT NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS event_labels_label ON event_labels(label, seq);
"""


def test_store_migrates_a_database_written_by_the_old_schema(tmp_path):
    """A file written by the pre-receipt store (its schema and insert, verbatim)
    opens, keeps its rows, serves them with the new keys, and takes priced events."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    old = {"event_id": "old1", "camera_id": "cam0", "zone_id": "z", "started_at": 1.0, "ended_at": 2.0,
           "items": [{"label": "plate", "count": 2, "confidence": 0.8}], "track_ids": [1, 2], "confidence": 0.7}
    cur = db.execute("INSERT INTO events(event_id, camera_id, zone_id, started_at, ended_at, confidence, payload)"
                     " VALUES (?,?,?,?,?,?,?)", ("old1", "cam0", "z", 1.0, 2.0, 0.7, json.dumps(old)))
    db.execute("INSERT INTO event_labels(seq, label, count) VALUES (?,?,?)", (cur.lastrowid, "plate", 2))
    db.commit()
    db.close()

    s = EventStore(path)
    assert s.schema_version == 2
    rec = s.get("old1")
    assert rec["items"][0]["label"] == "plate" and rec["needs_review"] is False and rec["total"] is None
    assert rec["items"][0]["unpriced"] is False and rec["currency"] is None
    menu = Menu.load(write_menu(tmp_path, MENU), "UTC")
    new = menu.apply(event([("plate", 1), ("pizza", 1)], ended_at=1795305600.0))
    stored = s.save(new)
    assert stored["needs_review"] and stored["total"] == 6.5
    assert [r["event_id"] for r in s.list(needs_review=True).items] == ["e1"]
    assert [r["event_id"] for r in s.list(needs_review=False).items] == ["old1"]
    assert [r["event_id"] for r in s.list(label="plate").items] == ["old1", "e1"]
    s.close()
    s2 = EventStore(path)  # reopening a migrated file is a no-op
    assert s2.count() == 2 and s2.get("e1")["items"][1]["unpriced"] is True
    row = sqlite3.connect(path).execute("SELECT needs_review, currency, total FROM events WHERE event_id='e1'")
    assert row.fetchone() == (1, "EUR", 6.5)


# -- media time
def read_file_frames(realtime: bool, delay: float):
    """The real reader on the shared video; ``delay`` per frame mimics a detector."""
    reader = CameraReader(CameraConfig(id="cam0", source=str(VIDEO), realtime=realtime)).start()
    frames = []
    try:
        while not reader.ended or reader.slot.wait(0):
            f = reader.slot.take()
            if f is None:
                reader.slot.wait(0.05)
                continue
            frames.append(f)
            time.sleep(delay)
    finally:
        reader.stop()
    return frames


def group_mot(frames, clock):
    """TUD-Campus's MOT15 detections on the frames' clock -> tracker -> trays."""
    dets = read_mot(MOT_DETS / "TUD-Campus" / "det/det.txt")
    tracker = Tracker("cam0", TrackerParams())
    counter = LineCrossingCounter(LineSpec("z", "cam0", (0.5, 0.0), (0.5, 1.0)))
    # walkers pass each other: people are not dishes on a tray (closing_speed off, as a people zone sets it)
    asm = CheckoutAssembler("z", "cam0", params=TrayParams(gap_s=0.3, max_s=1.5, line=LINE, closing_speed=0.0))
    events = []
    for f in frames:
        d = dets[dets[:, 0].astype(int) == f.index + 1]
        boxes = np.c_[d[:, 2:4], d[:, 2:4] + d[:, 4:6]].astype(np.float32)
        det = Detections("cam0", f.index, clock(f), boxes, d[:, 6].astype(np.float32),
                         np.zeros(len(d), np.int64), ("person",), (640, 480))
        upd = tracker.update(det)
        events += asm.assemble(counter.count(upd), now=clock(f), update=upd)
    events += asm.flush()
    return [e.track_ids for e in events]


def test_file_frames_carry_media_time_so_slow_processing_keeps_tray_grouping():
    slow = read_file_frames(realtime=False, delay=0.08)  # ~2x slower than the video's 25 fps
    assert [f.index for f in slow] == list(range(71))  # every frame, none dropped
    ts = np.array([f.timestamp for f in slow])
    assert np.allclose(np.diff(ts), 1 / 25, atol=1e-6)  # media time: 1/fps apart ...
    assert np.diff([f.read_at for f in slow]).mean() > 0.07  # ... though read 80 ms apart
    assert abs(ts[0] - time.time()) < 60  # still epoch seconds

    by_media = group_mot(slow, lambda f: f.timestamp)
    assert len(by_media) >= 2
    # same trays as processing in real time (frame i at start + i / fps)
    assert by_media == group_mot(slow, lambda f: slow[0].read_at + f.index / 25)
    # the old clock (read time) stretches gaps 2x and splits trays differently
    assert group_mot(slow, lambda f: f.read_at) != by_media
