"""Real PostgreSQL and mosquitto servers from the Debian packages (``postgresql``,
``mosquitto``; tests/run.sh installs them), started in a temporary folder on a
free port. Used by the integration tests and bench/store_benchmark.py."""
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
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: saves the persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
