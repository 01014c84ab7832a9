"""Ray Data stages and `gpt-batch` on a real multi-node Ray cluster, started here on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, ctrl_c_reaches, run_cli

ray = pytest.importorskip("ray")
from ray.data import ActorPoolStrategy  # noqa: E402

from gpt2np.ray import Generate, Score, row_seed  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


PROMPTS = [f"Row {i}: " + "word " * (i % 7) for i in range(24)]


def stage(ds, cls, batch_size=5, **kwargs):
    return ds.map_batches(cls, fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=2),
                          batch_size=batch_size, num_cpus=1)


def test_generate_stage_equals_generate_batch_row_for_row(cluster, model, small_model_dir):
    rows = [{"id": i, "prompt": p, "lang": "en"} for i, p in enumerate(PROMPTS)]
    rows += [{"id": 100, "prompt": "word " * 80, "lang": "en"}]  # too long for the 64-position context
    out = stage(ray.data.from_items(rows), Generate, model_dir=str(small_model_dir), n_tokens=8,
                stop_at_eos=False).take_all()
    by_id = {r["id"]: r for r in out}
    assert sorted(by_id) == [r["id"] for r in rows] and len(out) == len(rows)
    expected = model.generate_batch(PROMPTS, 8, stop_at_eos=False)
    for i, g in enumerate(expected):
        r = by_id[i]
        assert list(r["ids"]) == g.ids and r["text"] == g.text and r["finish_reason"] == g.stop_reason
        np.testing.assert_allclose(list(r["logprobs"]), g.logprobs, atol=1e-4)
        assert r["lang"] == "en" and r["error"] is None
    assert "context is 64" in by_id[100]["error"] and by_id[100]["text"] is None


def test_seeded_rows_do_not_depend_on_worker_or_batch(cluster, model, small_model_dir):
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    opts = dict(n_tokens=10, temperature=0.9, top_p=0.95, seed=5, stop_at_eos=False)
    results = []
    for batch_size in (1, 7):
        out = stage(ray.data.from_items(rows), Generate, batch_size=batch_size, model_dir=str(small_model_dir),
                    **opts).take_all()
        results.append({r["id"]: list(r["ids"]) for r in out})
    assert results[0] == results[1]
    for row in rows[:8]:
        alone = model.complete(row["prompt"], 10, temperature=0.9, top_p=0.95, stop_at_eos=False,
                               seed=row_seed(5, row["id"]))
        assert results[0][row["id"]] == alone.ids


def test_score_stage_equals_score(cluster, model, small_model_dir):
    texts = ["Hello world.", "A longer sentence, scored token by token.", "word " * 150, "", None]
    out = stage(ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)]), Score,
                model_dir=str(small_model_dir)).take_all()
    by_id = {r["id"]: r for r in out}
    for i in range(3):  # the third is longer than the context: the sliding window
        s = model.score(texts[i])
        assert by_id[i]["n_tokens"] == len(s.ids) and by_id[i]["error"] is None
        assert by_id[i]["nll"] == pytest.approx(s.nll, rel=1e-5)
        assert by_id[i]["perplexity"] == pytest.approx(s.perplexity, rel=1e-5)
    assert "nothing to score" in by_id[3]["error"] and "must be a string" in by_id[4]["error"]


# ---------------------------------------------------------------------------------------- gpt-batch
def write_corpus(folder: Path, n: int, bad: bool = True) -> list[dict]:
    """Two files read in name order; ids given or the line number across files; bad lines."""
    folder.mkdir()
    rows = [{"prompt": p} if i % 3 else {"prompt": p, "id": f"custom-{i}"} for i, p in
            enumerate(PROMPTS[i % len(PROMPTS)] for i in range(n))]
    half = n // 2
    lines_b = [json.dumps(r) for r in rows[:half]]
    lines_a = [json.dumps(r) for r in rows[half:]]
    if bad:
        lines_a.insert(2, "{not json")
        lines_a.insert(4, json.dumps({"text": "no prompt here"}))
    (folder / "b.jsonl").write_text("\n".join(lines_a) + "\n")  # "a" sorts first: its lines come first
    (folder / "a.jsonl").write_text("\n".join(lines_b) + "\n\n")
    # What each line holds, in the order of line numbers: a.jsonl ends with a blank line, which
    # is counted but holds no row; a line that is not JSON is None.
    order = [*(json.loads(x) for x in lines_b), "blank", *(json.loads(x) if x.startswith('{"') else None
                                                             for x in lines_a)]
    for line_number, r in enumerate(order, start=1):
        if isinstance(r, dict) and "id" not in r:
            r["id"] = line_number
    return [r for r in order if r != "blank"] if not bad else order


def read_output(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("part-*.jsonl")) for line in f.read_text().splitlines()]


def test_gpt_batch_end_to_end(cluster, model, small_model_dir, tmp_path):
    order = write_corpus(tmp_path / "in", 30)
    out = tmp_path / "out"
    args = [str(small_model_dir), str(tmp_path / "in"), str(out), "--address", cluster.address, "--workers", "2",
            "--batch-size", "4", "-n", "6", "--ignore-eos", "--temperature", "0.8", "--seed", "9"]
    r = run_cli("gpt-batch", *args)
    assert r.returncode == 0, r.stderr.decode()
    assert b"32 rows (2 errors" in r.stderr
    rows = read_output(out)
    assert len(rows) == 32 and len({json.dumps(x["id"]) for x in rows}) == 32  # every row exactly once
    by_id = {json.dumps(x["id"]): x for x in rows}
    for line_number, expected in enumerate(order, start=1):
        if expected == "blank":
            continue
        if expected is None:  # the bad line: its line number is its id
            assert "not JSON" in by_id[str(line_number)]["error"]
            continue
        key = json.dumps(expected["id"])
        got = by_id[key]
        if "prompt" not in expected:  # its "text" field would collide with the result's
            assert "'text' is a result's name" in got["error"] and "text" not in got
            continue
        alone = model.complete(expected["prompt"], 6, stop_at_eos=False, temperature=0.8,
                               seed=row_seed(9, expected["id"]))
        assert got["ids"] == alone.ids and got["text"] == alone.text and got["prompt"] == expected["prompt"]
    # The output folder is refused when it is not empty, replaced whole with --force.
    again = run_cli("gpt-batch", *args)
    assert again.returncode == 1 and b"not empty" in again.stderr and len(again.stderr.splitlines()) == 1
    texts = ["Scored text.", "word " * 150, "Another one, a little longer than the first."]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    score = run_cli("gpt-batch", str(small_model_dir), str(tmp_path / "texts.jsonl"), str(out), "--address",
                    cluster.address, "--task", "score", "--force", "--workers", "1")
    assert score.returncode == 0, score.stderr.decode()
    scored = sorted(read_output(out), key=lambda x: x["id"])
    assert [x["id"] for x in scored] == [1, 2, 3] and [x["n"] for x in scored] == [0, 1, 2]
    for x, t in zip(scored, texts):
        expected = model.score(t)
        assert x["n_tokens"] == len(expected.ids) and x["nll"] == pytest.approx(expected.nll, rel=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


EXTRACT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                            "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
           "required": ["name", "year"], "additionalProperties": False}


def test_rows_carry_their_own_constraints(cluster, model, small_model_dir, tmp_path):
    import jsonschema

    rows = [{"id": i, "prompt": f"Record {i}:", "constraint": c} for i, c in enumerate(
        [json.dumps({"json": EXTRACT}), None, json.dumps({"choice": ["red", "green"]}), json.dumps({"regex": "("})])]
    out = {r["id"]: r for r in stage(ray.data.from_items(rows), Generate, model_dir=str(small_model_dir),
                                     n_tokens=40).take_all()}
    assert out[0]["text"] == model.complete("Record 0:", 40, constraint={"json": EXTRACT}).text
    jsonschema.validate(json.loads(out[0]["text"]), EXTRACT)
    assert out[1]["text"] == model.complete("Record 1:", 40).text
    assert out[2]["text"] in ("red", "green") and out[2]["finish_reason"] == "stop"
    assert "regular expression" in out[3]["error"] and out[3]["text"] is None
    # gpt-batch: JSON extraction over a corpus with a job's schema, and a row's own constraint in its place.
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"id": f"doc{i}", "prompt": f"Document {i}. Extract:"} for i in range(6)]
    lines.append({"id": "own", "prompt": "Answer:", "constraint": {"choice": ["yes", "no"]}})
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = run_cli("gpt-batch", str(small_model_dir), str(corpus), str(tmp_path / "out"), "--address", cluster.address,
                "--workers", "2", "--batch-size", "3", "-n", "40", "--json-schema", json.dumps(EXTRACT))
    assert r.returncode == 0, r.stderr.decode()
    got = {x["id"]: x for x in read_output(tmp_path / "out")}
    for x in lines[:-1]:
        jsonschema.validate(json.loads(got[x["id"]]["text"]), EXTRACT)
        assert got[x["id"]]["text"] == model.complete(x["prompt"], 40, constraint={"json": EXTRACT}).text
    assert got["own"]["text"] in ("yes", "no") and got["own"]["constraint"] == {"choice": ["yes", "no"]}
    bad = run_cli("gpt-batch", str(small_model_dir), str(corpus), str(tmp_path / "out2"), "--address",
                  cluster.address, "--regex", "(a")
    assert bad.returncode == 1 and b"regular expression" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_progress_bar_on_a_terminal(cluster, small_model_dir, tmp_path):
    import pty

    write_corpus(tmp_path / "in", 12, bad=False)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([str(BIN / "gpt-batch"), str(small_model_dir), str(tmp_path / "in"), str(tmp_path / "out"),
                             "--address", cluster.address, "-n", "4"], stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # the process closed its end
            break
        if not data:
            break
        shown += data
    assert proc.wait(timeout=120) == 0
    os.close(controller)
    assert b"12/12 rows" in shown and b"rows/s" in shown and b"tokens/s" in shown and b"gpt-batch: 12 rows" in shown


def check_local_run(model, small_model_dir, tmp_path, env) -> None:
    """gpt-batch without --address (and no RAY_ADDRESS): its own local Ray, the right rows."""
    rows = write_corpus(tmp_path / "in", 6, bad=False)
    r = run_cli("gpt-batch", str(small_model_dir), str(tmp_path / "in"), str(tmp_path / "out"), "-n", "4",
                "--ignore-eos", "--workers", "1", env=env)
    assert r.returncode == 0, r.stderr.decode()
    got = {json.dumps(x["id"]): x for x in read_output(tmp_path / "out")}
    assert len(got) == 6
    for row in rows:
        assert got[json.dumps(row["id"])]["ids"] == model.complete(row["prompt"], 4, stop_at_eos=False).ids


def env_without_ray_address() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_gpt_batch_starts_its_own_ray_beside_a_cluster_in_this_process(cluster, model, small_model_dir, tmp_path,
                                                                       monkeypatch):
    """A `ray.cluster_utils.Cluster` runs on this machine (the module's): without --address,
    gpt-batch still starts a local Ray of its own, as the README says, and leaves the cluster be."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    check_local_run(model, small_model_dir, tmp_path, env_without_ray_address())
    assert sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]) == nodes  # nothing joined or left the cluster


