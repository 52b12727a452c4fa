"""Bad input to the command line, as a new user gives it: a one-line error naming the flag, file,
line or field, exit status 2, no traceback, and no work done before a path that cannot be written
is refused. Every case here was found by trying the commands (2026-12-07): each gave a traceback,
exit 0, or an error only after the work, before."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import DATA, MOT_DETS, VIDEO
from dishtrack.service.cli import main

KIOSK = DATA / "mealtray_kiosk_dev"
TUD = MOT_DETS / "TUD-Campus"
SEQINFO = "[Sequence]\nname=TUD-Campus\nimDir=img1\nframeRate=25\nseqLength=71\nimWidth=640\nimHeight=480\nimExt=.jpg\n"


def cli(argv: list[str], capsys, caplog) -> tuple[int, str]:
    """Run ``dishtrack ARGV`` in this process: (exit status, what it printed and logged)."""
    caplog.clear()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: a usage error
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err + caplog.text


@pytest.fixture
def seq(tmp_path) -> tuple[Path, Path]:
    """TUD-Campus's real detections and its seqinfo (MOTChallenge layout)."""
    dets = tmp_path / "det.txt"
    shutil.copy(TUD / "det" / "det.txt", dets)
    info = tmp_path / "seqinfo.ini"
    info.write_text(SEQINFO)
    return dets, info


def corrupt_line(path: Path, n: int, new: str) -> str:
    lines = path.read_text().splitlines()
    old = lines[n - 1]
    lines[n - 1] = new.format(*old.split(","))
    path.write_text("\n".join(lines) + "\n")
    return lines[n - 1]


@pytest.mark.parametrize("line, why", [
    ("{0},{1},abc,{3},{4},{5},{6}", "not comma-separated numbers"),
    ("{0},{1},{2},{3}", "4 columns where line 1 has"),
    ("{0},{1},{2},{3},nan,{5},{6},{7},{8},{9}", "nan or inf"),
    ("{0},{1},{2},{3},-{4},{5},{6},{7},{8},{9}", "width and height must be > 0"),
    ("1.5,{1},{2},{3},{4},{5},{6},{7},{8},{9}", "whole number >= 1"),
    ("0,{1},{2},{3},{4},{5},{6},{7},{8},{9}", "whole number >= 1"),
])
def test_track_names_the_file_and_line_of_a_bad_detection(seq, tmp_path, capsys, caplog, line, why):
    """Before: numpy's 'at row 4, column 3' (0-based, no file) or, for nan, negative sizes and
    fractional frames, exit 0 with nan boxes in the results."""
    dets, info = seq
    corrupt_line(dets, 5, line)
    rc, out = cli(["track", "--dets", str(dets), "--seqinfo", str(info), "--out", str(tmp_path / "r.txt")],
                  capsys, caplog)
    assert rc == 2 and f"{dets}:5: " in out and why in out, out
    assert not (tmp_path / "r.txt").exists()


@pytest.mark.parametrize("ini, why", [
    (SEQINFO.replace("frameRate=25", "frameRate=0"), "frameRate=0 must be > 0"),  # was ZeroDivisionError
    (SEQINFO.replace("frameRate=25\n", ""), "has no frameRate"),  # was KeyError
    (SEQINFO.replace("frameRate=25", "frameRate=abc"), "frameRate='abc' is not a number"),
    (SEQINFO.replace("imWidth=640", "imWidth=0"), "imWidth=0 must be > 0"),  # was accepted: 23 tracks, not 15
    (SEQINFO.replace("[Sequence]", "[Seq]"), "no [Sequence] section"),  # was KeyError
    ("name=x\n", "not a seqinfo.ini"),  # was MissingSectionHeaderError
    ("", "no [Sequence] section"),
])
def test_track_names_the_key_of_a_bad_seqinfo(seq, tmp_path, capsys, caplog, ini, why):
    dets, info = seq
    info.write_text(ini)
    rc, out = cli(["track", "--dets", str(dets), "--seqinfo", str(info), "--out", str(tmp_path / "r.txt")],
                  capsys, caplog)
    assert rc == 2 and f"{info}: " in out and why in out, out


