"""Labelled-data importers on the real kiosk tray photos: the shared YOLO folder, the same labels
converted to COCO / CVAT XML / Label Studio / manifest, and deliberately broken copies."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest

from conftest import DATA
from dishtrack.models.sample import DatasetError, Sample
from dishtrack.models.importers import Problem, load_dataset, write_coco

KIOSK = DATA / "mealtray_kiosk_dev"
NAMES = [ln.strip() for ln in (KIOSK / "obj.names").read_text().splitlines() if ln.strip()]
PICKS = [f"20220308112654_000042_059_0000000001_B______xx_C ({n}).jpg" for n in (1537, 1538, 1545, 1550, 1560)]


@pytest.fixture(scope="module")
def kiosk():
    return load_dataset(KIOSK)


def _copy_yolo(dst: Path, picks=PICKS) -> Path:
    (dst / "imgs").mkdir(parents=True)
    shutil.copy(KIOSK / "obj.names", dst / "obj.names")
    for name in picks:
        shutil.copy(KIOSK / "labelled" / name, dst / "imgs" / name)
        shutil.copy((KIOSK / "labelled" / name).with_suffix(".txt"), (dst / "imgs" / name).with_suffix(".txt"))
    rows = {r["image"]: r["tray"] for r in csv.DictReader((KIOSK / "trays.csv").open())}
    (dst / "trays.csv").write_text("image,tray\n" + "".join(f"{n},{rows[n]}\n" for n in picks))
    return dst


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4 real photos as a YOLO folder and, next to it, as exports of the other formats."""
    root = tmp_path_factory.mktemp("small")
    yolo = _copy_yolo(root / "yolo", PICKS[:4])
    ref = load_dataset(yolo)
    exp = root / "exports"
    (exp / "images").mkdir(parents=True)
    for s in ref.samples:
        shutil.copy(s.image, exp / "images" / s.image.name)
    shutil.copy(yolo / "trays.csv", exp / "trays.csv")
    sizes = {}
    write_coco([_moved(s, exp) for s in ref.samples], ref.classes, exp / "coco.json")
    for im in json.loads((exp / "coco.json").read_text())["images"]:
        sizes[Path(im["file_name"]).name] = (im["width"], im["height"])
    _write_cvat(ref, sizes, exp / "annotations.xml")
    _write_labelstudio(ref, sizes, exp / "ls.json")
    _write_labelstudio_min(ref, sizes, exp / "ls_min.json")
    with (exp / "manifest.jsonl").open("w") as f:
        for s in ref.samples:
            f.write(json.dumps({"image": f"images/{s.image.name}", "boxes": s.boxes.tolist(),
                                "labels": list(s.labels)}) + "\n")
    return ref, exp


def _moved(s, exp):


    return Sample(exp / "images" / s.image.name, s.boxes, s.labels, s.group)


def _write_cvat(ref, sizes, out: Path) -> None:
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>",
             "  <meta>", "    <task>", "      <labels>"]
    for c in ref.classes:
        lines += ["        <label>", f"          <name>{c}</name>", "          <color>#fa3253</color>",
                  "        </label>"]
    lines += ["      </labels>", "    </task>", "  </meta>"]
    for i, s in enumerate(ref.samples):
        w, h = sizes[s.image.name]
        lines.append(f'  <image id="{i}" name="{s.image.name}" width="{w}" height="{h}">')
        for b, lbl in zip(s.boxes.tolist(), s.labels):
            lines.append(f'    <box label="{lbl}" source="manual" occluded="0" xtl="{b[0]!r}" ytl="{b[1]!r}" '
                         f'xbr="{b[2]!r}" ybr="{b[3]!r}" z_order="0">')
            lines.append("    </box>")
        lines.append("  </image>")
    lines.append("</annotations>")
    out.write_text("\n".join(lines) + "\n")


def _ls_value(b, w, h, lbl):
    return {"x": b[0] / w * 100, "y": b[1] / h * 100, "width": (b[2] - b[0]) / w * 100,
            "height": (b[3] - b[1]) / h * 100, "rotation": 0, "rectanglelabels": [lbl]}


def _ls_upload(name: str, i: int) -> str:  # LS renames uploads to "<8 hex>-<name>"
    return f"/data/upload/3/{i:08x}-{quote(name)}"


