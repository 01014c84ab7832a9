"""`gpt-convert`: checkpoint -> model folder, bit for bit, safely on disk, end to end with `gpt-run`."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gpt2np
from conftest import SMALL_HPARAMS, run_cli
from gpt2np.weights import SafetensorsFile
from gpt2np_convert.checkpoint import import_tensorflow, tf_name
from helpers.http_server import FaultyServer
from helpers.make_checkpoint import save_checkpoint

tf = import_tensorflow()
tf_reference = pytest.importorskip("helpers.tf_reference")


def checkpoint_variables(folder):
    reader = tf.train.load_checkpoint(str(folder / "model.ckpt"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def assert_faithful(out, checkpoint):
    """Every tensor bit-identical to its checkpoint variable; tokenizer files byte-identical."""
    variables = checkpoint_variables(checkpoint)
    st = SafetensorsFile(out / "model.safetensors")
    assert len(st.tensors) == len(variables)
    for name, array in st.tensors.items():
        expected = variables[tf_name(name)]
        assert array.dtype == np.float32 and array.tobytes() == expected.tobytes(), name
        assert array.shape == (expected.shape[1:] if expected.ndim == 3 else expected.shape)
    assert (out / "vocab.json").read_bytes() == (checkpoint / "encoder.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (checkpoint / "vocab.bpe").read_bytes()
    return st


def test_converts_bit_for_bit(small_checkpoint, tmp_path):
    result = run_cli("gpt-convert", "124M", str(tmp_path / "out"), "--checkpoint-dir", str(small_checkpoint))
    assert result.returncode == 0, result.stderr
    st = assert_faithful(tmp_path / "out", small_checkpoint)
    assert st.metadata["format"] == "pt" and st.metadata["gpt2np.format_version"] == "1"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"], config["vocab_size"]) \
        == (64, 2, 4, 64, 50257)
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary folders left behind"
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's 0700
    assert b"model.safetensors" in result.stderr  # progress was shown


CONVERT_AND_MEASURE = """
import sys
from pathlib import Path
from gpt2np_convert.checkpoint import import_tensorflow
from gpt2np_convert.convert import convert

def peak_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024

import_tensorflow()
before = peak_mb()
convert(Path(sys.argv[1]), Path(sys.argv[2]), source="test")
print(before, peak_mb())
"""


def test_real_124M_shape_converts_bit_for_bit_in_memory_of_one_tensor(tmp_path, weights_124M, checkpoint_124M):
    checkpoint = checkpoint_124M
    out = subprocess.run([sys.executable, "-c", CONVERT_AND_MEASURE, str(checkpoint), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, peak = map(float, out.stdout.split())
    file_mb = (tmp_path / "out" / "model.safetensors").stat().st_size / 2**20
    wte_mb = weights_124M["model/wte"].nbytes / 2**20
    print(f"conversion peak RSS +{peak - before:.0f} MB over TensorFlow's; file {file_mb:.0f} MB, wte {wte_mb:.0f} MB")
    assert file_mb > 474
    assert peak - before < 2 * wte_mb, "conversion memory grows with the model, not with one tensor"
    assert_faithful(tmp_path / "out", checkpoint)


def test_end_to_end_download_convert_run(small_checkpoint, tmp_path):
    """A server with a fault -> gpt-convert -> gpt-run gives the reference's tokens for the checkpoint."""
    with FaultyServer(small_checkpoint.parent) as server:
        server.faults["/124M/model.ckpt.data-00000-of-00001"] = ["drop:4096"]
        converted = run_cli("gpt-convert", "124M", str(tmp_path / "model"), "--cache-dir", str(tmp_path / "cache"),
                            env={"GPT2_BASE_URL": server.url})
        assert converted.returncode == 0, converted.stderr
        assert server.ranges_for("/124M/model.ckpt.data-00000-of-00001") == [None, "bytes=4096-"]
    prompt = "In a shocking finding, scientists discovered"
    tokenizer = gpt2np.load_tokenizer(tmp_path / "model")
    expected, _ = tf_reference.greedy(checkpoint_variables(small_checkpoint), SMALL_HPARAMS,
                                      tokenizer.encode(prompt), 15)
    if 50256 in expected:
        expected = expected[:expected.index(50256)]
    ran = run_cli("gpt-run", str(tmp_path / "model"), prompt, "-n", "15")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == tokenizer.decode(expected).encode()


def variables_with(weights, drop=None, add=None, reshape=None):
    w = {k: v for k, v in weights.items() if k != drop}
    if add:
        w[add] = np.zeros(3, np.float32)
    if reshape:
        w[reshape] = np.zeros((5, 64), np.float32)
    return w


@pytest.mark.parametrize("change, message", [
    ({"drop": "model/h1/mlp/c_fc/b"}, "lacks variable model/h1/mlp/c_fc/b"),
    ({"add": "model/h0/attn/extra"}, "unexpected variable model/h0/attn/extra"),
    ({"reshape": "model/wpe"}, "model/wpe has shape [5, 64], hparams.json implies [64, 64]"),
])
def test_checkpoint_mismatches_are_named(small_weights, tmp_path, change, message):
    checkpoint = save_checkpoint(tmp_path / "ckpt", SMALL_HPARAMS, variables_with(small_weights, **change))
    result = run_cli("gpt-convert", "124M", str(tmp_path / "out"), "--checkpoint-dir", str(checkpoint))
    assert result.returncode == 1
    assert message in result.stderr.decode() and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_kept_or_replaced_whole(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    refused = run_cli("gpt-convert", "124M", str(out), "--checkpoint-dir", str(small_checkpoint))
    assert refused.returncode == 1 and b"--force" in refused.stderr
    # A failing conversion with --force leaves the existing folder untouched and no temp files.
    broken = tmp_path / "broken"
    shutil.copytree(small_checkpoint, broken)
    data = broken / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    failed = run_cli("gpt-convert", "124M", str(out), "--checkpoint-dir", str(broken), "--force")
    assert failed.returncode == 1 and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]
    replaced = run_cli("gpt-convert", "124M", str(out), "--checkpoint-dir", str(small_checkpoint), "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "precious.txt").exists()
    assert_faithful(out, small_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]
    (tmp_path / "empty").mkdir()
    assert run_cli("gpt-convert", "124M", str(tmp_path / "empty"), "--checkpoint-dir",
                   str(small_checkpoint), "-q").returncode == 0


@pytest.mark.parametrize("args, fragment", [
    (["125M", "{tmp}/o"], "124M, 355M, 774M, 1558M"),
    (["124M", "{tmp}/o", "--checkpoint-dir", "{tmp}"], "missing checkpoint, encoder.json"),
    (["124M", "{tmp}/o", "--base-url", "http://127.0.0.1:9/none", "--cache-dir", "{tmp}/c"], "127.0.0.1:9"),
])
def test_cli_errors(tmp_path, args, fragment):
    env = {"GPT2_RETRIES": "0"}
    result = run_cli("gpt-convert", *[a.replace("{tmp}", str(tmp_path)) for a in args], env=env)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
