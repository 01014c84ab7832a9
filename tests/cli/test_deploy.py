"""The runtime deploys without TensorFlow: runs scripts/deploy-check (also `make deploy-check`)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_runtime_wheel_runs_a_converted_model_without_tensorflow():
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent)}
    result = subprocess.run([str(ROOT / "scripts" / "deploy-check")], capture_output=True, text=True,
                            env=env, timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensorflow, safetensors and keras are not installed: ok" in result.stdout
    assert "needs the extra 'structured'" in result.stdout  # a constraint without llguidance
    assert "deploy-check: ok" in result.stdout.splitlines()[-1]
