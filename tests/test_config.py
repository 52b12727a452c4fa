import subprocess

import pytest
import yaml

from dishtrack.config import ConfigError, load_config


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_default_config_points_at_shipped_sample_and_model():
    cfg = load_config()
    assert cfg.cameras[0].source.endswith("sample_tud_campus.mp4")
    from pathlib import Path

    assert Path(cfg.cameras[0].source).is_file()
    assert cfg.detector.kind == "centernet"
    assert cfg.storage.sqlite_path.endswith(".sqlite3")


@pytest.mark.parametrize("data, field", [
    ({"cameras": [{"id": "a", "source": "x.mp4", "fps_typo": 3}]}, "cameras.0.fps_typo"),
    ({"cameras": [{"id": "a", "source": "x.mp4"}], "tracker": {"max_age": 0}}, "tracker.max_age"),
    ({"cameras": [{"id": "a", "source": "x.mp4"}], "detector": {"score_threshold": 2}}, "detector.score_threshold"),
    ({"cameras": []}, "cameras"),
    ({"cameras": [{"id": "a", "source": "x.mp4"}],
      "zones": [{"id": "z", "camera": "nope", "line": {"p1": [0, 0], "p2": [1, 1]}}]}, "unknown camera 'nope'"),
    ({"cameras": [{"id": "a", "source": "x.mp4"}],
      "zones": [{"id": "z", "camera": "a", "line": {"p1": [0, 0], "p2": [1.5, 1]}}]}, "zones.0.line.p2"),
    ({"cameras": [{"id": "a", "source": "x"}, {"id": "a", "source": "y"}]}, "camera ids must be unique"),
    ({"cameras": [{"id": "a", "source": "x"}], "detector": {"kind": "checkpoint"}}, "detector.checkpoint"),
])
def test_bad_config_names_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    assert field in str(e.value)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "cameras: [unclosed"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_cli_exits_nonzero_naming_the_field(tmp_path):
    path = write(tmp_path, {"cameras": [{"id": "a", "source": "x.mp4"}], "api": {"port": 99999}})
    r = subprocess.run(["dishtrack", "run", "--config", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "api.port" in r.stderr
    ok = subprocess.run(["dishtrack", "check-config"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and '"cam0"' in ok.stdout


def test_the_default_service_starts_without_the_postgresql_driver(tmp_path):
    """README's first command installs the package without extras (no psycopg): the app for the
    embedded default must build; PostgreSQL modules load only when storage.url names a server."""
    import sys

    code = ("import sys; sys.modules['psycopg'] = None\n"  # as if not installed: its import fails
            "from dishtrack.config import AppConfig\n"
            "from dishtrack.service.api import build_runtime, create_app\n"
            "cfg = AppConfig.model_validate({'cameras': [{'id': 'cam0', 'source': 'builtin:sample_tud_campus.mp4'}],\n"
            "                               'storage': {'sqlite_path': sys.argv[1]}})\n"
            "create_app(build_runtime(cfg)); print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "e.sqlite3")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
