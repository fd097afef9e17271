"""tierserve eval humaneval: canonical solutions pass, empty completions fail, pass@k against its closed form, and
hostile completions are counted failed with no effect on the host."""
import json
import socket
import threading
import time
from math import comb
from pathlib import Path

import pytest

from tierserve.eval import humaneval as H
from tierserve.eval.client import Completion, Generator, GenParams
from tierserve.eval.sandbox import isolation, run_isolated, run_program

PROBLEMS = H.load_problems()


def test_data_file_has_164_problems():
    assert len(PROBLEMS) == 164
    assert set(PROBLEMS["HumanEval/0"]) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


def test_canonical_solutions_pass_all_164():
    rows, summary = H.score(PROBLEMS, {t: [p["canonical_solution"]] for t, p in PROBLEMS.items()}, workers=4)
    failed = [(r["id"], r["first_failure"]) for r in rows if r["passed"] != 1]
    assert not failed
    assert summary["pass@1"] == 1.0 and summary["problems"] == 164


def test_empty_completions_score_zero():
    subset = H.select(PROBLEMS, limit=12)
    rows, summary = H.score(subset, {t: [""] for t in subset}, workers=4)
    assert summary["pass@1"] == 0.0 and all(r["passed"] == 0 for r in rows)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1.0 - comb(n - c, k) / comb(n, k)
            assert H.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="samples"):
        H.pass_at_k(n, 0, n + 1)


def test_pass_at_k_summary_with_several_samples():
    subset = H.select(PROBLEMS, ["0", "1"])
    good = {t: [p["canonical_solution"]] * 3 + [""] * 7 for t, p in subset.items()}
    rows, summary = H.score(subset, good, workers=4)
    assert [r["passed"] for r in rows] == [3, 3]
    assert summary["pass@1"] == pytest.approx(0.3)
    assert summary["pass@10"] == 1.0 and "pass@100" not in summary


def _one(completion: str, timeout: float = 10.0):
    p = PROBLEMS["HumanEval/2"]       # truncate_number(number: float) -> float
    rows, _ = H.score({"HumanEval/2": p}, {"HumanEval/2": [completion]}, timeout=timeout, workers=1)
    return rows[0]


def body(code: str) -> str:
    return "".join("    " + line + "\n" for line in code.strip().splitlines()) + "    return number % 1.0\n"


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    row = _one(body("while True:\n    pass"), timeout=1.5)
    assert row["passed"] == 0 and row["status"] == ["timeout"]
    assert time.perf_counter() - t0 < 10


def test_os_system_is_blocked(tmp_path):
    marker = tmp_path / "pwned-by-system"
    row = _one(body(f"__import__('os').system('touch {marker}')"))
    assert row["passed"] == 0 and not marker.exists()


def test_subprocess_is_blocked(tmp_path):
    marker = tmp_path / "pwned-by-subprocess"
    row = _one(body(f"import subprocess\nsubprocess.run(['touch', '{marker}'])"))
    assert row["passed"] == 0 and not marker.exists()


@pytest.mark.parametrize("where", ["tmp_path", "/tmp"])
def test_write_outside_workdir_is_blocked(tmp_path, where):
    target = (tmp_path if where == "tmp_path" else Path("/tmp")) / f"pwned-{time.time_ns()}"
    row = _one(body(f"open({str(target)!r}, 'w').write('pwned')"))
    assert row["passed"] == 0 and not target.exists()


def test_low_level_write_is_stopped_by_the_os(tmp_path):
    """_io.FileIO is not covered by the Python guard: the read-only mount namespace stops it."""
    if isolation() != "namespaces":
        pytest.skip(f"sandbox isolation here is {isolation()!r}: no read-only mount namespace")
    target = tmp_path / "pwned-fileio"
    row = _one(body(f"import _io\n_io.FileIO({str(target)!r}, 'w').write(b'pwned')"))
    assert row["passed"] == 0 and not target.exists()
    r = run_isolated(["sh", "-c", f"echo pwned > {target}; echo ok > inside && cat inside"], timeout=10)
    assert not target.exists() and b"Read-only" in r.stderr
    assert r.stdout == b"ok\n"            # the working directory itself stays writable