def test_gpt_batch_starts_its_own_ray_beside_ray_start_head(model, small_model_dir, tmp_path):
    """After `ray start --head` on this machine, plain `ray.init()` would join that Ray (and refuse
    num_cpus); gpt-batch without --address must start its own all the same."""
    # Its own temporary folder (where `ray start` leaves the address that a plain ray.init() joins):
    # the same situation, without touching the Ray state of anything else on this machine.
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live below it
    env = {**env_without_ray_address(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--port", "0", "--num-cpus", "1",
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    output: list[bytes] = []
    threading.Thread(target=lambda: output.extend(iter(head.stdout.readline, b"")), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any(b"Ray runtime started" in line for line in output):
            assert head.poll() is None and time.monotonic() < deadline, b"".join(output).decode()
            time.sleep(0.2)
        check_local_run(model, small_model_dir, tmp_path, env)
        assert head.poll() is None  # the other Ray is still there
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_model_folder_missing_or_different_names_the_node(cluster, small_model_dir, tmp_path):
    write_corpus(tmp_path / "in", 4, bad=False)
    r = run_cli("gpt-batch", str(tmp_path / "nowhere"), str(tmp_path / "in"), str(tmp_path / "out"),
                "--address", cluster.address)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and re.search(r"on node \d+\.\d+\.\d+\.\d+ ", err[-1]) and "not a model folder" in err[-1]
    assert all("Traceback" not in line for line in err) and not (tmp_path / "out").exists()
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in Path(small_model_dir).iterdir():
        (changed / f.name).symlink_to(f)
    (changed / "SHA256SUMS").write_text(f"{'0' * 64}  config.json\n")
    r = run_cli("gpt-batch", str(changed), str(tmp_path / "in"), str(tmp_path / "out"), "--address", cluster.address)
    line = r.stderr.decode().strip().splitlines()[-1]
    assert r.returncode == 1 and re.search(r"on node \d+\.\d+\.\d+\.\d+ ", line)
    assert "config.json differs" in line and "2 nodes" in line


def write_files(folder: Path, n: int, files: int) -> list[dict]:
    """n rows with ids of their own spread over `files` files: as many parse chunks, so that every
    actor has work throughout and the output arrives a chunk at a time."""
    folder.mkdir()
    rows = [{"prompt": PROMPTS[i % len(PROMPTS)], "id": f"row-{i}"} for i in range(n)]
    for f in range(files):
        (folder / f"part-{f:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[f::files]))
    return rows


def running_job(cluster, small_model_dir, tmp_path, n_rows, workers=2, files=None):
    """A gpt-batch process under way, and a way to count the rows it has written so far."""
    order = write_files(tmp_path / "in", n_rows, files) if files else write_corpus(tmp_path / "in", n_rows, bad=False)
    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "gpt-batch"), str(small_model_dir), str(tmp_path / "in"), str(out),
                             "--address", cluster.address, "--workers", str(workers), "--batch-size", "2", "-n", "40",
                             "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=ctrl_c_reaches)

    def written() -> int:
        return sum(len(f.read_text().splitlines()) for f in tmp_path.glob(".out.tmp-*/part-*.jsonl"))

    return proc, order, out, written


def wait_until(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def map_workers():
    """The processes of the job's actors (Ray names them `ray::MapWorker(...)`)."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if any("MapWorker(MapBatches(Generate))" in part for part in (p.info["cmdline"] or []))]


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def actor_on(node) -> bool:
    """Whether one of the job's actors runs on `node` (a child of its raylet)."""
    import psutil

    for p in map_workers():
        try:
            if p.ppid() == raylet_pid(node):
                return True
        except psutil.NoSuchProcess:
            pass
    return False


def check_complete(model, out, order, n_tokens=40):
    rows = read_output(out)
    assert sorted(json.dumps(r["id"]) for r in rows) == sorted(json.dumps(r["id"]) for r in order)
    by_id = {json.dumps(r["id"]): r for r in rows}
    sample = order[::7]
    expected = model.generate_batch([r["prompt"] for r in sample], n_tokens, stop_at_eos=False)
    assert [by_id[json.dumps(r["id"])]["ids"] for r in sample] == [g.ids for g in expected]


def test_actor_killed_mid_job(cluster, model, small_model_dir, tmp_path):
    proc, order, out, written = running_job(cluster, small_model_dir, tmp_path, 240, files=24)
    try:
        wait_until(lambda: written() >= 10 or proc.poll() is not None)
        assert proc.poll() is None and written() < len(order)  # really mid-job
        victim = map_workers()[0]
        os.kill(victim.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    check_complete(model, out, order)


def test_ctrl_c_stops_cleanly(cluster, small_model_dir, tmp_path):
    proc, _, out, written = running_job(cluster, small_model_dir, tmp_path, 240, files=24)
    try:
        wait_until(lambda: written() >= 4 or proc.poll() is not None)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"interrupted" in err and b"Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_worker_node_lost_mid_job(cluster, model, small_model_dir, tmp_path):
    # Last in this module: it replaces the cluster's worker node.
    proc, order, out, written = running_job(cluster, small_model_dir, tmp_path, 240, files=24)
    try:
        lost = next(iter(cluster.worker_nodes))
        # An actor really is there (it may start after the head node's), and the job is mid-way.
        wait_until(lambda: (actor_on(lost) and written() >= 10) or proc.poll() is not None)
        assert proc.poll() is None and written() < len(order)
        cluster.remove_node(lost, allow_graceful=False)
        cluster.add_node(num_cpus=2)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    check_complete(model, out, order)


@pytest.mark.parametrize("args, fragment, status", [
    (["{model}", "/nonexistent.jsonl", "{out}"], "no such file or folder", 1),
    (["{model}", "{empty}", "{out}"], "no .jsonl files", 1),
    (["{model}", "{input}", "{out}", "--task", "score", "-n", "5"], "do not apply to --task score", 2),
    (["{model}", "{input}", "{out}", "--stride", "5"], "--stride applies to --task score only", 2),
    (["{model}", "{input}", "{out}", "--top-p", "7"], "--top-p", 2),
    (["{model}", "{input}", "{full}"], "not empty", 1),
    (["{model}", "{input}", "{here}", "--force"], "would hold", 1),
])
def test_gpt_batch_usage_errors_are_one_line(small_model_dir, tmp_path, args, fragment, status):
    (tmp_path / "input.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    names = {"model": str(small_model_dir), "out": str(tmp_path / "out"), "empty": str(tmp_path / "empty"),
             "input": str(tmp_path / "input.jsonl"), "full": str(tmp_path / "full"), "here": str(tmp_path)}
    r = run_cli("gpt-batch", *[a.format(**names) for a in args])
    err = r.stderr.decode()
    assert r.returncode == status and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "input.jsonl").exists()


def test_input_plan_and_parse_agree_on_line_numbers(tmp_path):
    from gpt2np.ray import job

    (tmp_path / "a.jsonl").write_bytes(b'{"prompt": "one"}\r\n\n{"prompt": "three", "id": null}\n'
                                       b'{"prompt": NaN}\n\xff\n{"prompt": "six", "text": "x"}')  # no final newline
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "seven"}\n[1]\n{"prompt": 8, "id": "eight"}\n')
    files = job.input_files(tmp_path)
    for chunk_lines, chunk_bytes in ((1, 1 << 20), (2, 1 << 20), (1000, 1 << 20), (1000, 10)):
        chunks, total = job.plan(files, chunk_lines, chunk_bytes)
        rows = [r for c in chunks for r in job.parse_chunk(vars(c), "prompt", reserved=("text", "error"))]
        assert total == len(rows) == 8
        assert [r["_line"] for r in rows] == [1, 3, 4, 5, 6, 7, 8, 9]
        assert [json.loads(r["id"]) for r in rows] == [1, 3, 4, 5, 6, 7, 8, "eight"]
        assert [r["prompt"] for r in rows] == ["one", "three", None, None, None, "seven", None, None]
        errors = [r["error"] for r in rows]
        assert errors[:2] == [None, None] and errors[5] is None
        assert "a.jsonl:4: not JSON (NaN is not JSON)" == errors[2] and "a.jsonl:5: not UTF-8" in errors[3]
        assert "a.jsonl:6: the field 'text'" in errors[4] and "b.jsonl:2: not a JSON object" == errors[6]
        assert 'b.jsonl:3: "prompt" must be a string, not int' == errors[7]


def test_row_seed_is_the_same_for_the_same_id_in_any_form():
    assert row_seed(5, 1) == row_seed(5, 1.0) == row_seed(5, np.int64(1)) != row_seed(5, "1")
    assert row_seed(5, "r1") != row_seed(6, "r1")


def test_a_copy_whose_sha256sums_differs_from_the_first_nodes_is_refused(small_model_dir, tmp_path):
    from gpt2np import GPT2Error
    from gpt2np.ray import check_model_dir, sums_digest

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(small_model_dir).iterdir():
        (copy / f.name).symlink_to(f)
    from gpt2np.integrity import file_sha256
    (copy / "SHA256SUMS").write_text(f"{file_sha256(copy / 'config.json')}  config.json\n")
    check_model_dir(copy, expect_sums=sums_digest(copy))  # self-consistent and the same: fine
    with pytest.raises(GPT2Error, match="on node .*SHA256SUMS differs from the copy on the first node"):
        check_model_dir(copy, expect_sums=sums_digest(small_model_dir))  # the other copy has none


def test_an_actors_products_use_as_many_threads_as_its_cpus(cluster, small_model_dir):
    """OpenBLAS's threads and oneDNN's OpenMP threads both follow an actor's `num_cpus` (Ray sets
    OMP_NUM_THREADS, which both read), so actors side by side on a node do not oversubscribe it."""

    @ray.remote
    class Threads:
        def report(self, model_dir: str) -> dict:
            import ctypes

            import gpt2np
            from gpt2np import parallel

            model = gpt2np.load(model_dir)
            model.complete("Threads", 2)  # the products have run: both libraries are loaded
            blas = parallel._openblas()
            out = {"openblas": blas[0]() if blas else None, "backend": model.matmul.backend, "omp": None}
            if model.matmul.backend == "onednn":
                out["omp"] = ctypes.CDLL("libgomp.so.1").omp_get_max_threads()
            return out

    for cpus in (1, 2):
        got = ray.get(Threads.options(num_cpus=cpus).remote().report.remote(str(small_model_dir)))
        assert got["openblas"] == cpus, got
        if got["backend"] == "onednn":
            assert got["omp"] == cpus, got


def test_stages_take_the_weights_precision(cluster, small_model_dir):
    import gpt2np

    try:
        mq = gpt2np.load(small_model_dir, weights="bfloat16")
    except gpt2np.GPT2Error:
        pytest.skip("the oneDNN extra is not installed")
    rows = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:8])]
    out = stage(ray.data.from_items(rows), Generate, model_dir=str(small_model_dir), n_tokens=6,
                stop_at_eos=False, weights="bfloat16").take_all()
    expected = mq.generate_batch(PROMPTS[:8], 6, stop_at_eos=False)
    assert {r["id"]: list(r["ids"]) for r in out} == {i: g.ids for i, g in enumerate(expected)}
    scored = stage(ray.data.from_items([{"text": t} for t in PROMPTS[:4]]), Score, model_dir=str(small_model_dir),
                   weights="bfloat16").take_all()
    for r in scored:
        assert abs(r["nll"] - mq.score(r["text"]).nll) < 1e-4
