"""The attention benchmarks (score_throughput.py, attention_memory.py) run end to end on tiny
settings and write their files."""

from __future__ import annotations

import csv

from benchmarks import score_throughput as st


def test_layouts_are_deterministic_and_cover_the_documents():
    a = st._layouts(40, 2048, 4)
    assert a == st._layouts(40, 2048, 4)
    lens = [n for g in a["padded"] for n in g]
    assert len(lens) == 40 and all(32 <= n <= 1024 for n in lens)
    assert sorted(n for r in a["packed"] for n in r) == sorted(lens)
    assert all(sum(r) <= 2048 for r in a["packed"])


def test_score_throughput_tiny_run(tmp_path, capsys):
    st.main([
        "--device", "cpu", "--lengths", "64", "--tokens", "128", "--batch-tokens", "128", "--repeats", "1",
        "--threads", "1", "--docs", "6", "--row", "1024", "--max-naive-gb", "1", "--score-docs", "3",
        "--out", str(tmp_path),
    ])
    rows = list(csv.DictReader(open(tmp_path / "score_throughput_cpu.csv")))
    assert [r["method"] for r in rows] == ["floor", "ours", "naive"]
    assert all(r["status"] == "ok" and float(r["seconds"]) > 0 and float(r["peak_mb"]) > 0 for r in rows)
    assert rows[0]["vs_floor"] == "1.0" and rows[0]["examples"] == "2"
    mixed = list(csv.DictReader(open(tmp_path / "score_throughput_mixed_cpu.csv")))
    assert [r["layout"] for r in mixed] == ["padded", "packed", "packed-no-skip"]
    assert mixed[1]["note"].startswith("target:") and int(mixed[1]["real_tokens"]) <= int(mixed[1]["slots"])
    layer = list(csv.DictReader(open(tmp_path / "score_throughput_layer_cpu.csv")))
    assert {r["method"] for r in layer} == {"sdpa", "ours", "lse-reuse"}
    packed = list(csv.DictReader(open(tmp_path / "score_throughput_packed_cpu.csv")))
    assert [r["layout"] for r in packed] == ["padded", "packed"] and all(r["status"] == "ok" for r in packed)
    assert packed[0]["real_tokens"] == packed[1]["real_tokens"] and packed[1]["note"].startswith("target:")
    assert int(packed[1]["positions"]) <= int(packed[0]["positions"])
    assert (tmp_path / "score_throughput_packed_cpu.png").stat().st_size > 0
    assert (tmp_path / "score_throughput_cpu.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "vs_floor" in out and "vs_padded" in out and "vs_sdpa" in out


def test_naive_reported_as_skipped_when_too_big(tmp_path):
    st.main([
        "--device", "cpu", "--lengths", "64", "--tokens", "64", "--methods", "naive", "--repeats", "1",
        "--threads", "1", "--max-naive-gb", "0.0001", "--no-mixed", "--no-layer", "--no-packed-scoring",
        "--out", str(tmp_path),
    ])
    (row,) = csv.DictReader(open(tmp_path / "score_throughput_cpu.csv"))
    assert row["status"] == "skipped" and "GiB" in row["note"]


def test_attention_memory_tiny_run(tmp_path):
    """benchmarks/attention_memory.py: each case in its own child, one CSV row per case."""
    from benchmarks import attention_memory as am

    am.main(["--device", "cpu", "--lengths", "64", "--Hq", "2", "--Hkv", "1", "--Dh", "8", "--threads", "1",
             "--sdpa", "--out", str(tmp_path), "--tag", "tiny"])
    rows = list(csv.DictReader(open(tmp_path / "attention_memory_tiny.csv")))
    assert [r["method"] for r in rows] == ["xtf", "eager", "sdpa"]
    assert all(r["status"] == "ok" and float(r["peak_mb"]) > 0 and float(r["seconds"]) > 0 for r in rows), rows
    assert (tmp_path / "attention_memory_tiny.png").stat().st_size > 0


def test_run_child_reports_instead_of_raising():
    import sys

    from benchmarks._child import run_child

    assert run_child([sys.executable, "-c", "print('x'); print('{\"a\": 1}')"], 60) == ({"a": 1}, None)
    out, failure = run_child([sys.executable, "-c", "print('not json')"], 60)
    assert out is None and failure["status"] == "failed" and "not a JSON result" in failure["note"]
    out, failure = run_child([sys.executable, "-c", "import sys; sys.exit('boom')"], 60)
    assert out is None and failure == {"status": "failed", "note": "boom"}
