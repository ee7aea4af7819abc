"""The README's "From Python" example runs as it stands, in a fresh interpreter, so it cannot rot.

The example generates its own tiny data (32 px, a few dozen images) and trains one epoch, so running it whole is
the test: its imports, signatures, argument names and result fields are the library's, not a copy of them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167


def readme_example() -> str:
    """The first ```python block of the README's "## From Python" section."""
    text = README.read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert found, "README's From Python section has no ```python block"
    return found.group(1)


def test_readme_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    name, kept, top1 = done.stdout.split()  # the top-scored source class, the pruned file's samples, test top-1
    assert name.startswith("class") and int(kept) == 4 * 8 and 0.0 <= float(top1) <= 1.0
    work = tmp_path / "dptool_example"
    for output in ("source.beton", "scores.json", "source_p50.beton", "pretrained_p50.pt", "surrogate.jsonl"):
        assert (work / output).is_file(), output
    assert "INFO:dptool." in done.stderr, "logging.basicConfig(level=INFO) shows dptool's log"


def test_readme_example_is_found_and_short():
    code = readme_example()
    assert "from dptool." in code and 15 <= len(code.strip().splitlines()) <= 40
