"""
The benchmark suite's smoke mode still runs end to end, so that the suite
never rots.  The full runs (bench/RESULTS.md) are not part of the tests: they
take minutes and their figures depend on the machine.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke_prints_all_rows(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = [line for line in proc.stdout.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == [str(n) for n in range(1, 17)], proc.stdout
    for row in rows:
        result = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert result in ("pass", "**FAIL**", "n/a"), row
    assert "machine:" in proc.stdout and "software:" in proc.stdout
    # every process and temp file of the run is gone
    assert list(tmp_path.iterdir()) == []
