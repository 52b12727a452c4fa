"""Real servers for the tests, each started in a temporary folder on a free port: PostgreSQL and
mosquitto from the Debian packages (``postgresql``, ``mosquitto``), Label Studio from PyPI
(``label-studio``); tests/run.sh installs them. Also used by bench/store_benchmark.py."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

def _pg_bin() -> Path:
    """DISHTRACK_PG_BIN, else the newest /usr/lib/postgresql/<major>/bin (Debian's layout)."""
    if env := os.environ.get("DISHTRACK_PG_BIN"):
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if _port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start:\n{log.read_text() if log.exists() else ''}")


def stop_process(proc: subprocess.Popen | None, grace_s: float, kill_wait_s: float = 10.0) -> None:
    """SIGTERM (a server's clean shutdown), SIGKILL if it is not gone within ``grace_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(kill_wait_s)


def pg_missing() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL binaries not found in {PG_BIN} (Debian package postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run PostgreSQL as"
    return None


def mosquitto_missing() -> str | None:
    return None if Path(MOSQUITTO).exists() else "mosquitto not installed (Debian package mosquitto)"


class PgServer:
    """initdb + postgres on 127.0.0.1:<free port>, trust auth, fsync off (a test cluster). PostgreSQL
    refuses to run as root, so as root it runs as the ``postgres`` user."""

    def __init__(self, fsync: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dishtrack-pg-"))  # not pytest's 0700 tmp: postgres must enter
        self.data, self.log = self.dir / "data", self.dir / "postgres.log"
        self.port = free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> "PgServer":
        if not self.data.exists():
            subprocess.run([*self._as, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                            "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            [*self._as, str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
             "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "max_connections=100"],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        _wait_port(self.port, 60, self.proc, self.log)
        import psycopg

        end = time.time() + 30
        while True:  # the port opens a moment before connections are accepted
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if time.time() > end:
                    raise
                time.sleep(0.1)

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # fast shutdown; through pg_ctl: as root the child is runuser, which does not pass SIGINT on
            subprocess.run([*self._as, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast", "-w"],
                           capture_output=True, timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Mosquitto:
    """mosquitto on 127.0.0.1:<port>, anonymous, with persistence (a subscriber's session and its
    queued QoS 1 messages survive a broker restart, as in a real deployment)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf, self.log = self.dir / "mosquitto.conf", self.dir / "mosquitto.log"
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {self.dir}/\nautosave_interval 1\nuser {user}\n"
                             f"log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=open(self.log, "a"),
                                     stderr=subprocess.STDOUT)
        _wait_port(self.port, 20, self.proc, self.log)
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10, 5)  # SIGTERM: saves the persistence file


# Label Studio (PyPI ``label-studio``, pinned in tests/run.sh) lives in its own virtual environment:
# it is a Django application with its own pins, and a labelling tool next to the service, not a
# dependency of it.
LABEL_STUDIO_VENV = Path(__file__).resolve().parent / ".labelstudio"


def label_studio_exe() -> str | None:
    """DISHTRACK_LABEL_STUDIO, else tests/.labelstudio (made by tests/run.sh), else PATH."""
    if env := os.environ.get("DISHTRACK_LABEL_STUDIO"):
        return env
    venv = LABEL_STUDIO_VENV / "bin" / "label-studio"
    return str(venv) if venv.exists() else shutil.which("label-studio")


def label_studio_missing() -> str | None:
    return None if label_studio_exe() else (
        "label-studio not installed (tests/run.sh puts it in tests/.labelstudio; or set DISHTRACK_LABEL_STUDIO)")


class LabelStudio:
    """A real Label Studio on 127.0.0.1:<free port> with its own SQLite data folder, one admin user
    and a fixed API token, serving local files under ``document_root`` (as the README tells an
    operator to run it for ``dishtrack propose`` output). Nothing leaves the machine: the version
    check, usage analytics and Sentry error reports are off."""

    TOKEN = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, workdir: Path, document_root: Path) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(document_root)
        self.port = free_port()
        self.log = self.dir / "label-studio.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "LabelStudio":
        import httpx

        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(self.dir / "data"),
               "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(self.root),
               "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
               "COLLECT_ANALYTICS": "false", "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
               "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
        self._log_file = open(self.log, "a")
        self.proc = subprocess.Popen(
            [label_studio_exe(), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
             "--username", "admin@example.com", "--password", "dishtrack-test", "--user-token", self.TOKEN,
             "--enable-legacy-api-token"], env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        try:
            end = time.time() + timeout  # first start migrates its database: ~25 s on 2 cores
            while time.time() < end and self.proc.poll() is None:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            raise RuntimeError(f"Label Studio did not start:\n{self.log.read_text()[-3000:]}")
        except BaseException:  # a timeout or ^C while waiting: never leave it running
            self.stop()
            raise

    def client(self):
        import httpx

        return httpx.Client(base_url=self.url, headers={"Authorization": f"Token {self.TOKEN}"}, timeout=60)

    def stop(self) -> None:
        stop_process(self.proc, 20)
        if getattr(self, "_log_file", None):
            self._log_file.close()
