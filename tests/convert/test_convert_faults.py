"""The converter under faults: kills, full disks, size limits, read-only places, corruption, races.
Nothing complete may be lost, nothing half-written may appear. (gpt-run's: tests/cli/test_run_faults.py.)"""

import resource
import shutil
import signal
import subprocess
import time

import pytest

import gpt2np
from conftest import BIN, run_cli
from gpt2np.integrity import SUMS_FILE, file_sha256
from helpers.http_server import FaultyServer
from test_convert import assert_faithful

DATA = "/124M/model.ckpt.data-00000-of-00001"


def convert_cmd(out, *args):
    return [str(BIN / "gpt-convert"), "124M", str(out), "-q", *args]


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_killed_mid_download_resumes_with_range(small_checkpoint, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    part = cache / "124M" / "model.ckpt.data-00000-of-00001.part"
    with FaultyServer(small_checkpoint.parent) as server:
        server.throttle = 0.02  # ~3 MB/s: the 13 MB file takes seconds
        proc = subprocess.Popen(convert_cmd(out, "--cache-dir", str(cache), "--base-url", server.url))
        assert wait_for(lambda: part.exists() and part.stat().st_size > 200_000)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = part.stat().st_size
        complete = {p.name for p in (cache / "124M").iterdir() if not p.name.startswith(".")} - {part.name}
        assert not out.exists() and not (cache / "124M" / "model.ckpt.data-00000-of-00001").exists()
        assert "hparams.json" in complete
        server.throttle = 0
        server.requests.clear()
        result = run_cli("gpt-convert", "124M", str(out), "--cache-dir", str(cache), "--base-url", server.url)
        assert result.returncode == 0, result.stderr
        assert server.ranges_for(DATA) == [f"bytes={kept}-"]
        assert not {path.split("/")[-1] for path, _ in server.requests} & complete, "complete files fetched again"
    assert_faithful(out, small_checkpoint)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_killed_while_writing_leaves_nothing_half_written(checkpoint_124M, small_checkpoint, tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        assert run_cli("gpt-convert", "124M", str(out), "--checkpoint-dir", str(small_checkpoint), "-q").returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["--checkpoint-dir", str(checkpoint_124M)] + (["--force"] if existing else [])
    proc = subprocess.Popen(convert_cmd(out, *args))

    def writing():
        temps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        return any((t / "model.safetensors").exists() and (t / "model.safetensors").stat().st_size > 50_000_000
                   for t in temps)
    assert wait_for(writing), "never saw the conversion writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the earlier output was touched"
    else:
        assert not out.exists()
    assert len(leftovers(tmp_path)) == 1  # the dead process's temporary folder, hidden
    result = run_cli("gpt-convert", "124M", str(out), *args, "-q")
    assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == [], "the stale temporary folder was not cleaned up"
    assert_faithful(out, checkpoint_124M)


def limit_file_size(nbytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_file_size_limit_while_writing(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(convert_cmd(out, "--checkpoint-dir", str(small_checkpoint)), capture_output=True,
                            preexec_fn=limit_file_size(4_000_000))
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.splitlines()) == 1, err
    assert "cannot write" in err and "model.safetensors" in err and "File too large" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_file_size_limit_while_downloading(small_checkpoint, tmp_path):
    with FaultyServer(small_checkpoint.parent) as server:
        result = subprocess.run(convert_cmd(tmp_path / "out", "--cache-dir", str(tmp_path / "c"), "--base-url",
                                            server.url), capture_output=True, preexec_fn=limit_file_size(4_000_000))
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.splitlines()) == 1, err
    assert "model.ckpt.data-00000-of-00001.part" in err and "resumes next time" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MB filesystem (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full(small_checkpoint, small_fs):
    (small_fs / "out").mkdir()
    (small_fs / "out" / "old.txt").write_text("an earlier output")
    result = run_cli("gpt-convert", "124M", str(small_fs / "out"), "--checkpoint-dir", str(small_checkpoint),
                     "--force", "-q")
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert sorted(p.name for p in small_fs.iterdir()) == ["out"]
    assert (small_fs / "out" / "old.txt").read_text() == "an earlier output"


def test_read_only_output_location(small_checkpoint, small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    result = run_cli("gpt-convert", "124M", str(small_fs / "out"), "--checkpoint-dir", str(small_checkpoint))
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "Read-only file system" in err, err
    assert list(small_fs.iterdir()) == []


def test_corrupted_checkpoint_data(small_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_checkpoint, broken)
    data = broken / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    for i in range(1000, len(raw), len(raw) // 7):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = run_cli("gpt-convert", "124M", str(tmp_path / "out"), "--checkpoint-dir", str(broken))
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "damaged" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_two_conversions_share_the_cache(small_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    with FaultyServer(small_checkpoint.parent) as server:
        server.throttle = 0.005
        procs = [subprocess.Popen(convert_cmd(tmp_path / f"out{i}", "--cache-dir", str(cache), "--base-url",
                                              server.url)) for i in range(2)]
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
        paths = [path for path, _ in server.requests]
        assert sorted(paths) == sorted(set(paths)) and len(paths) == 7, "a file was downloaded twice"
    for i in range(2):
        assert_faithful(tmp_path / f"out{i}", small_checkpoint)
    assert not list((cache / "124M").glob("*.part"))


def test_integrity_is_recorded_and_verified(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli("gpt-convert", "124M", str(out), "--checkpoint-dir", str(small_checkpoint), "-q").returncode == 0
    sums = dict(line.split("  ")[::-1] for line in (out / SUMS_FILE).read_text().splitlines())
    assert set(sums) == {"model.safetensors", "config.json", "vocab.json", "merges.txt"}
    assert all(file_sha256(out / name) == digest for name, digest in sums.items())
    ok = run_cli("gpt-run", str(out), "--verify")
    assert ok.returncode == 0 and ok.stdout.decode().count("ok") == 4
    model = out / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-5] ^= 1  # one bit of one weight
    model.write_bytes(bytes(raw))
    (out / "vocab.json").unlink()
    bad = run_cli("gpt-run", str(out), "--verify")
    err = bad.stderr.decode()
    assert bad.returncode == 1 and len(err.splitlines()) == 1
    assert "model.safetensors differs" in err and "vocab.json missing" in err and "config.json" not in err
    no_sums = run_cli("gpt-run", str(tmp_path), "--verify")
    assert no_sums.returncode == 1 and b"no SHA256SUMS" in no_sums.stderr
