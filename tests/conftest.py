import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import DEVICE, load_tiny, make_adapter, make_base, toy_records, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers), a random LoRA adapter on q/v, and toy training data."""
    root = tmp_path_factory.mktemp("tiny")
    make_base(root / "base")
    model, _ = load_tiny(root / "base")
    make_adapter(model, root / "adapter")
    write_jsonl(root / "train.jsonl", toy_records(12))
    return root


@pytest.fixture(scope="session")
def trainable_dir(tmp_path_factory) -> Path:
    """Like tiny_dir, with a wider init so that a LoRA adapter alone can fit the toy data."""
    root = tmp_path_factory.mktemp("trainable")
    make_base(root / "base", hidden=32, init_range=0.3)
    model, _ = load_tiny(root / "base")
    make_adapter(model, root / "adapter")
    write_jsonl(root / "train.jsonl", toy_records(12))
    return root


@pytest.fixture(scope="module")
def tiny64(tiny_dir):
    """(PeftModel in float64, tokenizer, records) for exact-arithmetic checks."""
    from llmeraser.data import load_records
    from llmeraser.modeling import load_adapter

    model, tok = load_tiny(tiny_dir / "base", torch.float64, DEVICE)
    return load_adapter(model, tiny_dir / "adapter"), tok, load_records(tiny_dir / "train.jsonl")
