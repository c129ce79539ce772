"""A PostgreSQL server for the tests: ``MM_TEST_DATABASE_URL``, or a throwaway cluster.

Without ``MM_TEST_DATABASE_URL``, :func:`start_server` runs ``initdb`` and ``pg_ctl`` from the
Debian packages (``/usr/lib/postgresql/<version>/bin``) in a fresh temporary directory: the
server listens only on a Unix socket in that directory (no TCP port, so parallel test sessions
cannot collide), trusts local connections, and trades durability for speed (``fsync=off``).
As root it runs as the ``postgres`` user (PostgreSQL refuses to run as root). The fixture in
``conftest.py`` stops and removes it at the end of the session.

Each test gets a schema of its own (``new_schema``): a URL whose ``search_path`` names it, so
a store opened on it creates its tables there and tests never see each other's rows. Schemas
need only the CREATE privilege on the database, so a given server works too. A watchdog process
stops a cluster whose test session was killed before it could (a timeout, Ctrl-C twice).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

TEST_URL_ENV = "MM_TEST_DATABASE_URL"
#: Debian's layout: one directory per major version.
BINARIES_GLOB = "/usr/lib/postgresql/*/bin"
CLUSTER_USER = "postgres"
PORT = 5432  # only names the socket file: the server has no TCP listener


class Unavailable(Exception):
    """No server can be had here (the reason is the skip message)."""


def find_binaries() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` directory that has ``initdb`` and ``pg_ctl``."""
    found = [Path(d) for d in glob.glob(BINARIES_GLOB) if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file()]

    def major(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    return max(found, key=major) if found else None


def _as_user_prefix() -> tuple[list[str], str | None]:
    """The command prefix that drops root to :data:`CLUSTER_USER` (``runuser`` or ``setpriv``), and that user."""
    if os.geteuid() != 0:
        return [], None
    try:
        pwd.getpwnam(CLUSTER_USER)
    except KeyError as exc:
        raise Unavailable(f"running as root and there is no {CLUSTER_USER!r} user to run PostgreSQL as") from exc
    if shutil.which("runuser"):
        return ["runuser", "-u", CLUSTER_USER, "--"], CLUSTER_USER
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={CLUSTER_USER}", f"--regid={CLUSTER_USER}", "--init-groups"], CLUSTER_USER
    raise Unavailable("running as root and neither runuser nor setpriv exists to start PostgreSQL as another user")


#: Run beside the test session: once the session's process is gone (killed by a timeout, say,
#: so its fixtures never tore down), stop the cluster and remove its directory.
_WATCHDOG = """
import json, os, shutil, subprocess, sys, time
parent, root, stop = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
while True:
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    except PermissionError:
        pass
    time.sleep(1.0)
subprocess.run(stop, capture_output=True, timeout=120, cwd=root)
shutil.rmtree(root, ignore_errors=True)
"""


@dataclass
class Cluster:
    """A running throwaway cluster in ``root`` (``data/``, the socket, ``server.log``)."""

    root: Path
    bin_dir: Path
    prefix: list[str] = field(default_factory=list)
    watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={quote(str(self.root), safe='')}&port={PORT}"

    def _run(self, *args: str) -> None:
        # cwd: the server's user may not be allowed into the directory pytest runs in
        done = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise Unavailable(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}\n{tail}")

    def start(self) -> None:
        data = self.root / "data"
        stop = [*self.prefix, *self._stop_command()]
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.root), json.dumps(stop)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self._run(str(self.bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        options = (
            f"-k {self.root} -p {PORT} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"), "-o", options, "-w", "-t", "60", "start")

    def _stop_command(self) -> list[str]:
        return [str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"]

    def stop(self) -> None:
        try:
            self._run(*self._stop_command())
        except (Unavailable, OSError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait()


@dataclass
class Server:
    """Where the tests' databases live: an admin URL, and the cluster when we started one."""

    url: str
    cluster: Cluster | None = None

    def new_schema(self) -> tuple[str, str]:
        """A fresh schema: ``(its name, a URL whose search_path is that schema)``."""
        import psycopg

        name = f"mm_test_{secrets.token_hex(6)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        sep = "&" if "?" in self.url else "?"
        return name, f"{self.url}{sep}options={quote(f'-csearch_path={name}', safe='')}"

    def drop_schema(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")  # a test that left a transaction open fails here, not hangs
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def start_server() -> Server:
    """``MM_TEST_DATABASE_URL`` when set, else a new cluster; :class:`Unavailable` says why not."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"psycopg is not installed (pip install -e '.[postgres]'): {exc}") from exc
    given = os.environ.get(TEST_URL_ENV, "").strip()
    if given:
        return Server(given)
    bin_dir = find_binaries()
    if bin_dir is None:
        raise Unavailable(f"no PostgreSQL server: set {TEST_URL_ENV}, or install Debian's postgresql (no initdb/pg_ctl under {BINARIES_GLOB})")
    prefix, user = _as_user_prefix()
    # The socket path must stay under ~100 bytes, and the server's user must reach it (root's
    # TMPDIR may be private): then the world-writable /tmp.
    base = tempfile.gettempdir()
    if (user is not None or len(base) > 60) and os.path.isdir("/tmp"):
        base = "/tmp"
    root = Path(tempfile.mkdtemp(prefix="mm-pg-", dir=base))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(root, bin_dir, prefix)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return Server(cluster.url, cluster)


def main(argv: list[str]) -> int:
    """``python tests/_postgres.py run -- COMMAND...``: one cluster for a whole test run (what
    ``.ci/run`` does). Starts it, runs the command with ``MM_TEST_DATABASE_URL`` naming it, stops
    it, and exits with the command's status; without a server the command runs anyway (the
    Postgres tests then skip, saying why)."""
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: python tests/_postgres.py run -- COMMAND...", file=sys.stderr)
        return 2
    env = dict(os.environ)
    cluster = None
    if not env.get(TEST_URL_ENV, "").strip():
        try:
            cluster = start_server().cluster
        except Unavailable as exc:
            print(f"warning: no PostgreSQL cluster for the suite: {exc}", file=sys.stderr)
        if cluster is not None:
            env[TEST_URL_ENV] = cluster.url
            print(f"PostgreSQL cluster for the suite in {cluster.root}", file=sys.stderr)
    try:
        return subprocess.call(argv[2:], env=env)
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
