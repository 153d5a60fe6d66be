"""The database going away mid-sweep is one line (issue 24, item 2): the sweep reaches PostgreSQL through a
TCP relay this test controls, the relay is closed while a trial waits (an event the test controls, not a
timer), and the sweep must end with one line naming the storage (password hidden), exit 2; the rerun
resumes and runs the cut trial again."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState
from studyfiles import write_study
from test_leaks import drop_study, require_postgres
from waiting_model import release_when_waiting, waiting_env, waiting_study

from bptt_harness.study import open_storage, progress

REPO = Path(__file__).resolve().parent.parent


class Relay:
    """A TCP relay from a local port to PostgreSQL; :meth:`close` drops the listener and every connection,
    as a server that stops does."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", 5432))
            except OSError:
                return
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


@contextlib.contextmanager
def relay(port: int = 0) -> Iterator[Relay]:
    r = Relay(port)
    try:
        yield r
    finally:
        r.close()


def test_postgresql_going_away_mid_trial_is_one_line_and_the_rerun_resumes(tmp_path: Path) -> None:
    require_postgres()
    name = f"lost_{uuid.uuid4().hex[:8]}"
    study_file = waiting_study(write_study(tmp_path, name, search="bptt = [4, 8, 16]\nbatch_size = [2]"))
    results = tmp_path / "results"
    wait = tmp_path / "wait"
    try:
        with relay() as r:
            url = f"postgresql://postgres:s3cretpw@127.0.0.1:{r.port}/test"
            args = ["sweep", str(study_file), "--results-dir", str(results), "--storage", url, "--no-report"]
            proc = subprocess.Popen([sys.executable, "-m", "bptt_harness", *args], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=waiting_env(wait))
            # The second trial waits; the database goes away then, and the trial goes on to store its result.
            _, err = release_when_waiting(proc, wait, r.close)
        assert proc.returncode == 2, err
        assert "Traceback" not in err and "s3cretpw" not in err, err
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
        assert f"127.0.0.1:{r.port}/test" in errors[0] and "***" in errors[0], errors[0]

        with relay(r.port):  # the database is back: the same command resumes
            done = subprocess.run([sys.executable, "-m", "bptt_harness", *args], cwd=REPO, capture_output=True,
                                  text=True, env=waiting_env(wait), timeout=300)
        assert done.returncode == 0, done.stderr
        study = optuna.load_study(study_name=name, storage=open_storage("postgresql://postgres@127.0.0.1:5432/test"))
        assert progress(study).done == 3
        complete = sorted(t.params["bptt"] for t in study.get_trials() if t.state == TrialState.COMPLETE)
        assert complete == [4, 8, 16]
    finally:
        drop_study(name)
