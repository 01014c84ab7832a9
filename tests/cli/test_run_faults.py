"""gpt-run under interruptions and bad input files: Ctrl-C, a closed pipe, files that are not UTF-8."""

import signal
import subprocess
import time

import pytest

import gpt2np
from conftest import BIN, ctrl_c_reaches, run_cli


def test_ctrl_c_stops_at_once_with_the_text_so_far(model_124M_dir):
    proc = subprocess.Popen([str(BIN / "gpt-run"), str(model_124M_dir), "Hello", "-n", "500", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ctrl_c_reaches)
    first = proc.stdout.read1(64)
    assert first and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    rest, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 130 and b"Traceback" not in err
    expected = gpt2np.load(model_124M_dir).complete("Hello", 500, stop_at_eos=False).text.encode()
    printed = first + rest
    assert expected.startswith(printed) and len(printed) < len(expected)  # the text so far, flushed


def test_closed_pipe_ends_quietly(model_124M_dir):
    pipeline = f"set -o pipefail; '{BIN / 'gpt-run'}' '{model_124M_dir}' Hello -n 300 --ignore-eos | head -c 20"
    proc = subprocess.Popen(["bash", "-c", pipeline], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    # Quiet: no traceback, no message; status 1 from gpt-run (pipefail), Python's convention for EPIPE.
    assert len(out) == 20 and err == b"" and proc.returncode == 1


@pytest.mark.parametrize("flag", ["--prompts-file", "--score"])
def test_files_that_are_not_utf8(small_model_dir, tmp_path, flag):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait\n".encode("latin-1"))
    result = run_cli("gpt-run", str(small_model_dir), flag, str(bad))
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "not valid UTF-8 (byte 3)" in err, err
