"""The ``xtf`` command line as a new user meets it: real subprocess runs with bad input, bad
output locations and interruptions. Every failure is one line on stderr, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._tiny import SAMPLE_TEXTS, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


def xtf(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``xtf ARGS`` (this checkout's code) and capture its output."""
    return subprocess.run([sys.executable, "-m", "xtf_kernels.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=_env(), **kw)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _lines(stderr: str) -> list[str]:
    """stderr lines, without the native backend's first-use build notes."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("xtf_kernels: ")]


def one_line_error(r: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = _lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith(f"xtf {command}: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    make_tiny_model_dir(d, name="model")
    with open(d / "d.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Q{i}: " + SAMPLE_TEXTS[i][:16], "response": SAMPLE_TEXTS[i]}) + "\n")
    return d


def _score(work: Path, out: str, *extra: str, data: str = "d.jsonl") -> subprocess.CompletedProcess:
    return xtf("score", "--model", "model", "--data", data, "--out", out, "--shard-size", "2", *extra, cwd=work)


def test_help_lists_every_command(work):
    r = xtf("--help", cwd=work)
    assert r.returncode == 0
    for cmd in ("score", "export", "report", "demo"):
        assert cmd in r.stdout
    assert "end-to-end" in r.stdout
    assert xtf("demo", "--help", cwd=work).returncode == 0


def test_non_utf8_skipped_truncated_are_reported(work):
    long = " ".join(SAMPLE_TEXTS)
    raw = [json.dumps({"prompt": "Q: 1+1?", "response": "2"}).encode(),
           b'{"prompt": "caf\xe9", "response": "latin-1, not UTF-8"}',
           b'{"prompt": "broken JSON"',
           json.dumps({"prompt": long, "response": "x"}).encode(),
           json.dumps({"prompt": "Q: long answer", "response": long}).encode()]
    (work / "mixed.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    r = _score(work, "o_mixed", "--quiet", "--max-length", "32", data="mixed.jsonl")
    one_line_error(r, "score", "mixed.jsonl, line 2: not valid UTF-8 (byte 0xe9", "--on-error skip")
    assert not (work / "o_mixed" / "tokens").exists()

    r = _score(work, "o_mixed", "--quiet", "--max-length", "32", "--on-error", "skip", data="mixed.jsonl")
    assert r.returncode == 0 and "Traceback" not in r.stderr and _lines(r.stderr) == [], r.stderr
    out = r.stdout
    assert "scored 2 examples" in out
    assert "skipped 3 of 5 records: 2 malformed" in out and "1 prompt alone fills the context of 32 tokens" in out
    assert "mixed.jsonl, line 2: not valid UTF-8" in out and "mixed.jsonl, line 3: invalid JSON" in out
    assert "truncated 1 response to the context of 32 tokens" in out
    s = json.loads((work / "o_mixed" / "summary.json").read_text())
    assert s["examples"]["skipped"] == {"bad_record": 2, "too_long": 1} and s["examples"]["truncated"] == 1

    r = _score(work, "o_mixed2", "--quiet", "--max-length", "32", "--on-error", "skip", "--truncation", "skip",
               data="mixed.jsonl")
    assert r.returncode == 0 and "2 longer than the context of 32 tokens (--truncation skip)" in r.stdout
    assert "truncated" not in r.stdout


def test_bad_output_locations_and_device(work):
    (work / "a_file").write_text("not a directory\n")
    one_line_error(_score(work, "a_file", "--quiet"), "score", "--out: a_file is an existing file, not a directory")
    one_line_error(_score(work, "a_file/run", "--quiet"), "score", "--out: a_file is an existing file")
    if not torch.cuda.is_available():
        one_line_error(_score(work, "o_dev", "--quiet", "--device", "cuda"), "score",
                       "--device: 'cuda' requested, but no CUDA device is available")
    one_line_error(_score(work, "o_dev", "--quiet", "--device", "tpu9"), "score", "--device:")
    one_line_error(xtf("export", "nowhere", "--to", "t.jsonl", cwd=work), "export", "run `xtf score` first")
    one_line_error(xtf("report", "nowhere", cwd=work), "report", "run `xtf score` first")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through file permissions")
def test_read_only_directory_real(work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(_score(work, str(ro / "run"), "--quiet"), "score", "--out: cannot write to", "Permission denied")
    finally:
        ro.chmod(0o755)


def test_runs_resume_refuse_and_overwrite(work):
    r = _score(work, "o_run")
    assert r.returncode == 0, r.stderr
    assert "xtf pass 1" in r.stderr and "(rank 0)" not in r.stderr and "Loading weights" in r.stderr
    r = _score(work, "o_run", "--quiet")
    assert r.returncode == 0 and _lines(r.stderr) == [], r.stderr  # --quiet: no bar at all
    assert "nothing to do: all 3 shards were already scored" in r.stdout
    msg = one_line_error(_score(work, "o_run", "--quiet", "--no-resume"), "score",
                         "o_run already holds this run", "--overwrite", "drop --no-resume")
    assert "fingerprint" not in msg and "=True" not in msg and "!=" not in msg
    msg = one_line_error(_score(work, "o_run", "--quiet", "--kn-threshold", "0.1", "--max-length", "100"), "score",
                         "different settings or data (--max-length, the rule options changed)", "--overwrite")
    assert "=True" not in msg
    r = _score(work, "o_run", "--quiet", "--no-resume", "--overwrite")
    assert r.returncode == 0 and "resumed" not in r.stdout and "nothing to do" not in r.stdout

    # export / report: clear errors for an unusable destination, the SLM baseline without ref log-probs
    one_line_error(xtf("export", "o_run", "--to", "o_run", cwd=work), "export", "--to: o_run is a directory")
    one_line_error(xtf("export", "o_run", "--to", "x.jsonl", "--policy", "slm", cwd=work), "export",
                   "score with --ref-model")
    one_line_error(xtf("report", "o_run", "--out", "o_run", cwd=work), "report", "--out: o_run is a directory")
    (work / "a_file2").write_text("a file\n")
    one_line_error(xtf("report", "o_run", "--out", "a_file2/index.html", cwd=work), "report",
                   "--out: a_file2 is an existing file, not a directory")
    one_line_error(xtf("export", "o_run", "--to", "a_file2/t.jsonl", cwd=work), "export",
                   "--to: a_file2 is an existing file, not a directory")


def test_ctrl_c_then_resume(work):
    with open(work / "many.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"Q{i}:", "response": " ".join(SAMPLE_TEXTS[: 1 + i % 4])}) + "\n")
    args = [sys.executable, "-m", "xtf_kernels.cli", "score", "--model", "model", "--data", "many.jsonl", "--out",
            "o_int", "--shard-size", "1", "--batch-size", "1", "--quiet"]
    p = subprocess.Popen(args, cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((work / "o_int" / "pass1").glob("shard-*.parquet")) and time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _lines(err) == ["xtf score: interrupted; run the same command again to resume"], err
    done = len(list((work / "o_int" / "pass1").glob("shard-*.parquet")))
    assert 1 <= done < 12
    r = subprocess.run(args, cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resumed: reused {done} of 12 pass-1 shards and 0 of 12 final shards" in r.stdout
    assert not list((work / "o_int").rglob("*.tmp"))


_KILL_IN_PASS2 = """
import os, signal, sys
import pyarrow.parquet as pq
real = pq.write_table
def write(table, where, *a, **k):
    real(table, where, *a, **k)
    if os.sep + "tokens" + os.sep in str(where):
        os.kill(os.getpid(), signal.SIGKILL)   # the temp file is written, the rename never happens
pq.write_table = write
from xtf_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_in_pass2_leaves_nothing_after_rerun(work):
    args = ["score", "--model", "model", "--data", "d.jsonl", "--out", "o_kill", "--shard-size", "2", "--quiet"]
    r = subprocess.run([sys.executable, "-c", _KILL_IN_PASS2, *args], cwd=work, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = list((work / "o_kill" / "tokens").glob(".shard-*.parquet.*.tmp"))
    assert len(left) == 1 and not list((work / "o_kill" / "tokens").glob("shard-*.parquet"))
    user = work / "o_kill" / "tokens" / ".my-notes.tmp"
    user.write_text("the user's file\n")
    r = xtf(*args, cwd=work)
    assert r.returncode == 0, r.stderr
    assert "resumed: reused 3 of 3 pass-1 shards and 0 of 3 final shards" in r.stdout
    assert not left[0].exists() and user.exists()
    ref = xtf("score", "--model", "model", "--data", "d.jsonl", "--out", "o_ref", "--shard-size", "2", "--quiet",
              cwd=work)
    assert ref.returncode == 0
    for sub in ("pass1", "tokens"):
        names = sorted(p.name for p in (work / "o_ref" / sub).glob("shard-*"))
        assert names == sorted(p.name for p in (work / "o_kill" / sub).glob("shard-*"))
        for n in names:
            assert (work / "o_ref" / sub / n).read_bytes() == (work / "o_kill" / sub / n).read_bytes()


def test_native_build_says_what_it_is_doing(tmp_path, monkeypatch, capsys):
    """A first build prints a line before compiling (and one while waiting for another process's)."""
    import threading
    import types

    fcntl = pytest.importorskip("fcntl")
    from torch.utils import cpp_extension

    from xtf_kernels import _native_build as nb

    if nb.source_dir() is None or nb._compiler() is None or not cpp_extension.is_ninja_available():
        pytest.skip("no sources, compiler or ninja: nothing is ever compiled here")
    monkeypatch.setenv("XTF_CACHE", str(tmp_path))
    monkeypatch.delenv("XTF_DISABLE_NATIVE", raising=False)
    printed_before_compile = []

    def fake_load(**kw):  # stands in for the 30-60 s compile
        printed_before_compile.append(capsys.readouterr().err)
        return types.SimpleNamespace(build_info=lambda: "fake")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    build_dir = tmp_path / f"xtf_native_{nb.build_key(nb.source_dir())}"
    build_dir.mkdir(parents=True)
    err = ""
    with open(build_dir / ".lock", "a+") as held:  # another process is building
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        t = threading.Thread(target=nb._build, args=(False,), daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while "waiting for another process" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
        t.join(60)
    assert "xtf_kernels: waiting for another process compiling the native CPU kernels" in err
    assert len(printed_before_compile) == 1
    assert "xtf_kernels: compiling the native CPU kernels (first use on this machine" in printed_before_compile[0]
    assert "native CPU kernels compiled in" in capsys.readouterr().err


def test_demo_prepares_the_backend_first_and_ctrl_c_is_clean(tmp_path, monkeypatch, capsys):
    import xtf_kernels.backends as backends
    import xtf_kernels.demo.run as demo_run
    from xtf_kernels.cli import main

    events = []
    real = backends.resolve_backend
    monkeypatch.setattr(backends, "resolve_backend", lambda *a: events.append("backend") or real(*a))

    def interrupted(*a, **k):
        events.append("run")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_run, "run_demo", interrupted)
    assert main(["demo", "--smoke", "--out", str(tmp_path), "--quiet"]) == 130
    assert events == ["backend", "run"]
    err = capsys.readouterr().err
    assert "xtf demo: interrupted" in err and "Traceback" not in err