def test_track_refuses_frames_beyond_the_sequence_and_folders_for_files(seq, tmp_path, capsys, caplog):
    dets, info = seq
    out_file = str(tmp_path / "r.txt")
    for argv, why in [(["--dets", str(tmp_path), "--seqinfo", str(info)], "argument --dets: "),
                      (["--dets", str(dets), "--seqinfo", str(tmp_path)], "argument --seqinfo: "),
                      (["--dets", str(dets), "--seqinfo", str(tmp_path / "nope.ini")], "does not exist")]:
        rc, out = cli(["track", *argv, "--out", out_file], capsys, caplog)
        assert rc == 2 and why in out, out
    rc, out = cli(["track", "--dets", str(dets), "--seqinfo", str(info), "--out", str(tmp_path)], capsys, caplog)
    assert rc == 2 and "argument --out: " in out and "is a directory" in out  # was IsADirectoryError
    corrupt_line(dets, 3, "99999,{1},{2},{3},{4},{5},{6},{7},{8},{9}")
    rc, out = cli(["track", "--dets", str(dets), "--seqinfo", str(info), "--out", out_file], capsys, caplog)
    assert rc == 2 and "frame 99999 is beyond seqLength=71" in out, out


def test_track_reads_a_tuning_yaml_with_only_a_tracker_section(seq, tmp_path, capsys, caplog):
    """`track --config` says its tracker section is used; a YAML holding only that section was refused
    ('cameras: Field required'). Its settings are used: a stricter min_hits gives fewer result rows."""
    dets, info = seq
    default, tuned = tmp_path / "new" / "default.txt", tmp_path / "tuned.txt"  # --out's folder is made
    assert cli(["track", "--dets", str(dets), "--seqinfo", str(info), "--out", str(default)], capsys, caplog)[0] == 0
    cfg = tmp_path / "tracker.yaml"
    cfg.write_text(yaml.safe_dump({"tracker": {"min_hits": 10}}))
    rc, out = cli(["track", "--dets", str(dets), "--seqinfo", str(info), "--out", str(tuned), "--config", str(cfg)],
                  capsys, caplog)
    assert rc == 0, out
    assert 0 < len(tuned.read_text().splitlines()) < len(default.read_text().splitlines())
    cfg.write_text(yaml.safe_dump({"tracker": {"min_hitz": 10}}))
    rc, out = cli(["track", "--dets", str(dets), "--seqinfo", str(info), "--out", str(tuned), "--config", str(cfg)],
                  capsys, caplog)
    assert rc == 2 and "min_hitz" in out and "invalid tracker section" in out


