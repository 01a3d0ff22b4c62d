"""research/lab.py's Lab cleans up after itself: a clean run removes the work directory it made (server logs,
state, banks), a failed run keeps it for a look, a server it did not start is never touched, and a run ended
by SIGTERM still stops the server it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO
from test_extract_pipeline import tiny  # noqa: F401  (module fixture: a tiny model directory with a tokenizer)

sys.path.insert(0, str(REPO / "research"))
from lab import Lab  # noqa: E402  (research/ is scripts, not a package)


def test_a_clean_run_removes_its_work_directory_and_a_failed_one_keeps_it(tiny, capsys):  # noqa: F811
    clean = Lab(model=tiny[0], server="http://127.0.0.1:9")  # never contacted: start() is not called
    (clean.work / "server-1.log").write_text("log")
    clean.__exit__(None, None, None)
    assert not clean.work.exists()

    failed = Lab(model=tiny[0], server="http://127.0.0.1:9")
    try:
        failed.__exit__(RuntimeError, RuntimeError("boom"), None)
        assert failed.work.is_dir() and str(failed.work) in capsys.readouterr().err
    finally:
        import shutil

        shutil.rmtree(failed.work, ignore_errors=True)


@pytest.mark.parametrize("during", ["the run", "the server's start"])
def test_a_run_ended_by_sigterm_stops_its_server(tiny, tmp_path, during):  # noqa: F811
    """`kill PID` (or a test's timeout) on an experiment, while it runs or while its server is still starting
    (wait_ready: 30-90 s): the Lab's exit still runs and stops its server (it used to die at once, or skip
    __exit__ when inside __enter__, and leave the server running with nobody to stop it)."""
    marker = tmp_path / "stopped"
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO / "research")!r})
from lab import Lab
class FakeServerLab(Lab):
    def start(self):
        print("started", flush=True)
        if {during == "the server's start"}:
            time.sleep(60)
    def stop(self):
        open({str(marker)!r}, "w").write("stopped")
with FakeServerLab(model={str(tiny[0])!r}):
    time.sleep(60)
"""
    # A run ended by a signal keeps its work directory for a look: made under tmp_path, it goes with the test's.
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        assert child.stdout.readline().strip() == "started"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        child.kill()
    assert marker.read_text() == "stopped"
