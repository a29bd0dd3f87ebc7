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


def test_demo_places_an_outbound_call_through_the_call_api(tmp_path: Path) -> None:
    """`callbridge demo --outbound`: POST /v1/calls, the Twilio stand-in dials, the callee talks,
    and the call's record is read back through GET /v1/calls/{sid}."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "VAPI_", "TWILIO_", "PUBLIC_URL", "API_KEYS"))}
    wav = tmp_path / "call.wav"
    run = subprocess.run([sys.executable, "-m", "callbridge.cli", "demo", "--outbound", "--wav", str(wav)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "POST /v1/calls → 201" in run.stdout
    assert "call API        outbound ended" in run.stdout
    assert "result          OK" in run.stdout