def test_a_text_file_is_not_taken_for_a_video(seq, tmp_path, capsys, caplog):
    """FFmpeg's text demuxer renders a text file as video frames: `export-mot --video det.txt` wrote
    labelled 'frames' of text, and a camera whose source was a text file showed as streaming."""
    from dishtrack.config import CameraConfig
    from dishtrack.service.ingest import CameraReader

    dets, _ = seq
    gt = DATA / "motmetrics_pkg_data" / "motmetrics" / "data" / "TUD-Campus" / "gt.txt"
    rc, out = cli(["export-mot", "--video", str(dets), "--gt", str(gt), "--out", str(tmp_path / "ds")], capsys, caplog)
    assert rc == 2 and f"{dets} is a text file, not a video" in out, out
    assert not (tmp_path / "ds").exists()
    reader = CameraReader(CameraConfig(id="c", source=str(dets))).start()
    try:
        reader._thread.join(10)
        st = reader.status().to_dict()
        assert st["state"] == "error" and "is a text file, not a video" in st["last_error"], st
    finally:
        reader.stop()
    # a real video still passes the check, and export-mot still works on it
    short_gt = tmp_path / "gt.txt"
    short_gt.write_text("".join(ln + "\n" for ln in gt.read_text().splitlines() if ln.split(",")[0] in ("1", "2")))
    rc, out = cli(["export-mot", "--video", str(VIDEO), "--gt", str(short_gt), "--out", str(tmp_path / "ds"),
                   "--every", "50"], capsys, caplog)
    assert rc == 0, out
    assert len((tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()) >= 1


@pytest.mark.parametrize("argv, flag", [
    (["shots", "--source", "v.mp4", "--n", "0", "--out", "o", "--checkpoint", "c.pt"], "--n"),
    (["shots", "--source", "v.mp4", "--n", "2", "--every", "0", "--out", "o", "--checkpoint", "c.pt"], "--every"),
    (["shots", "--source", "v.mp4", "--n", "2", "--dedup-distance", "-1", "--out", "o", "--checkpoint", "c.pt"],
     "--dedup-distance"),
    (["export-mot", "--video", str(VIDEO), "--gt", str(VIDEO), "--out", "o", "--every", "0"], "--every"),
    (["export-mot", "--video", str(VIDEO), "--gt", str(VIDEO), "--out", "o", "--label", ""], "--label"),
    (["make-video", "--data", "d", "--out", "o", "--trays", "1", "--fps", "inf"], "--fps"),
    (["make-video", "--data", "d", "--out", "o", "--trays", "0"], "--trays"),
    (["propose", "--checkpoint", "c.pt", "--images", "d", "--out", "o", "--min-score", "5"], "--min-score"),
    (["enrol", "--checkpoint", "c.pt", "--data", "d", "--out", "o.pt", "--val-fraction", "1.5"], "--val-fraction"),
    (["enrol", "--checkpoint", "c.pt", "--data", "d", "--out", "o.pt", "--epochs", "0"], "--epochs"),
    (["train", "--data", "d", "--out", "o.pt", "--val-fraction", "2"], "--val-fraction"),
])
def test_out_of_range_numbers_are_refused_naming_the_flag(argv, flag, capsys, caplog, tmp_path, monkeypatch):
    """Before: ZeroDivisionError (--every 0), OverflowError (--fps inf), exit 0 with nothing picked
    (--n 0), a checkpoint written with --val-fraction -0.5, pydantic's 'val_fraction' for train."""
    monkeypatch.chdir(tmp_path)
    rc, out = cli(argv, capsys, caplog)
    assert rc == 2 and flag in out and "Traceback" not in out, out


@pytest.mark.parametrize("cmd", [
    ["enrol", "--checkpoint", "c.pt", "--data", "d", "--out", "{dir}"],
    ["train", "--data", "d", "--out", "{dir}"],
    ["eval", "--data", "d", "--checkpoint", "c.pt", "--json", "{dir}"],
    ["eval", "--data", "d", "--checkpoint", "c.pt", "--json", "{file}/r.json"],
    ["track", "--dets", str(VIDEO), "--seqinfo", str(VIDEO), "--out", "{dir}"],
    ["check-data", "--data", "d", "--json", "{dir}"],
    ["propose", "--checkpoint", "c.pt", "--images", "d", "--out", "{file}"],
    ["shots", "--source", "v.mp4", "--n", "2", "--out", "{file}", "--checkpoint", "c.pt"],
    ["make-video", "--data", "d", "--out", "{file}", "--trays", "2"],
    ["export-mot", "--video", str(VIDEO), "--gt", str(VIDEO), "--out", "{file}"],
])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(cmd, capsys, caplog, tmp_path):
    """`enrol --out DIR` ran the whole enrolment, then failed renaming OUT.tmp onto the folder (leaving
    24 MB behind); `train` the same after ~10 minutes; `eval --json /tmp` wrote /tmp_confusion.png."""
    (tmp_path / "a_file").write_text("x")
    argv = [a.format(dir=tmp_path, file=tmp_path / "a_file") for a in cmd]
    rc, out = cli(argv, capsys, caplog)
    assert rc == 2 and "argument --" in out and "Traceback" not in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_hash_token_refuses_a_token_on_the_command_line(capsys, caplog):
    """`--token VALUE` was ignored and another, random token printed: the user's own token was not the
    one hashed. Only '-' (stdin) is taken; a token in argv would stay in the shell's history."""
    rc, out = cli(["hash-token", "--name", "pos1", "--token", "x" * 40], capsys, caplog)
    assert rc == 2 and "--token takes only '-'" in out and "token:" not in out


def test_a_dataset_with_no_usable_box_says_which_problems(tmp_path, capsys, caplog):
    """`eval` on photos whose class names differ in case from the checkpoint's said only 'no usable
    boxes in 6 images (12 problems)'; the problems were printed nowhere, not even by check-data."""
    from dishtrack.models.importers import load_dataset
    from dishtrack.models.sample import DatasetError

    data = tmp_path / "lower"
    (data / "imgs").mkdir(parents=True)
    (data / "obj.names").write_text((KIOSK / "obj.names").read_text().lower())
    for img in sorted((KIOSK / "labelled").glob("*.jpg"))[:3]:
        shutil.copy(img, data / "imgs")
        shutil.copy(img.with_suffix(".txt"), data / "imgs")
    names = [n.strip() for n in (KIOSK / "obj.names").read_text().splitlines() if n.strip()]
    with pytest.raises(DatasetError) as e:
        load_dataset(data, classes=names)
    assert "no usable boxes in 3 images" in str(e.value) and "differs only in case" in str(e.value)
    bad = tmp_path / "coco.json"
    bad.write_text(json.dumps({"images": "oops", "annotations": 5, "categories": None}))
    rc, out = cli(["check-data", "--data", str(bad)], capsys, caplog)  # was TypeError
    assert rc == 2 and f"{bad}: 'images' must be a list of objects" in out, out


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    from dishtrack.models.dish_detector import read_checkpoint

    for name, content in [("text.pt", "hello"), ("empty.pt", "")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=f"{name} is not a dishtrack checkpoint"):  # was '(101)', '()'
            read_checkpoint(tmp_path / name)
    with pytest.raises(ValueError, match="is a directory"):
        read_checkpoint(tmp_path)
    os.mkfifo(tmp_path / "fifo.pt")  # refused, not opened: torch.load would block reading it
    with pytest.raises(ValueError, match="fifo.pt is not a regular file"):
        read_checkpoint(tmp_path / "fifo.pt")


def site(tmp_path: Path, **extra) -> str:
    cfg = {"cameras": [{"id": "cam0", "source": str(VIDEO)}], "storage": {"sqlite_path": str(tmp_path / "e.db")},
           "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0], "p2": [0.5, 1]}}], **extra}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("menu, why", [
    (None, "cannot read the menu"),  # the menu path is a folder: was exit 0 (run: IsADirectoryError)
    ("", "the menu file is empty"),
    ("currency: EUR\nitems: {cup: {name: Coffee, price: -1}}\n", "items.cup.price"),
    ("currency: euro\n", "currency"),
])
def test_check_config_opens_the_menu_as_run_does(tmp_path, capsys, caplog, menu, why):
    """check-config exited 0 on every menu that run refuses; now it reads it (and the tokens file, and
    the detector checkpoint) as run does at startup."""
    path = tmp_path / "menu.yaml"
    if menu is None:
        path.mkdir()
    else:
        path.write_text(menu)
    rc, out = cli(["check-config", "--no-model", "--config", site(tmp_path, menu={"path": str(path)})], capsys, caplog)
    assert rc == 2 and str(path) in out and why in out, out


