"""A real PostgreSQL server for tests: its own data directory, port and socket directory.

The binaries are Debian's (``hack/postgres/install.sh``); the package's own cluster is never
used. :func:`running_postgres` runs ``initdb`` into a fresh directory, starts ``postgres`` on a
free port of 127.0.0.1 with password (SCRAM) authentication over TCP, creates a database and
yields its URL. PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user the package creates (or ``nobody``), in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kubeml._proc import free_port

#: initdb and the first start take a few seconds; CI machines are loaded.
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PostgresServer:
    """Handle on a running test PostgreSQL."""

    host: str
    port: int
    user: str
    password: str
    database: str
    log_file: Path

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database (the form MLflow's ``--backend-store-uri`` takes)."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def connect(self, database: str | None = None):  # noqa: ANN201 (psycopg's connection)
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database or self.database, connect_timeout=5)


def postgres_bin_dir() -> Path:
    """The directory of ``initdb`` and ``postgres``: PATH first, then Debian's newest version."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL's initdb is not installed; run `bash hack/postgres/install.sh` "
                           "(Debian's postgresql package) first")
    return Path(found[-1]).parent


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None (this one) unless this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, and neither a postgres nor a nobody account exists to run PostgreSQL")


@contextlib.contextmanager
def running_postgres(*, database: str = "kubeml", user: str = "kubeml") -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL, yield it once it accepts connections, stop and remove it.

    Raises ``RuntimeError`` with the log's tail when initdb fails, the server exits, or it
    does not answer within :data:`READY_TIMEOUT_S`.
    """
    bin_dir = postgres_bin_dir()
    account = _server_user()
    # Not under pytest's tmp_path: that is private to root, and the server's user must own
    # its directory (initdb and postgres check the data directory is theirs, mode 0700).
    root = Path(tempfile.mkdtemp(prefix="kubeml-postgres-"))
    data, sockets, log_file = root / "data", root / "sockets", root / "postgres.log"
    password = secrets.token_urlsafe(16)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    sockets.mkdir()
    os.chmod(root, 0o700)
    if account is not None:
        for path in (root, sockets, pwfile):
            os.chown(path, account.pw_uid, account.pw_gid)
    run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    proc: subprocess.Popen[bytes] | None = None
    try:
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}", "--auth-local=trust",
             "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-instructions"],
            capture_output=True, text=True, env=env, cwd=root, **run_as,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        port = free_port()
        with open(log_file, "wb") as log:
            if account is not None:
                os.chown(log_file, account.pw_uid, account.pw_gid)
            proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                 "-c", "listen_addresses=127.0.0.1",
                 # A test database: no fsync, and no more connections than tests open.
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=50"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True, **run_as,
            )
        server = PostgresServer("127.0.0.1", port, user, password, database, log_file)
        _wait_ready(server, proc)
        admin = server.connect("postgres")
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{database}"')
        finally:
            admin.close()
        yield server
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: roll back sessions, checkpoint, exit
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(server: PostgresServer, proc: subprocess.Popen[bytes]) -> None:
    import psycopg

    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{_tail(server.log_file)}")
        try:
            server.connect("postgres").close()
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept connections in {READY_TIMEOUT_S:.0f} s ({exc}):\n"
                                   f"{_tail(server.log_file)}") from exc
            time.sleep(0.2)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
