"""What ``xtf score`` accepts on its command line and in ``--model`` (issue 17, items 3, 6, 10)."""

from __future__ import annotations

import json

import pytest

from tests._tiny import make_tiny_model, make_tiny_model_dir, make_tokenizer
from xtf_kernels.cli import build_parser

SCORE = ["score", "--model", "m", "--data", "d.jsonl", "--out", "o"]


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--protect", "2", "202"], [2, 202]),  # the README's form
        (["--protect", "2,202"], [2, 202]),
        (["--protect", "2", "--protect", "5,6"], [2, 5, 6]),
        ([], None),
    ],
)
def test_protect_takes_spaces_or_commas(flags, want):
    assert build_parser(with_demo=False).parse_args([*SCORE, *flags]).protect == want


@pytest.mark.parametrize("bad", [["--protect", "eos"], ["--protect", "-1"], ["--protect"]])
def test_protect_refuses_non_ids(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser(with_demo=False).parse_args([*SCORE, *bad])
    assert "--protect" in capsys.readouterr().err


def test_readme_protect_example_parses():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    examples = re.findall(r"`--protect ([^`]*)`", readme)
    assert examples
    for ex in examples:
        assert build_parser(with_demo=False).parse_args([*SCORE, "--protect", *ex.split()]).protect


# --- item 3: a model directory without tokenizer files, or a tokenizer that is not the model's


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [{"prompt": "What is 12 plus 30?", "response": " The answer is 42."}] * 3


def test_model_dir_without_tokenizer_files_is_one_clear_error(tmp_path, capsys):
    """Qwen2 without tokenizer files: transformers builds an empty tokenizer (every text -> no
    tokens) and scoring used to 'succeed' on EOS tokens only."""
    from xtf_kernels.cli import main

    notok = make_tiny_model_dir(tmp_path, arch="qwen2", name="notok", save_tokenizer=False)
    data = _write(tmp_path / "d.jsonl", RECORDS)
    capsys.readouterr()  # saving the model printed a progress bar
    rc = main(
        [
            "score",
            "--model",
            str(notok),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"xtf score: error: --model: {notok} has no tokenizer files")
    assert "tokenizer.json" in err[0] and "tokenizer.model" in err[0]
    assert not (tmp_path / "o" / "summary.json").exists()


def test_model_dir_without_tokenizer_files_is_fine_with_tokenizer_given(tmp_path):
    from xtf_kernels.xtf import score_dataset

    notok = make_tiny_model_dir(tmp_path, name="notok", save_tokenizer=False)
    data = _write(tmp_path / "d.jsonl", RECORDS)
    s = score_dataset(notok, data, tmp_path / "o", tokenizer=make_tokenizer(), progress=False)
    assert s["examples"]["scored"] == 3


def test_tokenizer_far_smaller_than_the_embedding_is_refused(tmp_path):
    from xtf_kernels.xtf import load_model_and_tokenizer, score_dataset

    d = tmp_path / "big"
    make_tiny_model(vocab_size=1024).save_pretrained(d)  # 1024 rows, a 384-token tokenizer
    make_tokenizer().save_pretrained(d)
    with pytest.raises(
        ValueError,
        match=r"tokenizer: the tokenizer in .*big has 384 tokens, under half the model's 1024",
    ):
        load_model_and_tokenizer(d)
    model = make_tiny_model(vocab_size=1024)
    with pytest.raises(ValueError, match=r"tokenizer: tokenizer= has 384 tokens"):
        score_dataset(
            model,
            _write(tmp_path / "d.jsonl", RECORDS),
            tmp_path / "o",
            tokenizer=make_tokenizer(),
            progress=False,
        )


def _unk_tokenizer(n: int = 400):
    """A word-level tokenizer of ``n`` tokens that knows none of the words of RECORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(n - 2)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>"
    )


def test_tokenizer_encoding_the_first_record_to_nothing_is_refused(model_dir, tmp_path):
    from xtf_kernels.xtf import score_dataset

    tok = _unk_tokenizer()
    assert set(tok(RECORDS[0]["prompt"] + RECORDS[0]["response"])["input_ids"]) == {0}
    with pytest.raises(
        ValueError, match=r"tokenizer: it encodes the first record \(example 0\) to special tokens"
    ):
        score_dataset(
            model_dir,
            _write(tmp_path / "d.jsonl", RECORDS),
            tmp_path / "o",
            tokenizer=tok,
            progress=False,
        )


# --- item 10: prompt/response records are joined as they are, or rendered with --chat-template

P, R = "What is 12 plus 30?", " The answer is 42."


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_response_is_joined_as_is_token_by_token():
    from xtf_kernels.xtf.data import tokenize_records

    tok = make_tokenizer()
    (ex,), _ = tokenize_records([{"prompt": P, "response": R}], tok, max_length=256)
    p = tok(P)["input_ids"]  # with the tokenizer's own special tokens (none here)
    assert ex.input_ids == p + _enc(tok, R) + [tok.eos_token_id] and ex.n_prompt == len(p)


def test_chat_template_renders_prompt_response_token_by_token():
    from xtf_kernels.xtf.data import tokenize_records

    tok = make_tokenizer()
    (ex,), _ = tokenize_records(
        [{"prompt": P, "response": R}], tok, max_length=256, chat_template=True
    )
    bos, eos = tok.bos_token_id, tok.eos_token_id
    user, asst = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    prompt = [bos, user, *_enc(tok, P), eos, asst]  # <s><|user|>P</s><|assistant|>
    assert ex.input_ids == prompt + _enc(tok, R) + [eos] and ex.n_prompt == len(prompt)
    # exactly what the same conversation as `messages` gives
    msgs = [{"role": "user", "content": P}, {"role": "assistant", "content": R}]
    (ex2,), _ = tokenize_records([{"messages": msgs}], tok, max_length=256, chat_template=True)
    assert (ex2.input_ids, ex2.n_prompt) == (ex.input_ids, ex.n_prompt)


def test_chat_template_without_one_is_an_error_not_a_skip():
    from xtf_kernels.xtf.data import tokenize_records

    tok = make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat_template: the tokenizer has no chat template"):
        tokenize_records(
            [{"prompt": P, "response": R}], tok, max_length=256, on_error="skip", chat_template=True
        )
    with pytest.raises(TypeError, match="chat_template"):
        tokenize_records([{"prompt": P, "response": R}], tok, max_length=256, chat_template="yes")


def test_xtf_score_chat_template_flag(model_dir, tmp_path, capsys):
    from xtf_kernels.cli import main
    from xtf_kernels.xtf import load_token_table

    data = _write(tmp_path / "d.jsonl", [{"prompt": P, "response": R}] * 2)
    out = tmp_path / "o"
    assert (
        main(
            [
                "score",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--quiet",
                "--chat-template",
            ]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["settings"]["chat_template"] is True
    t = load_token_table(out).to_pylist()
    tok = make_tokenizer()
    user, asst = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    want = [
        tok.bos_token_id,
        user,
        *_enc(tok, P),
        tok.eos_token_id,
        asst,
        *_enc(tok, R),
        tok.eos_token_id,
    ]
    ex0 = sorted(
        (r["position"], r["token_id"], bool(r["is_response"])) for r in t if r["example_id"] == 0
    )
    assert [tid for _, tid, _ in ex0] == want
    assert [resp for _, _, resp in ex0] == [False] * (len(_enc(tok, P)) + 4) + [True] * (
        len(_enc(tok, R)) + 1
    )
    # a tokenizer without a template: one line, status 2
    notpl = make_tiny_model_dir(tmp_path, name="notpl", chat_template=None)
    capsys.readouterr()
    assert (
        main(
            [
                "score",
                "--model",
                str(notpl),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o2"),
                "--quiet",
                "--chat-template",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        "xtf score: error: --chat-template: the tokenizer has no chat template (set tokenizer.chat_template, "
        "or score prompt/response records as they are)"
    )