def _write_labelstudio(ref, sizes, out: Path) -> None:
    tasks = []
    for i, s in enumerate(ref.samples):
        w, h = sizes[s.image.name]
        res = [{"id": f"r{k}", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "original_width": w, "original_height": h, "image_rotation": 0,
                "value": _ls_value(b, w, h, lbl)} for k, (b, lbl) in enumerate(zip(s.boxes.tolist(), s.labels))]
        tasks.append({"id": 100 + i, "data": {"image": _ls_upload(s.image.name, 0xa1b2c3d0 + i)},
                      "annotations": [{"id": 500 + i, "was_cancelled": False, "ground_truth": False, "result": res}],
                      "predictions": [{"id": 9, "result": res[:1]}]})
    out.write_text(json.dumps(tasks))


def _write_labelstudio_min(ref, sizes, out: Path) -> None:
    tasks = []
    for i, s in enumerate(ref.samples):
        w, h = sizes[s.image.name]
        tasks.append({"image": _ls_upload(s.image.name, 0xa1b2c3d0 + i), "id": 100 + i, "annotator": 1,
                      "label": [dict(_ls_value(b, w, h, lbl), original_width=w, original_height=h)
                                for b, lbl in zip(s.boxes.tolist(), s.labels)]})
    out.write_text(json.dumps(tasks))


def _by_name(data):
    return {s.image.name: s for s in data.samples}


# ---------------------------------------------------------------- the real shared folder


def test_real_yolo_folder_counts_match_a_direct_count(kiosk):
    direct = Counter()
    for txt in (KIOSK / "labelled").glob("*.txt"):
        direct.update(NAMES[int(ln.split()[0])] for ln in txt.read_text().splitlines() if ln.strip())
    trays = {r["tray"] for r in csv.DictReader((KIOSK / "trays.csv").open())}
    assert kiosk.format == "yolo"
    assert kiosk.classes == tuple(NAMES) and len(NAMES) == 8
    assert len(kiosk.samples) == 288
    assert kiosk.problems == ()
    assert kiosk.boxes_per_class() == {c: direct[c] for c in NAMES}
    assert sum(direct.values()) == 941
    assert {s.group for s in kiosk.samples} == trays and len(trays) == 62
    for s in kiosk.samples:
        assert s.boxes.dtype == np.float32 and s.boxes.shape == (len(s.labels), 4)
        assert np.all(s.boxes[:, 2:] > s.boxes[:, :2])


# ---------------------------------------------------------------- the same labels in every format


@pytest.mark.parametrize("export", ["coco.json", "annotations.xml", "ls.json", "ls_min.json", "manifest.jsonl", "."])
def test_every_format_gives_the_same_samples(small, export):
    ref, exp = small
    got = load_dataset(exp / export)
    assert got.problems == ()
    assert got.format == {"coco.json": "coco", "annotations.xml": "cvat", "ls.json": "labelstudio",
                          "ls_min.json": "labelstudio", "manifest.jsonl": "manifest", ".": "manifest"}[export]
    if export.startswith(("ls", "man", ".")):  # no class list in the file: the labels used, sorted
        assert got.classes == tuple(sorted({lbl for s in ref.samples for lbl in s.labels}))
    else:
        assert got.classes == ref.classes
    a, b = _by_name(ref), _by_name(got)
    assert a.keys() == b.keys() and len(a) == 4
    for name, s in a.items():
        assert b[name].image == exp / "images" / name
        assert b[name].labels == s.labels
        assert b[name].group == s.group is not None
        np.testing.assert_allclose(b[name].boxes, s.boxes, atol=1e-3)


def test_coco_folder_layout_and_checkpoint_classes(small, tmp_path):
    ref, exp = small
    (tmp_path / "annotations").mkdir()
    shutil.copytree(exp / "images", tmp_path / "images")
    doc = json.loads((exp / "coco.json").read_text())
    (tmp_path / "annotations" / "instances_default.json").write_text(json.dumps(doc))
    got = load_dataset(tmp_path, classes=["Plate", "Drink", "Pizza"])
    assert got.format == "coco" and got.classes == ("Plate", "Drink", "Pizza")
    n_other = sum(lbl not in ("Plate", "Drink") for s in ref.samples for lbl in s.labels)
    assert n_other and len(got.problems) == n_other
    assert {p.kind for p in got.problems} == {"unknown-class"} and {p.action for p in got.problems} == {"dropped box"}
    assert all(set(s.labels) <= {"Plate", "Drink"} for s in got.samples)
    scored = write_coco(ref.samples, ref.classes, tmp_path / "dets.json",
                        scores=[np.linspace(1, 0.5, len(s.labels)) for s in ref.samples])
    anns = json.loads(scored.read_text())["annotations"]
    assert len(anns) == sum(len(s.labels) for s in ref.samples) and anns[0]["score"] == 1.0
    assert _by_name(load_dataset(scored)).keys() == _by_name(ref).keys()


