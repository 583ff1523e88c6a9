"""The root conftest raises nbval's fixed output wait for every notebook cell."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_cells_get_the_longer_output_wait(tmp_path):
    probe = tmp_path / "probe_plugin.py"
    probe.write_text(
        "def pytest_collection_finish(session):\n"
        "    waits = {getattr(i, 'output_timeout', None) for i in session.items}\n"
        "    print('OUTPUT_WAITS', sorted(waits))\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "probe_plugin",
         "notebooks/00_welcome.ipynb"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    assert root_conftest.NBVAL_OUTPUT_TIMEOUT > 5
    assert f"OUTPUT_WAITS [{root_conftest.NBVAL_OUTPUT_TIMEOUT}]" in done.stdout, done.stdout
