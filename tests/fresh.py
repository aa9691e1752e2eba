"""Running a snippet in a fresh Python process from a test (test-only helper): for what only a new
interpreter shows (what an import pulls in, process-wide settings such as CPU affinity)."""

from __future__ import annotations

import subprocess
import sys


def last_line(script: str, timeout: float = 300) -> str:
    """The last line `script` prints in a fresh interpreter; fails the test on a non-zero exit."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines, f"the script printed nothing; stderr: {result.stderr[-2000:]}"
    return lines[-1]