def test_cvat_yolo_1_1_and_ultralytics_layouts(small, tmp_path):
    ref, _ = small
    cv = tmp_path / "cvat_yolo"  # CVAT "YOLO 1.1" export with images
    (cv / "obj_train_data").mkdir(parents=True)
    shutil.copy(KIOSK / "obj.names", cv / "obj.names")
    (cv / "obj.data").write_text("classes = 8\ntrain = data/train.txt\nnames = data/obj.names\nbackup = backup/\n")
    ul = tmp_path / "ultra"  # Ultralytics: images/<subset>/, labels/<subset>/, data.yaml
    (ul / "images" / "train").mkdir(parents=True)
    (ul / "labels" / "train").mkdir(parents=True)
    (ul / "data.yaml").write_text("path: ./\ntrain: train.txt\nnames:\n" + "".join(
        f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    for s in ref.samples:
        shutil.copy(s.image, cv / "obj_train_data" / s.image.name)
        shutil.copy(s.image.with_suffix(".txt"), cv / "obj_train_data" / s.image.with_suffix(".txt").name)
        shutil.copy(s.image, ul / "images" / "train" / s.image.name)
        shutil.copy(s.image.with_suffix(".txt"), ul / "labels" / "train" / s.image.with_suffix(".txt").name)
    (cv / "train.txt").write_text("".join(f"data/obj_train_data/{s.image.name}\n" for s in ref.samples))
    (ul / "train.txt").write_text("".join(f"images/train/{s.image.name}\n" for s in ref.samples))
    for root in (cv, ul):
        got = load_dataset(root)
        assert got.format == "yolo" and got.problems == () and got.classes == ref.classes
        a, b = _by_name(ref), _by_name(got)
        assert a.keys() == b.keys()
        for name, s in a.items():
            assert b[name].labels == s.labels and b[name].group is None
            np.testing.assert_array_equal(b[name].boxes, s.boxes)
    assert load_dataset(cv / "obj.data").format == "yolo"


# ---------------------------------------------------------------- broken data


def test_broken_yolo_folder_reports_each_problem_with_file_and_line(tmp_path):
    d = _copy_yolo(tmp_path / "ds")
    img = [d / "imgs" / n for n in PICKS]
    img[0].unlink()  # label file without image
    img[1].write_bytes(b"not a jpeg at all")  # undecodable
    img[2].write_bytes(img[2].read_bytes()[:5000])  # truncated JPEG
    img[3].with_suffix(".txt").unlink()  # image without labels
    txt = img[4].with_suffix(".txt")
    good = txt.read_text().splitlines()
    txt.write_text("\n".join(good + [
        "9 0.5 0.5 0.1 0.1",  # class id out of range
        "0 0.5 abc 0.1 0.1",  # not a number
        "3 0.5 0.5",  # wrong field count
        "1 0.95 0.5 0.2 0.2",  # partly outside: clipped
        "2 1.5 1.5 0.1 0.1",  # fully outside: dropped
        good[0],  # duplicate of line 1
        "4 0.5 0.5 0 0.1",  # degenerate
    ]) + "\n")
    n = len(good)
    got = load_dataset(d)
    seen = {(Path(p.file).name, p.line, p.kind, p.action) for p in got.problems}
    assert seen == {
        (img[0].with_suffix(".txt").name, None, "missing-image", "skipped label file"),
        (img[1].name, None, "unreadable-image", "skipped image"),
        (img[2].name, None, "unreadable-image", "skipped image"),
        (img[3].name, None, "missing-label", "skipped image"),
        (txt.name, n + 1, "unknown-class", "skipped line"),
        (txt.name, n + 2, "malformed-line", "skipped line"),
        (txt.name, n + 3, "malformed-line", "skipped line"),
        (txt.name, n + 4, "clipped-box", "clipped box to image"),
        (txt.name, n + 5, "outside-box", "skipped line"),
        (txt.name, n + 6, "duplicate-box", "dropped box"),
        (txt.name, n + 7, "degenerate-box", "skipped line"),
    }
    assert len(got.problems) == len(seen)
    assert next(p.message for p in got.problems if p.file.endswith(img[2].name)) == "image cannot be decoded"
    assert "duplicate of line 1" in next(p.message for p in got.problems if p.kind == "duplicate-box")
    assert str(next(p for p in got.problems if p.line == n + 1)) == \
        f"{txt}:{n + 1}: class id 9 out of range (0..7) -> skipped line"
    (s,) = got.samples
    assert s.image == img[4] and len(s.labels) == n + 1 and s.labels[-1] == "Starter"
    h, w = cv2.imread(str(img[4])).shape[:2]
    assert s.boxes[-1].tolist() == pytest.approx([0.85 * w, 0.4 * h, w, 0.6 * h], abs=1e-3)


def test_case_only_class_differences_are_reported_not_added(small, tmp_path):
    ref, exp = small
    shutil.copytree(exp / "images", tmp_path / "images")
    xml = (exp / "annotations.xml").read_text().splitlines()
    k = next(i for i, ln in enumerate(xml) if 'label="Plate"' in ln)
    xml[k] = xml[k].replace('label="Plate"', 'label="plate"')
    (tmp_path / "annotations.xml").write_text("\n".join(xml) + "\n")
    tasks = json.loads((exp / "ls.json").read_text())
    tasks[0]["annotations"][0]["result"][0]["value"]["rectanglelabels"] = ["plate "]
    first = tasks[0]["annotations"][0]["result"][0]["value"]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    n_plate = sum(lbl == "Plate" for s in ref.samples for lbl in s.labels)

    cv = load_dataset(tmp_path / "annotations.xml")
    (p,) = cv.problems
    assert (p.file, p.line, p.kind, p.action) == (str(tmp_path / "annotations.xml"), k + 1, "class-case", "dropped box")
    assert p.message == "class 'plate' differs only in case/whitespace from 'Plate' (did you mean 'Plate'?)"
    assert cv.classes == ref.classes and cv.boxes_per_class()["Plate"] == n_plate - 1

    ls = load_dataset(tmp_path / "ls.json")
    (p,) = ls.problems
    assert p.kind == "class-case" and "'plate ' differs only in case/whitespace from 'Plate'" in p.message
    assert "plate " not in ls.classes and ls.boxes_per_class()["Plate"] == n_plate - 1
    assert first["rectanglelabels"] == ["plate "]


def test_label_studio_cancelled_and_unlabelled_tasks_are_reported(small, tmp_path):
    ref, exp = small
    shutil.copytree(exp / "images", tmp_path / "images")
    tasks = json.loads((exp / "ls.json").read_text())
    tasks[0]["annotations"][0]["was_cancelled"] = True
    tasks[1]["annotations"] = []
    tasks[2]["data"]["image"] = "/data/upload/3/deadbeef-missing.jpg"
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    got = load_dataset(tmp_path / "ls.json")
    assert [(p.kind, p.action) for p in got.problems] == [
        ("unlabelled", "skipped image"), ("unlabelled", "skipped image"), ("missing-image", "skipped image")]
    assert "cancelled" in got.problems[0].message and "only predictions" in got.problems[1].message
    assert len(got.samples) == 1


def test_trays_argument_and_images_without_a_tray(small, tmp_path):
    ref, exp = small
    names = sorted(s.image.name for s in ref.samples)
    (tmp_path / "t.csv").write_text(f"image,tray\n{names[0]},7\n{names[1]},7\n{names[2]}\n")
    got = load_dataset(exp / "coco.json", trays=tmp_path / "t.csv")
    assert {s.image.name: s.group for s in got.samples} == {names[0]: "7", names[1]: "7", names[2]: None,
                                                            names[3]: None}
    assert sorted((Path(p.file).name, p.line, p.kind) for p in got.problems) == sorted(
        [("t.csv", 4, "malformed-line"), (names[2], None, "no-tray"), (names[3], None, "no-tray")])
    with pytest.raises(DatasetError, match="trays file not found"):
        load_dataset(exp / "coco.json", trays=tmp_path / "missing.csv")


def test_tray_rows_naming_no_image_or_two_trays_are_reported(small, tmp_path):
    """A trays.csv row whose image the dataset does not have (a typo, a photo removed) was silently
    ignored, and an image listed twice took its last tray: both change which photos travel together
    into validation, and check-data said nothing."""
    ref, exp = small
    names = sorted(s.image.name for s in ref.samples)
    (tmp_path / "t.csv").write_text(f"image,tray\n{names[0]},7\n{names[1]},7\n{names[0]},8\n{names[1]},7\n"
                                    f"{names[2]},9\n{names[3]},9\ngone (1537).jpg,9\n")
    got = load_dataset(exp / "coco.json", trays=tmp_path / "t.csv")
    assert {s.image.name: s.group for s in got.samples} == {names[0]: "7", names[1]: "7", names[2]: "9",
                                                            names[3]: "9"}  # the first row of an image holds
    assert sorted((Path(p.file).name, p.line, p.kind) for p in got.problems) == [
        ("t.csv", 4, "tray-conflict"), ("t.csv", 8, "tray-unknown-image")]
    text = [str(p) for p in sorted(got.problems, key=lambda p: p.line)]
    assert f"{names[0]} is listed with tray 8, and with tray 7 on line 2" in text[0] and "line ignored" in text[0]
    assert "gone (1537).jpg is not in the dataset" in text[1]


def test_tray_rows_of_an_image_the_annotations_name_but_that_is_missing(small, tmp_path):
    """Found by review: with a trays.csv, a COCO image entry whose file is missing crashed the check
    (AttributeError on the unresolved image) instead of reporting the missing image."""
    ref, exp = small
    coco = json.loads((exp / "coco.json").read_text())
    coco["images"][0]["file_name"] = "images/gone.jpg"
    (tmp_path / "images").mkdir()
    for im in coco["images"][1:]:
        shutil.copy(exp / im["file_name"], tmp_path / im["file_name"])
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    names = [Path(im["file_name"]).name for im in coco["images"]]
    (tmp_path / "trays.csv").write_text("image,tray\n" + "".join(f"{n},1\n" for n in names))
    got = load_dataset(tmp_path / "coco.json")
    assert len(got.samples) == 3
    assert [p.kind for p in got.problems] == ["missing-image"], [str(p) for p in got.problems]


def test_unusable_inputs_raise_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no labelled data recognised"):
        load_dataset(tmp_path)
    (tmp_path / "obj.names").write_text("Plate\n")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="no usable images"):
        load_dataset(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json: cannot read JSON"):
        load_dataset(tmp_path / "bad.json")


def test_problem_str():
    assert str(Problem("a/b.txt", 3, "bad", "skipped line")) == "a/b.txt:3: bad -> skipped line"
    assert str(Problem("a/b.jpg", None, "bad", "skipped image")) == "a/b.jpg: bad -> skipped image"


# ---------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dishtrack.service.cli", "check-data", *args],
                          capture_output=True, text=True, timeout=60)


def test_check_data_cli_exit_codes(small, tmp_path):
    ref, exp = small
    ok = _cli("--data", str(exp / "annotations.xml"), "--json", str(tmp_path / "ok.json"))
    assert ok.returncode == 0, ok.stderr
    assert "format:   cvat" in ok.stdout and "images:   4" in ok.stdout and "problems: 0" in ok.stdout
    rep = json.loads((tmp_path / "ok.json").read_text())
    assert rep["usable"] and rep["boxes_per_class"] == ref.boxes_per_class() and rep["trays"] == len(
        {s.group for s in ref.samples})

    bad = _copy_yolo(tmp_path / "bad", PICKS[:2])
    txt = (bad / "imgs" / PICKS[0]).with_suffix(".txt")
    txt.write_text(txt.read_text() + "7 0.5 0.5\n")
    r = _cli("--data", str(bad), "--json", str(tmp_path / "bad.json"))
    assert r.returncode == 1, r.stderr
    line = len(txt.read_text().splitlines())
    assert f"{txt}:{line}: expected 5 fields" in r.stdout and "malformed-line" in r.stdout
    assert json.loads((tmp_path / "bad.json").read_text())["problems"][0]["line"] == line

    (tmp_path / "empty").mkdir()
    r = _cli("--data", str(tmp_path / "empty"))
    assert r.returncode == 2 and "unusable:" in r.stdout


def test_a_class_listed_twice_in_obj_names_is_one_class(tmp_path):
    """obj.names with 'Plate' twice: boxes of either id are Plate, and the check says so (it said 'differs
    only in case/whitespace from Plate -> kept as separate classes', which was neither)."""
    yolo = _copy_yolo(tmp_path / "dup", PICKS[:2])
    names = (yolo / "obj.names").read_text().splitlines() + ["Plate"]
    (yolo / "obj.names").write_text("\n".join(names) + "\n")
    plate, dup = NAMES.index("Plate"), len(names) - 1
    txt = (yolo / "imgs" / PICKS[0]).with_suffix(".txt")
    lines = txt.read_text().splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.split()[0] == str(plate))
    lines[k] = " ".join([str(dup)] + lines[k].split()[1:])
    txt.write_text("\n".join(lines) + "\n")
    ref = load_dataset(_copy_yolo(tmp_path / "ref", PICKS[:2]))
    data = load_dataset(yolo)
    (p,) = data.problems
    assert p.kind == "class-duplicate" and p.message == "class 'Plate' is listed twice"
    assert p.action == "one class: boxes of either id are 'Plate'"
    assert data.classes == ref.classes and data.boxes_per_class() == ref.boxes_per_class()
