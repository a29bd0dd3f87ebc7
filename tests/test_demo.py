"""`callbridge demo` on a fresh virtualenv with nothing but `pip install .`."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_from_a_fresh_virtualenv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(ROOT)], check=True, timeout=600, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "VAPI_", "TWILIO_", "PUBLIC_URL", "PYTHONPATH"))}
    wav = tmp_path / "call.wav"
    run = subprocess.run([str(venv / "bin" / "callbridge"), "demo", "--wav", str(wav)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "result          OK" in run.stdout
    with wave.open(str(wav)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, 8000, 2)
        assert w.getnframes() > 8000 * 5
