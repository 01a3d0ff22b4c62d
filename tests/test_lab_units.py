"""research/lab.py's Lab cleans up after itself: a clean run removes the work directory it made (server logs,
state, banks), a failed run keeps it for a look, and a server it did not start is never touched."""

from __future__ import annotations

import sys

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
