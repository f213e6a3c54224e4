"""The multimodal scenario: response correction on a LLaVA-style vision-language model.
(`python -m benchmarks.multimodal --help`)

1. **Images**: scikit-learn's UCI handwritten digits (1,797 8×8 images, shipped with the package, no download),
   upscaled to `image_size` pixels and written as PNG files; seeded train/test splits.
2. **Model**: a LLaVA assembled in the benchmark from SmolLM2-135M (language model and head, as loaded by
   `--base smollm2`), a small CLIP vision tower (`vision_layers` layers, width `vision_width`, patch 4) and a
   projector, both seeded at random. The vision tower stays **fixed at its random initialisation**: LoRA and the
   trainable projector must learn to read its features (see `vision_probe` in the results: a least-squares probe
   of the digit from the tower's mean features, train → test, says how much a fixed random tower keeps). The image
   token is an existing SmolLM2 token (`IMAGE_TOKEN`), never an added one.
3. **RC**: every training record asks "Which digit is shown?" about one image; 30% of the training answers are
   wrong (the spurious labels: a random other digit). The request corrects them. Compared: the corrupted
   original, retraining on the correct answers, llmeraser, fine-tuning on the corrected records. Metrics: test
   accuracy (the first digit of the greedy answer), accuracy on the corrected images, seconds and peak memory of
   each stage, and the paired bootstrap interval of llmeraser − retrain on test accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import hardware

HERE = Path(__file__).resolve().parent
SEED = 0
WRONG = 0.30  # the share of training answers that are wrong (the 30%)
IMAGE_TOKEN = "<file_sep>"  # an existing SmolLM2 token that ordinary text never produces
PROMPT = "Which digit is shown?"


@dataclass(frozen=True)
class Sizes:
    n_train: int
    n_test: int
    image_size: int = 16
    vision_width: int = 64
    vision_layers: int = 2
    epochs: float = 4.0
    lr: float = 3e-3


QUICK = Sizes(n_train=40, n_test=40, epochs=3.0)
FULL = Sizes(n_train=300, n_test=300)


def digits():
    """(images [n, 8, 8] in 0..16, labels) of sklearn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def write_pngs(folder: Path, images, size: int) -> list[str]:
    """Each 8×8 image scaled to 0..255, upscaled to size×size (nearest), RGB, as folder/<i>.png; their names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i}.png"
        if not (folder / name).is_file():
            gray = (np.asarray(img, dtype=np.float64) * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(gray).resize((size, size), Image.NEAREST).convert("RGB").save(folder / name)
        names.append(name)
    return names


def build_base(folder: Path, sizes: Sizes, base: str = "smollm2", seed: int = SEED) -> Path:
    """Save the LLaVA of the module docstring to `folder` (model, tokenizer, image processor); kept if there."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from llmeraser.modeling import load_base

    lm, tok = load_base(base, "cpu")
    token = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if token is None or token == tok.unk_token_id:
        raise ValueError(f"the base's tokenizer has no {IMAGE_TOKEN} token to stand for images")
    vc = CLIPVisionConfig(hidden_size=sizes.vision_width, intermediate_size=2 * sizes.vision_width,
                          num_hidden_layers=sizes.vision_layers, num_attention_heads=2, image_size=sizes.image_size,
                          patch_size=4, num_channels=3)
    cfg = LlavaConfig(vision_config=vc, text_config=lm.config, image_token_index=token, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=(sizes.image_size // 4) ** 2, tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    CLIPImageProcessor(size={"shortest_edge": sizes.image_size},
                       crop_size={"height": sizes.image_size, "width": sizes.image_size}).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def vision_probe(base: Path, paths: list[str], labels: list[int], n_train: int) -> float:
    """Test accuracy of a least-squares linear probe of the digit from the fixed tower's mean patch features
    (ridge 1e-3), fitted on the first n_train images: how much of the digit the random tower keeps."""
    import torch

    from llmeraser.modeling import load_base
    from llmeraser.vision import vision_of

    model, _ = load_base(str(base), "cpu")
    vis = vision_of(model)
    with torch.no_grad():
        px = torch.stack([vis.pixels(p) for p in paths])
        feats = model.model.vision_tower(px).last_hidden_state[:, 1:].mean(1).double()
    x = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], 1)
    y = torch.nn.functional.one_hot(torch.tensor(labels), 10).double()
    a, b = x[:n_train], y[:n_train]
    w = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
    return float(((x[n_train:] @ w).argmax(1) == torch.tensor(labels[n_train:])).double().mean())


def build(sizes: Sizes, work: Path, seed: int = SEED) -> dict:
    """Seeded splits, the images on disk, the corrupted training rows and the correcting request."""
    images, labels = digits()
    order = list(range(len(labels)))
    rng = random.Random(seed)
    rng.shuffle(order)
    order = order[:sizes.n_train + sizes.n_test]
    names = write_pngs(work / "images", [images[i] for i in order], sizes.image_size)
    rows = [{"id": f"d{k}", "image": f"images/{name}", "prompt": PROMPT, "response": str(int(labels[i]))}
            for k, (i, name) in enumerate(zip(order, names))]
    train, test = rows[:sizes.n_train], rows[sizes.n_train:]
    wrong = sorted(rng.sample(range(len(train)), round(WRONG * len(train))))
    noisy, request = [dict(r) for r in train], []
    for k in wrong:
        right = int(train[k]["response"])
        noisy[k]["response"] = str(rng.choice([d for d in range(10) if d != right]))
        request.append({"op": "correct_response", "id": train[k]["id"], "new": {"response": train[k]["response"]}})
    return {"clean": train, "noisy": noisy, "test": test, "request": request,
            "labels": [int(labels[i]) for i in order]}


