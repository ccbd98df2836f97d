"""A real PostgreSQL server for the tests: the session fixture ``postgres_url``.

``initdb`` in a temporary folder, ``pg_ctl start`` on a free port of 127.0.0.1 with its socket in
that folder, trust authentication for the ``postgres`` user; stopped and removed at the end of the
session. PostgreSQL refuses to run as root, so under root the server runs as ``nobody`` (the
folder is handed to it). Where ``initdb``/``pg_ctl`` cannot be found (Debian's ``postgresql``
package: ``.ci/run`` installs it) the tests that use it skip, saying so.

The fixture's value is the URL of an empty database (a ``str``), with helpers::

    def test_x(postgres_url):
        url = postgres_url.new_database()   # another empty database on the same server
        postgres_url.stop_postgres()        # the server goes down (fast shutdown) ...
        postgres_url.start_postgres()       # ... and comes back on the same port, data kept
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "postgres"
#: Where Debian puts the server's binaries (one folder per major version), besides PATH and /usr/local/bin.
DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"


def postgres_binaries() -> Path | str:
    """The folder holding ``initdb`` and ``pg_ctl``, or why there is none."""
    folders = []
    if found := shutil.which("initdb"):
        folders.append(Path(found).resolve().parent)
    folders.append(Path("/usr/local/bin"))
    folders += [Path(p) for p in sorted(glob.glob(DEBIAN_BINARIES), key=_major_version, reverse=True)]
    for folder in folders:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return (f"PostgreSQL's initdb/pg_ctl not found (PATH, /usr/local/bin, {DEBIAN_BINARIES}): "
            "install Debian's 'postgresql' package (.ci/run does)")


def _major_version(folder: str) -> int:
    version = Path(folder).parent.name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One throw-away PostgreSQL cluster in ``root`` (see the module's doc)."""

    def __init__(self, binaries: Path, root: Path) -> None:
        self.binaries = binaries
        self.root = root
        self.port = _free_port()
        self._names = itertools.count()
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # postgres will not run as root: hand the folder to nobody
            runuser = shutil.which("runuser") or shutil.which("setpriv")
            if runuser is None:
                raise RuntimeError("running as root, and neither runuser nor setpriv is here to run PostgreSQL "
                                   "as an unprivileged user")
            os.chown(root, 65534, 65534)
            self._as_user = ([runuser, "-u", "nobody", "--"] if runuser.endswith("runuser")
                             else [runuser, "--reuid=65534", "--regid=65534", "--clear-groups"])

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_user, str(self.binaries / tool), *args], cwd=self.root,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-3000:] if (
                self.root / "server.log").exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}{log}")

    def initialise(self) -> None:
        (self.root / "socket").mkdir()
        if self._as_user:
            os.chown(self.root / "socket", 65534, 65534)
        self._run("initdb", "-D", str(self.root / "data"), "-U", USER, "--auth=trust", "--locale=C",
                  "-E", "UTF8", "--no-sync")

    def start_postgres(self) -> None:
        """Starts the server on its port and waits until it accepts connections."""
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root / 'socket'} -c fsync=off"
        self._run("pg_ctl", "start", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"),
                  "-w", "-t", "60", "-o", options)

    def stop_postgres(self) -> None:
        """Stops the server (fast shutdown: open connections are cut) and waits until it is down."""
        self._run("pg_ctl", "stop", "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60")

    def running(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class PostgresUrl(str):
    """A database URL (use it as the string it is) that can also stop and restart its server."""

    server: PostgresServer

    def __new__(cls, url: str, server: PostgresServer) -> PostgresUrl:
        made = super().__new__(cls, url)
        made.server = server
        return made

    def stop_postgres(self) -> None:
        self.server.stop_postgres()

    def start_postgres(self) -> None:
        self.server.start_postgres()

    def new_database(self) -> str:
        return self.server.new_database()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[PostgresUrl]:
    """A running PostgreSQL server's empty database (see the module's doc); skips saying why where there is none."""
    binaries = postgres_binaries()
    if isinstance(binaries, str):
        pytest.skip(binaries)
    root = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
    try:
        server = PostgresServer(binaries, root)
        server.initialise()
        server.start_postgres()
        try:
            yield PostgresUrl(server.new_database(), server)
        finally:
            if server.running():
                server.stop_postgres()
    finally:
        shutil.rmtree(root, ignore_errors=True)
