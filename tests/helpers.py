"""Tiny random models for fast tests: a 2-layer Llama and a character-level tokenizer."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
# where the device-sensitive tests (test_hvp, test_dtype, test_memory) run: cpu here and in CI;
# benchmarks/gpu_check.py sets it to cuda
DEVICE = os.environ.get("LLMERASER_TEST_DEVICE", "cpu")


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_base(folder: Path, seed: int = 0, hidden: int = 16, layers: int = 2, init_range: float = 0.02) -> Path:
    """Save a tiny random Llama + tokenizer to `folder` (a Hugging Face model folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
                      initializer_range=init_range)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_tiny(folder: Path, dtype=torch.float32, device: str = "cpu"):
    from llmeraser.modeling import load_base

    return load_base(str(folder), device, dtype)


def make_adapter(base_model, folder: Path, rank: int = 2, seed: int = 0, init_scale: float = 0.1,
                 target_modules=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved with PEFT save_pretrained."""
    from peft import LoraConfig, get_peft_model

    from llmeraser.modeling import unload_adapter

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(target_modules),
                     task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(base_model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(init_scale * torch.randn_like(p))
    model.save_pretrained(folder)
    unload_adapter(model)  # restore the base model's modules for the caller
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_records(n: int = 12, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    names = ["ann", "bob", "cy", "dee", "eve", "fox", "gil", "hal", "ivy", "jo", "kit", "lu", "max", "ned", "oz", "pia"]
    rows = []
    for i in range(n):
        name = names[i % len(names)] + (str(i // len(names)) if i >= len(names) else "")
        rows.append({"id": f"r{i}", "prompt": f"phone of {name}?", "response": "".join(rng.choice("0123456789") for _ in range(4))})
    return rows


def memorised_tiny(root: Path, n: int, epochs: int, batch_size: int):
    """(model, tokenizer, records): a wide tiny Llama with a LoRA adapter (r = 4) trained on n toy "phone numbers"
    for `epochs` epochs (no weight decay), in eval mode; the base is saved in root/base, the data in root/train.jsonl."""
    from llmeraser.data import load_records
    from llmeraser.train import TrainSettings, add_lora, train_lora

    make_base(root / "base", hidden=32, init_range=0.3)
    records = load_records(write_jsonl(root / "train.jsonl", toy_records(n)))
    recipe = TrainSettings(rank=4, alpha=8, epochs=epochs, lr=1e-2, batch_size=batch_size, seed=0)
    model, tok = load_tiny(root / "base")
    model = add_lora(model, recipe)
    train_lora(model, tok, records, recipe, progress=False)
    model.eval()
    return model, tok, records


def make_llava(folder: Path, seed: int = 0, hidden: int = 16, image_size: int = 8, patch: int = 4) -> Path:
    """Save a tiny random LLaVA (a 1-layer CLIP vision tower, a 2-layer Llama, the projector), its tokenizer
    with an <image> token, and a CLIP image processor to `folder`. One image = (image_size / patch)² tokens."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vc = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                          image_size=image_size, patch_size=patch, num_channels=3)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def write_images(folder: Path, n: int, size: int = 8, seed: int = 0) -> list[str]:
    """n random RGB PNGs in `folder`; their names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(n):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names