def test_delete_outside_workdir_is_blocked(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    row = _one(body(f"import shutil, os\nos.remove({str(victim / 'keep.txt')!r})\nshutil.rmtree({str(victim)!r})"))
    assert row["passed"] == 0 and (victim / "keep.txt").read_text() == "keep"


def test_reading_host_files_does_not_leak(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-4711")
    row = _one(body(f"raise ValueError(open({str(secret)!r}).read())"))
    assert row["passed"] == 0
    assert "TOPSECRET" not in json.dumps(row)


def test_socket_is_blocked():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    received, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                received.append(conn.recv(100))
            except OSError:
                pass
    th = threading.Thread(target=accept)
    th.start()
    try:
        for code in (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(b'pwned')",
                     f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'pwned')"):
            row = _one(body(code))
            assert row["passed"] == 0 and "Permission" in row["first_failure"]
    finally:
        time.sleep(0.3)
        stop.set()
        th.join()
        srv.close()
    assert received == []       # nobody connected


def test_exit_is_not_a_pass():
    assert _one(body("raise SystemExit(0)"))["passed"] == 0
    assert _one(body("import os\nos._exit(0)"))["passed"] == 0


def test_memory_limit():
    r = run_program("x = bytearray(3 * 1024 ** 3)", memory_mb=512)
    assert not r.passed and "MemoryError" in r.detail


def test_completions_file_mode(tmp_path):
    from typer.testing import CliRunner

    from tierserve.cli import app

    f = tmp_path / "c.jsonl"
    lines = [{"task_id": t, "completion": PROBLEMS[t]["canonical_solution"]} for t in ("HumanEval/0", "HumanEval/1")]
    lines.append({"task_id": "HumanEval/3", "completion": "    return None\n"})
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "he.json"
    res = CliRunner().invoke(app, ["eval", "humaneval", "--completions", str(f), "--workers", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert {r["id"]: r["passed"] for r in rep["rows"]} == {"HumanEval/0": 1, "HumanEval/1": 1, "HumanEval/3": 0}
    assert rep["summary"]["pass@1"] == pytest.approx(2 / 3)
    assert rep["summary"]["missing_problems"] == 161
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": 1}\n')
    res = CliRunner().invoke(app, ["eval", "humaneval", "--completions", str(bad), "-o", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "task_id" in res.output


def test_stop_sequences_and_generation_with_a_fake_generator():
    class Fake(Generator):
        def complete(self, prompts, params, chat=False, advance=lambda n: None):
            assert params.stop == H.STOP
            return [[Completion("    return 1\n\ndef extra():\n    pass", "stop")] for _ in prompts]

        def score(self, prompts, advance=lambda n: None):
            raise NotImplementedError

    samples = H.generate(Fake(), H.select(PROBLEMS, ["0"]), GenParams())
    assert samples == {"HumanEval/0": ["    return 1\n"]}


@pytest.mark.parametrize("level", ["network", "none"])
def test_weaker_isolation_levels_still_block(level, tmp_path, monkeypatch):
    """Where namespaces are not allowed, the Python guard alone still stops these."""
    monkeypatch.setenv("TIERSERVE_SANDBOX", level)
    assert isolation() in (level, "none")
    marker = tmp_path / f"pwned-{level}"
    for code in (f"__import__('os').system('touch {marker}')", f"open({str(marker)!r}, 'w').write('x')",
                 "import socket\nsocket.create_connection(('127.0.0.1', 9))"):
        assert _one(body(code))["passed"] == 0
    assert not marker.exists()
    assert _one(PROBLEMS["HumanEval/2"]["canonical_solution"])["passed"] == 1