def test_check_config_checks_the_detector_the_tokens_file_and_camera_files(tmp_path, capsys, caplog):
    rc, out = cli(["check-config", "--no-model", "--config",
                   site(tmp_path, detector={"kind": "checkpoint", "checkpoint": str(tmp_path / "nope.pt")})],
                  capsys, caplog)
    assert rc == 2 and f"detector.checkpoint {tmp_path / 'nope.pt'} does not exist" in out, out
    rc, out = cli(["check-config", "--no-model", "--config",
                   site(tmp_path, auth={"tokens_file": str(tmp_path / "tokens.yaml")})], capsys, caplog)
    assert rc == 2 and "tokens.yaml" in out, out
    text_cam = tmp_path / "cam.txt"
    text_cam.write_text("not a video\n")
    cfg = yaml.safe_load(Path(site(tmp_path)).read_text())
    cfg["cameras"] = [{"id": "cam0", "source": str(tmp_path / "gone.mp4")}, {"id": "cam1", "source": str(text_cam)}]
    Path(tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    rc, out = cli(["check-config", "--no-model", "--config", str(tmp_path / "site.yaml")], capsys, caplog)
    assert rc == 1 and "camera cam0: source" in out and "does not exist" in out
    assert "camera cam1: source" in out and "is a text file, not a video" in out
    assert '"id": "cam1"' in out  # the resolved config is still printed


def test_check_config_and_run_warn_of_a_camera_no_zone_names(tmp_path, capsys, caplog):
    """A site config written from scratch without `zones:` was 'ready' (exit 0) and ran without a word,
    and never produced a checkout event (--config replaces the bundled default, zones included).
    check-config warns (exit 1) and run logs the same at startup; a camera only watched stays valid."""
    import logging

    from dishtrack.config import load_config
    from dishtrack.service.api import build_runtime

    rc, out = cli(["check-config", "--no-model", "--config", site(tmp_path)], capsys, caplog)
    assert rc == 0 and "site.yaml: ready to run" in out, out  # said, not only the exit status
    path = site(tmp_path, zones=[])  # the same file, now without zones
    rc, out = cli(["check-config", "--no-model", "--config", path], capsys, caplog)
    assert rc == 1 and "camera cam0: no zone (zones[].camera) names it" in out, out
    assert "runs, with 1 warning(s) above (exit 1)" in out
    caplog.clear()
    caplog.set_level(logging.WARNING)
    build_runtime(load_config(path))  # what `run` does before it serves
    assert any("camera cam0: no zone" in r.getMessage() for r in caplog.records), caplog.text


def test_check_config_tries_the_database_and_the_broker(tmp_path, capsys, caplog):
    """A storage.url or MQTT broker that cannot be reached was 'ready' (exit 0); run refuses the first at
    startup (exit 2) and starts despite the second (events wait in the outbox): check-config says so."""
    from conftest import free_port

    dead = free_port()
    rc, out = cli(["check-config", "--no-model", "--config",
                   site(tmp_path, storage={"url": f"postgresql://u:secretpw@127.0.0.1:{dead}/db"})], capsys, caplog)
    assert rc == 2 and f"storage.url postgresql://***@127.0.0.1:{dead}/db: cannot open the event database" in out, out
    assert "secretpw" not in out
    rc, out = cli(["check-config", "--no-model", "--config",
                   site(tmp_path, integrations={"mqtt": {"host": "127.0.0.1", "port": dead}})], capsys, caplog)
    assert rc == 1 and f"integrations.mqtt 127.0.0.1:{dead}: cannot connect" in out, out


def test_check_config_is_ready_with_a_reachable_database_and_writes_nothing(tmp_path, capsys, caplog, pg_url):
    import psycopg

    assert cli(["check-config", "--no-model", "--config", site(tmp_path, storage={"url": pg_url})], capsys,
               caplog)[0] == 0
    with psycopg.connect(pg_url) as c:  # not migrated: no tables made by a check
        assert c.execute("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0


def test_check_config_and_run_name_menu_labels_the_detector_does_not_have(tmp_path, capsys, caplog):
    """A menu keyed 'Cup' (the detector says 'cup') priced none of the detector's cups: every cup was
    unpriced, and nothing said why. check-config reads the detector's labels (no model built) and
    warns (exit 1); the pipeline logs the same at startup. A menu dish the detector does not know
    at all (put on the menu before it is enrolled) is only a note."""
    import logging

    from dishtrack.config import load_config
    from dishtrack.service.api import build_runtime

    menu = tmp_path / "menu.yaml"
    menu.write_text("currency: EUR\nitems: {Cup: {name: Coffee, price: 2.0}, bowl: {name: Soup, price: 3.0},"
                    " Pizza: {name: Pizza, price: 8.0}}\n")
    path = site(tmp_path, menu={"path": str(menu)}, detector={"classes": ["cup", "bowl"], "device": "cpu"})
    caplog.set_level(logging.INFO)
    rc, out = cli(["check-config", "--config", path], capsys, caplog)
    assert rc == 1, out
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "menu label 'Cup' is not a detector label, the detector says 'cup'" in warned
    assert "no price for the detector's 'cup'" in warned and "'bowl'" not in warned and "Pizza" not in warned
    assert "menu label 'Pizza' is not (yet) a detector label" in out
    menu.write_text("currency: EUR\nitems: {cup: {name: Coffee, price: 2.0}, bowl: {name: Soup, price: 3.0},"
                    " Pizza: {name: Pizza, price: 8.0}}\n")
    assert cli(["check-config", "--config", path], capsys, caplog)[0] == 0  # a note is not a warning
    menu.write_text("currency: EUR\nitems: {Cup: {name: Coffee, price: 2.0}, bowl: {name: Soup, price: 3.0}}\n")
    caplog.clear()
    build_runtime(load_config(path))  # what `run` does before it serves
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "menu" in r.getMessage()]
    assert any("the detector says 'cup'" in w for w in warned), warned


def test_check_config_does_what_run_does_with_checkpoints_and_special_files(tmp_path, capsys, caplog):
    """A stale detector.checkpoint under kind: centernet is ignored by run, so by check-config too;
    a camera source that is a FIFO is named, not opened (reading it would block)."""
    import os

    fifo = tmp_path / "cam.fifo"
    os.mkfifo(fifo)
    path = site(tmp_path, detector={"kind": "centernet", "checkpoint": str(tmp_path / "old.pt")})
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["cameras"].append({"id": "cam1", "source": str(fifo)})
    Path(path).write_text(yaml.safe_dump(cfg))
    rc, out = cli(["check-config", "--config", path], capsys, caplog)
    assert rc == 1 and f"camera cam1: source {fifo} is not a regular file" in out and "old.pt" not in caplog.text


def test_text_is_told_from_video_by_its_first_bytes(tmp_path):
    from dishtrack.models.shots import pick_shots
    from dishtrack.models.video_file import not_a_video

    assert not_a_video(VIDEO) is None
    cases = {"det.txt": (TUD / "det" / "det.txt").read_bytes(), "menu.csv": "caf\xe9,2.50\n".encode("cp1252") * 50,
             "notes.txt": "no video here\n".encode("utf-16"), "empty.mp4": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert not_a_video(tmp_path / name) is not None, name
    y4m = tmp_path / "raw.y4m"  # a text header, then raw frames: FFmpeg reads it as video
    y4m.write_bytes(b"YUV4MPEG2 W8 H8 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(96))
    assert not_a_video(y4m) is None
    with pytest.raises(ValueError, match="is a text file, not a video"):  # before the model is touched
        pick_shots(None, str(tmp_path / "det.txt"), tmp_path / "shots", 2)


def test_mot_files_with_comments_degenerate_ground_truth_or_from_a_pipe(tmp_path, caplog):
    """``#`` comments were read before (np.loadtxt) and still are; a ground-truth row without size is
    dropped with a warning (export-mot), a detection without size is an error; a FIFO is read once."""
    import os
    import threading

    from dishtrack.tracking.mot import read_mot

    rows = (TUD / "det" / "det.txt").read_text().splitlines()
    f = tmp_path / "c.txt"
    f.write_text("# frame,id,x,y,w,h,score\n" + rows[0] + "  # first\n" + "\n".join(rows[1:]) + "\n")
    assert read_mot(f).shape == (len(rows), 10)
    f.write_text("\n".join(rows[:3] + ["1,5,10,10,0,40,1,-1,-1,-1"] + rows[3:]) + "\n")
    with pytest.raises(ValueError, match=f"{f}:4: the box width and height must be > 0"):
        read_mot(f)
    assert len(read_mot(f, empty_boxes="drop")) == len(rows) and "1 rows without positive width" in caplog.text
    fifo = tmp_path / "det.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("\n".join(rows) + "\n"))
    writer.start()
    assert read_mot(fifo).shape == (len(rows), 10)
    writer.join(5)


def test_the_installed_command_prints_no_traceback_for_a_bad_seqinfo(seq, tmp_path):
    """The same through the console script, as a user runs it."""
    dets, info = seq
    info.write_text(SEQINFO.replace("frameRate=25\n", ""))
    r = subprocess.run(["dishtrack", "track", "--dets", str(dets), "--seqinfo", str(info), "--out",
                        str(tmp_path / "r.txt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "has no frameRate" in r.stderr, r.stderr


def test_run_says_at_once_when_it_cannot_listen(tmp_path, capsys, caplog):
    """`run --host 999.1.1.1` started the cameras, loaded the model, then printed uvicorn's bare
    '[Errno -2] Name or service not known'; a port in use the same way."""
    import socket

    rc, out = cli(["run", "--config", site(tmp_path), "--host", "999.1.1.1", "--allow-open"], capsys, caplog)
    assert rc == 2 and "api.host '999.1.1.1': cannot be resolved" in out, out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out = cli(["run", "--config", site(tmp_path), "--port", str(port)], capsys, caplog)
    assert rc == 2 and f"api.port {port}: cannot listen there (Address already in use)" in out, out
    assert "dish detector" not in out and "camera cam0" not in out  # nothing was started
