"""Every bad input exits non-zero with a message naming the problem and the fix, and writes nothing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmeraser.cli import main
from llmeraser.data import load_records

from helpers import make_base, write_jsonl


def run(tiny_dir, tmp_path, request_rows=None, data=None, adapter=None, base=None, request_text=None):
    req = tmp_path / "req.jsonl"
    if request_text is not None:
        req.write_text(request_text)
    else:
        write_jsonl(req, request_rows or [{"op": "remove", "id": "r1"}])
    out = tmp_path / "out"
    code = main(["unlearn", "--base", str(base or tiny_dir / "base"), "--adapter", str(adapter or tiny_dir / "adapter"),
                 "--data", str(data or tiny_dir / "train.jsonl"), "--request", str(req), "--out", str(out),
                 "--device", "cpu", "--quiet"])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return code


@pytest.mark.parametrize("rows, text, message", [
    ([{"op": "remove", "id": "nope"}], None, "req.jsonl:1: unknown id 'nope'"),
    ([{"op": "remove", "id": "r1"}, {"op": "remove", "id": "r1"}], None, "req.jsonl:2: id 'r1' is already edited at line 1"),
    ([{"op": "modify_query", "id": "r1", "new": {"response": "x"}}], None, "may change only ['image', 'prompt', 'system']"),
    ([{"op": "correct_response", "id": "r1", "new": {"prompt": "x"}}], None, "use modify_query for the prompt side"),
    ([{"op": "correct_response", "id": "r1"}], None, "needs a non-empty object 'new'"),
    ([{"op": "forget", "id": "r1"}], None, "'op' must be one of"),
    ([{"op": "remove", "id": "r1", "new": {"prompt": "x"}}], None, "'remove' takes no 'new'"),
    (None, '{"op": "remove", "id": "r1"}\n{"op": "remove", "id": \n', "req.jsonl:2: malformed JSON"),
    ([{"op": "remove", "id": f"r{i}"} for i in range(12)], None, "leaves nothing to train on"),
])
def test_bad_request(tiny_dir, tmp_path, capsys, rows, text, message):
    assert run(tiny_dir, tmp_path, rows, request_text=text) == 2
    assert message in capsys.readouterr().err


def test_duplicate_ids_in_data(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "p", "response": "r"}, {"id": "a", "prompt": "q", "response": "s"}])
    assert run(tiny_dir, tmp_path, [{"op": "remove", "id": "a"}], data=data) == 2
    assert "d.jsonl:2: duplicate id 'a' (first at" in capsys.readouterr().err


def test_malformed_data(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": }\n')
    assert run(tiny_dir, tmp_path, data=data) == 2
    assert "d.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_unknown_record_shape(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "p", "answer": "r"}])
    assert run(tiny_dir, tmp_path, data=data) == 2
    assert "d.jsonl:1: unknown record shape" in capsys.readouterr().err


def test_adapter_does_not_match_base(tiny_dir, tmp_path, capsys):
    other = make_base(tmp_path / "other_base", hidden=24)
    assert run(tiny_dir, tmp_path, base=other) == 2
    assert "does not match --base" in capsys.readouterr().err


def test_missing_adapter_files(tiny_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(tiny_dir, tmp_path, adapter=tmp_path / "empty") == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_non_finite_adapter(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad_adapter"
    shutil.copytree(tiny_dir / "adapter", bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(bad / "adapter_model.safetensors"))
    assert run(tiny_dir, tmp_path, adapter=bad) == 2
    assert "not finite" in capsys.readouterr().err


def test_three_record_shapes(tmp_path):
    rows = [
        {"prompt": "p", "response": "r"},
        {"instruction": "i", "input": "x", "output": "Yes."},
        {"id": 7, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a"}]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))  # a JSON array is accepted as well as JSONL
    recs = load_records(path)
    assert [r.id for r in recs] == ["0", "1", "7"]
    assert recs[1].sides() == ([{"role": "user", "content": "i\n\nx"}], "Yes.")
    assert recs[2].sides() == ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "a")


def test_chat_edit_must_keep_its_side(tmp_path):
    from llmeraser.data import load_request
    from llmeraser.errors import InputError

    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}, {"messages": msgs}]))
    changed_answer = [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "b"}]
    req = write_jsonl(tmp_path / "r.jsonl", [{"op": "modify_query", "id": "0", "new": {"messages": changed_answer}}])
    with pytest.raises(InputError, match="modify_query changed the response"):
        load_request(req, recs)
