"""The real download code against a real HTTP server on 127.0.0.1, with injected faults."""

import pytest

from gpt2np import GPT2Error
from gpt2np_convert.download import FILES, canonical_model, download_model, fetch
from helpers.http_server import FaultyServer

DATA = "/124M/model.ckpt.data-00000-of-00001"


@pytest.fixture
def server(small_checkpoint):
    with FaultyServer(small_checkpoint.parent) as s:
        yield s


def assert_identical(folder, checkpoint):
    for name in FILES:
        assert (folder / name).read_bytes() == (checkpoint / name).read_bytes(), name
    assert not list(folder.glob("*.part"))


def test_downloads_the_seven_files_once(server, small_checkpoint, tmp_path):
    folder = download_model("124M", tmp_path, server.url)
    assert folder == tmp_path / "124M"
    assert_identical(folder, small_checkpoint)
    assert sorted(p for p, _ in server.requests) == sorted(f"/124M/{f}" for f in FILES)
    server.requests.clear()
    download_model("117M", tmp_path, server.url + "/")  # old name, same folder
    assert server.requests == [], "a complete cached file was fetched again"


def test_dropped_connection_resumes_with_range(server, small_checkpoint, tmp_path):
    server.faults[DATA] = ["drop:5000", "drop:3000"]
    folder = download_model("124M", tmp_path, server.url, backoff=0.01)
    assert_identical(folder, small_checkpoint)
    assert server.ranges_for(DATA) == [None, "bytes=5000-", "bytes=8000-"]


def test_503_then_success_is_retried(server, small_checkpoint, tmp_path):
    server.faults["/124M/hparams.json"] = ["503", "503"]
    folder = download_model("124M", tmp_path, server.url, backoff=0.01)
    assert_identical(folder, small_checkpoint)
    assert server.ranges_for("/124M/hparams.json") == [None, None, None]


def test_404_is_an_error_at_once(server, tmp_path):
    with pytest.raises(GPT2Error, match=r"/124M/checkpoint failed: HTTP 404.*--checkpoint-dir"):
        download_model("124M", tmp_path, server.url + "/nothing-here")
    assert len(server.requests) == 1
    assert not (tmp_path / "124M" / "checkpoint").exists()


def test_persistent_cut_offs_are_never_accepted(server, tmp_path):
    server.faults[DATA] = ["drop:0"] * 10
    with pytest.raises(GPT2Error, match="failed after 3 attempts"):
        fetch(server.url + DATA, tmp_path / "data", retries=2, backoff=0.01)
    assert not (tmp_path / "data").exists()


def test_resumes_a_partial_file_left_by_a_killed_run(server, small_checkpoint, tmp_path):
    whole = (small_checkpoint / "model.ckpt.data-00000-of-00001").read_bytes()
    (tmp_path / "data.part").write_bytes(whole[:12345])
    fetch(server.url + DATA, tmp_path / "data")
    assert (tmp_path / "data").read_bytes() == whole
    assert server.ranges_for(DATA) == ["bytes=12345-"]


def test_complete_partial_file_is_accepted_on_416(server, small_checkpoint, tmp_path):
    whole = (small_checkpoint / "model.ckpt.data-00000-of-00001").read_bytes()
    (tmp_path / "data.part").write_bytes(whole)
    fetch(server.url + DATA, tmp_path / "data")
    assert (tmp_path / "data").read_bytes() == whole
    assert server.ranges_for(DATA) == [f"bytes={len(whole)}-"]


def test_server_that_ignores_range_restarts_from_zero(server, small_checkpoint, tmp_path):
    whole = (small_checkpoint / "model.ckpt.data-00000-of-00001").read_bytes()
    (tmp_path / "data.part").write_bytes(b"x" * 100)  # not even a prefix: must be discarded
    server.faults[DATA] = ["norange"]
    fetch(server.url + DATA, tmp_path / "data")
    assert (tmp_path / "data").read_bytes() == whole


def test_unreachable_host_and_unknown_model(tmp_path):
    with pytest.raises(GPT2Error, match="host name lookup failed"):
        fetch("http://no-such-host.invalid/x", tmp_path / "x")
    with pytest.raises(GPT2Error, match="124M, 355M, 774M, 1558M"):
        canonical_model("1.5B")
    assert canonical_model("345M") == "355M"
