"""Record shapes: the optional system turn of a prompt/response record."""

import pytest

from llmeraser.data import load_records, load_request
from llmeraser.errors import InputError
from llmeraser.render import encode

from helpers import load_tiny, write_jsonl


def test_prompt_record_with_system_turn(tmp_path, tiny_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "system": "Be brief.", "prompt": "hi", "response": "ok"},
                                              {"id": "b", "prompt": "hi", "response": "ok"}])
    with_system, without = load_records(path)
    assert with_system.sides()[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert without.sides()[0] == [{"role": "user", "content": "hi"}]
    _, tok = load_tiny(tiny_dir / "base")
    a, b = (encode(r, tok, "plain", 64) for r in (with_system, without))
    assert a.input_ids[a.n_prompt:] == b.input_ids[b.n_prompt:] and a.n_prompt > b.n_prompt
    # the system turn is on the prompt side: a query edit may change it, a response edit may not
    ok = write_jsonl(tmp_path / "q.jsonl", [{"op": "modify_query", "id": "a", "new": {"system": "Be long."}}])
    assert load_request(ok, [with_system, without]).edits[0].new.sides()[0][0]["content"] == "Be long."
    bad = write_jsonl(tmp_path / "r.jsonl", [{"op": "correct_response", "id": "a", "new": {"system": "x"}}])
    with pytest.raises(InputError, match="may change only"):
        load_request(bad, [with_system, without])
    with pytest.raises(InputError, match="'system' must be a string"):
        load_records(write_jsonl(tmp_path / "e.jsonl", [{"system": 3, "prompt": "hi", "response": "ok"}]))


def test_a_chat_template_that_refuses_the_roles_is_an_input_error():
    """A template whose raise_exception refuses the turns (Gemma's and Llama 2's want user and assistant in turn)
    gives an InputError naming the roles and the fix, not jinja2's TemplateError."""
    from helpers import make_tokenizer
    from llmeraser.render import render_text

    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert render_text(tok, [{"role": "user", "content": "a"}], "b", "chat") == ("a", "b")
    with pytest.raises(InputError, match="refused a prompt with the roles user, user .*roles must alternate.*--template plain"):
        render_text(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "c", "chat")