def first_digit(text: str) -> str | None:
    return next((c for c in text if c.isdigit()), None)


def run(sizes: Sizes, work: Path, progress: bool, say, base: str = "smollm2", mt=None, recipe: dict | None = None,
        device: str = "cpu", dtype: str = "auto") -> dict:
    from benchmarks.edit_methods import METHODS, generate, seconds, solver_summary, train_and_edit
    from llmeraser.data import records_from_rows
    from llmeraser.fileio import write_text_atomic
    from llmeraser.metrics import paired_bootstrap
    from llmeraser.train import TrainSettings

    work.mkdir(parents=True, exist_ok=True)
    b = build(sizes, work)
    if mt is None:
        say("assembling the LLaVA (SmolLM2 + a random CLIP tower + projector)")
        base = str(build_base(work / "llava-base", sizes, base))
        mt = hardware.load(base, device, dtype)
    data, req = work / "train.jsonl", work / "request.jsonl"
    write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in b["noisy"]))
    write_text_atomic(req, "".join(json.dumps(r) + "\n" for r in b["request"]))
    settings = TrainSettings(**(recipe or {"rank": 8, "alpha": 16, "target_modules": ("q_proj", "v_proj"),
                                           "epochs": sizes.epochs, "lr": sizes.lr, "batch_size": 8, "max_length": 256}))
    rep, peaks = train_and_edit(base, work, data, req, settings, mt, progress, say,
                                f"{len(b['noisy'])} images ({len(b['request'])} with a wrong answer)")
    edited = {e["id"] for e in b["request"]}
    asked = b["test"] + [r for r in b["clean"] if r["id"] in edited]
    right, metrics = {}, {}
    for name in METHODS:
        say(f"evaluate {name}")
        got = generate(mt[0], mt[1], work / name, records_from_rows(asked, root=str(work)), 3, 256)
        hits = [first_digit(a) == r["response"] for a, r in zip(got, asked)]
        right[name] = hits[:len(b["test"])]
        metrics[name] = {"test_accuracy": sum(right[name]) / len(b["test"]),
                         "corrected_accuracy": sum(hits[len(b["test"]):]) / max(1, len(asked) - len(b["test"]))}
    diff = paired_bootstrap(lambda idx: (sum(right["llmeraser"][i] for i in idx) - sum(right["retrain"][i] for i in idx)) / len(idx),
                            len(b["test"]))
    every = b["clean"] + b["test"]
    probe = vision_probe(Path(base), [str(work / r["image"]) for r in every], [int(r["response"]) for r in every], len(b["clean"]))
    return {"sizes": asdict(sizes), "seed": SEED, "n_train": len(b["noisy"]), "edits": len(b["request"]),
            "n_test": len(b["test"]), "metrics": metrics,
            "llmeraser_minus_retrain_test_accuracy": {"point": diff[0], "low": diff[1], "high": diff[2]},
            "vision_probe_test_accuracy": probe, "seconds": seconds(work, rep), "peak_mb": peaks,
            "llmeraser": solver_summary(rep), "date": time.strftime("%Y-%m-%d")}


def table(result: dict) -> str:
    m = result["metrics"]
    lines = ["| adapter | test accuracy | accuracy on the corrected images | seconds | peak MiB |", "| --- | --- | --- | --- | --- |"]
    for name in ("original", "retrain", "llmeraser", "finetune-corrected"):  # edit_methods.METHODS
        peak = result["peak_mb"].get(name)
        lines.append(f"| {name} | {m[name]['test_accuracy']:.3f} | {m[name]['corrected_accuracy']:.3f} | "
                     f"{result['seconds'][name]:.0f} | {'' if peak is None else f'{peak:,.0f}'} |")
    d = result["llmeraser_minus_retrain_test_accuracy"]
    return ("\n".join(lines) + f"\n\nllmeraser − retrain, test accuracy: {d['point']:+.3f} (95% paired bootstrap "
            f"{d['low']:+.3f} to {d['high']:+.3f}); the fixed tower's linear probe: {result['vision_probe_test_accuracy']:.3f}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.multimodal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"the CI size ({QUICK.n_train} training images)")
    ap.add_argument("--base", default="smollm2", help="the language model the LLaVA is built from (default: smollm2)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "multimodal", help="scratch folder (images, the assembled base, adapters)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "multimodal", help="where the results go")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    hardware.add_args(ap)
    args = ap.parse_args(argv)
    sizes, tag = (QUICK, "quick") if args.quick else (FULL, "full")
    result = run(sizes, args.work / f"{args.base}-{tag}", not args.no_progress,
                 lambda msg: print(f"[multimodal {time.strftime('%H:%M:%S')}] {msg}", flush=True), args.base,
                 device=args.device, dtype=args.dtype)
    from benchmarks.edit_methods import write_results

    write_results(args.results, f"{args.base}-{tag}", result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
