"""The repo stands on its own: nothing in it points outside it.

A clone is all the next engineer has, so no tracked file may name a path outside the repo
(a sibling folder, an absolute path on a development machine). `.ci/run` also runs the whole
suite from a copy of the clone in a folder of its own, which proves the rest.
"""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

# A relative path that climbs out of the repo, the development machine's work folder, or the
# pre-project design notes that lived beside it (their content is in docs/ now).
OUTSIDE = re.compile(r"(?<![./\w])\.\./(?!\.)|/w[o]rk/|shared/d[e]sign\b|shared/sch[e]mas\b|"
                     r"perf-b[a]seline\.md")


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def test_no_tracked_file_names_a_path_outside_the_repo() -> None:
    files = tracked_text_files()
    assert "README.md" in files
    found = []
    for path in files:
        if path == "tests/test_standalone.py":
            continue  # the patterns themselves
        try:
            text = (ROOT / path).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path}:{n}: {line.strip()[:120]}")
    assert found == []


def test_the_pattern_catches_what_it_should() -> None:
    # Spelt in pieces, so that a plain grep for such paths does not find this file either.
    up, work, design = "." + "./", "/wo" + "rk/", "shared/" + "design"
    for bad in (f"see {up}shared/{design[7:]}/x.md", f"Path('{work}shared')", f"cites {design}/a.md",
                "perf-" + "baseline.md §2", f"cd {up}other && make", f"{work}main/x"):
        assert OUTSIDE.search(bad), bad
    for fine in ("docs/performance.md", "callbridge/cli.py", "...", "/root/.cache/pip", "a/b/../c"):
        assert not OUTSIDE.search(fine), fine
