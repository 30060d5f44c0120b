"""Files of a run: permissions follow the umask, temp files of killed writers are cleaned up
(and only those), --overwrite deletes only what xtf wrote, and OS errors are one clear line."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from tests._tiny import SAMPLE_TEXTS
from xtf_kernels.cli import main
from xtf_kernels.xtf import RuleConfig, build_report, export_dataset, rundir, score_dataset
from xtf_kernels.xtf import shards as sh
from xtf_kernels.xtf.data import XTFDataError, iter_records, tokenize_records


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("d") / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q{i}:", "response": t}) + "\n" for i, t in enumerate(SAMPLE_TEXTS[:5])))
    return p


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_created_files_follow_the_umask(model_dir, data, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        score_dataset(model_dir, data, out, shard_size=2, progress=False)
        export_dataset(out, tmp_path / "t.jsonl")
        export_dataset(out, tmp_path / "t.parquet")
        build_report(out)
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()] + [tmp_path / "t.jsonl", tmp_path / "t.parquet"]
    assert len(files) > 10
    for p in files:
        assert _mode(p) == 0o666 & ~umask, (p, oct(_mode(p)))
    assert not list(tmp_path.rglob("*.tmp"))


def test_temp_names_identify_their_writer(tmp_path):
    tmp = sh.create_tmp(tmp_path / "shard-00003.parquet")
    assert tmp.parent == tmp_path and tmp.name.startswith(".shard-00003.parquet.")
    assert sh.parse_tmp_name(tmp.name) == ("shard-00003.parquet", os.getpid(), sh.host_tag())
    assert sh.parse_tmp_name(".shard-00003.parquet.k2j3h4x_.tmp") is None  # 0.1.0's mkstemp names
    with pytest.raises(KeyboardInterrupt), sh.atomic_path(tmp_path / "x.json") as t:
        t.write_text("{}")
        raise KeyboardInterrupt
    assert not (tmp_path / "x.json").exists() and [p.name for p in tmp_path.iterdir()] == [tmp.name]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_removed_only_when_no_live_writer_can_own_them(tmp_path):
    tok = tmp_path / "tokens"
    tok.mkdir()
    me = sh.host_tag()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead_here": tok / f".shard-00001.parquet.{_dead_pid()}@{me}.0123abcd.tmp",
            "live_here": tok / f".shard-00002.parquet.{live.pid}@{me}.0123abcd.tmp",
            "mine": tok / f".shard-00003.parquet.{os.getpid()}@{me}.0123abcd.tmp",
            "other_host": tok / f".shard-00004.parquet.{_dead_pid()}@elsewhere-ns1.0123abcd.tmp",
            "old_format": tok / ".shard-00005.parquet.k2j3h4x_.tmp",
            "user_tmp": tok / ".my-notes.tmp",
            "user_file": tok / "notes.txt",
            "json_dead": tmp_path / f".summary.json.{_dead_pid()}@{me}.0123abcd.tmp",
        }
        for p in files.values():
            p.write_text("x")
        past = time.time() - 3600
        for k in ("live_here", "other_host", "old_format", "user_tmp", "user_file"):
            os.utime(files[k], (past, past))
        # start of a run: only dead writers of this machine
        assert rundir.remove_stale_tmp(tmp_path) == 2
        assert not files["dead_here"].exists() and not files["json_dead"].exists()
        assert all(files[k].exists() for k in files if k not in ("dead_here", "json_dead"))
        # after the final barrier: also anything of ours older than this run's start
        assert rundir.remove_stale_tmp(tmp_path, older_than=time.time() - 60) == 3
        left = sorted(k for k, p in files.items() if p.exists())
        assert left == ["mine", "user_file", "user_tmp"]
    finally:
        live.kill()
        live.wait()


def test_overwrite_deletes_only_what_xtf_wrote(model_dir, data, tmp_path):
    out = tmp_path / "run"
    score_dataset(model_dir, data, out, shard_size=2, progress=False)
    build_report(out)
    mine = [out / "notes.md", out / "tokens" / "keep.csv", out / "pass1" / "README", out / "report" / "slides.pdf"]
    for p in mine:
        p.write_text("the user's\n")
    old_report = (out / "report" / "index.html").read_bytes()
    s = score_dataset(model_dir, data, out, shard_size=2, rules=RuleConfig(kn_threshold=0.2), overwrite=True,
                      progress=False)
    assert s["thresholds"]["kn"]["threshold"] == 0.2
    assert all(p.read_text() == "the user's\n" for p in mine)
    assert sorted(p.name for p in (out / "report").iterdir()) == ["slides.pdf"]  # the stale report is gone
    assert len(list((out / "tokens").glob("shard-*.parquet"))) == 3
    build_report(out)
    assert (out / "report" / "index.html").read_bytes() != old_report
    # a report directory holding only xtf's files goes entirely
    (out / "report" / "slides.pdf").unlink()
    assert sorted(p.stem for p in (out / "report").glob("*.png")) == sorted(rundir.PLOT_NAMES)
    score_dataset(model_dir, data, out, shard_size=2, overwrite=True, progress=False)
    assert not (out / "report").exists()


def test_existing_run_messages_are_consistent(model_dir, data, tmp_path):
    out = tmp_path / "run"
    score_dataset(model_dir, data, out, shard_size=2, progress=False)
    with pytest.raises(rundir.RunExistsError) as ei:
        score_dataset(model_dir, data, out, shard_size=2, resume=False, progress=False)
    e = ei.value
    assert "same settings and data" in str(e) and "overwrite=True" in str(e) and "resume=True" in str(e)
    cli = e.describe(cli=True)
    assert "--overwrite" in cli and "drop --no-resume" in cli and "=True" not in cli
    with pytest.raises(rundir.RunExistsError, match=r"different settings or data \(batch_size changed\)"):
        score_dataset(model_dir, data, out, shard_size=2, batch_size=3, progress=False)
    (out / "config.json").unlink()
    with pytest.raises(rundir.RunExistsError, match="holds shards but no config.json"):
        score_dataset(model_dir, data, out, shard_size=2, progress=False)


def _raise_oserror(err: int, text: str):
    def fake(path):
        raise OSError(err, text, str(Path(path).parent / f".{Path(path).name}.123@h.0123abcd.tmp"))

    return fake


@pytest.mark.parametrize("err,text", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system"),
                                      (errno.ENOSPC, "No space left on device")])
def test_unwritable_output_is_one_line(model_dir, data, tmp_path, monkeypatch, capsys, err, text):
    run = tmp_path / "run"
    score_dataset(model_dir, data, run, shard_size=2, progress=False)
    monkeypatch.setattr(sh, "create_tmp", _raise_oserror(err, text))
    cases = [
        (["score", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "new"), "--quiet"],
         f"xtf score: error: --out: cannot write to {tmp_path / 'new'} ({text})"),
        (["export", str(run), "--to", str(tmp_path / "e" / "t.jsonl")],
         f"xtf export: error: --to: cannot write to {tmp_path / 'e'} ({text})"),
        (["report", str(run)], f"xtf report: error: --out: cannot write to {run / 'report'} ({text})"),
    ]
    for argv, expect in cases:
        assert main(argv) == 2
        cap = capsys.readouterr()
        assert cap.err.strip() == expect and cap.out == ""


def test_device_without_backend_is_a_clear_error():
    from xtf_kernels.xtf.pipeline import _resolve_device

    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda:1' requested, but no CUDA device is available"):
            _resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device: expected"):
        _resolve_device("gpu")


def test_jsonl_encoding_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\r\n\n{"prompt": "\xff"}\n{"prompt": "c", "response": "d"}\n')
    recs = list(iter_records(p))
    assert [w for w, _ in recs] == [f"{p}, line 1", f"{p}, line 3", f"{p}, line 4"]
    assert recs[0][1] == {"prompt": "a", "response": "b"}  # byte-order mark and CRLF are fine
    assert isinstance(recs[1][1], XTFDataError) and "line 3: not valid UTF-8 (byte 0xff at byte 13" in str(recs[1][1])

    def tok(text, add_special_tokens=True):  # one id per character is all tokenize_records needs here
        return {"input_ids": [ord(c) for c in text]}

    ex, st = tokenize_records(p, tok, max_length=64, on_error="skip", add_eos=False)
    assert len(ex) == 2 and st.skipped == {"bad_record": 1} and "line 3: not valid UTF-8" in st.errors[0]
    with pytest.raises(XTFDataError, match="line 3: not valid UTF-8"):
        tokenize_records(p, tok, max_length=64, add_eos=False)


def test_rank_failure_reaches_every_rank_single_process():
    sh.raise_if_any_rank_failed(None)
    with pytest.raises(KeyError):
        sh.raise_if_any_rank_failed(KeyError("x"))


def test_score_timing_excludes_backend_preparation(model_dir, data, tmp_path, monkeypatch):
    """A first-use backend build happens before the tokens/s clock starts."""
    from xtf_kernels.xtf import pipeline

    marks = {}
    real = pipeline.prepare_backend

    def slow_prepare(*a):
        real(*a)
        time.sleep(3.0)  # stands in for a 30-60 s compile
        marks["prepared"] = time.perf_counter()

    monkeypatch.setattr(pipeline, "prepare_backend", slow_prepare)
    s = score_dataset(model_dir, data, tmp_path / "run", shard_size=2, progress=False)
    after = time.perf_counter()
    assert "prepared" in marks
    assert s["run"]["seconds"] <= after - marks["prepared"]
    assert s["run"]["tokens_scored"] == pa.concat_tables(
        [sh.read_shard(p) for p in sorted((tmp_path / "run" / "tokens").glob("shard-*.parquet"))]).num_rows
