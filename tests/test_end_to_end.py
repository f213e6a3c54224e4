"""End to end on a tiny Llama trained to low loss: `remove` vs retraining without the samples.

Setting (measured, see the issue notes): 48 records of random 4-digit "phone numbers", LoRA r=4
on q/v trained full-batch with L2 weight decay 0.1; one record (2%) removed. Retrain = the same
recipe and seed on the other 47. First-order influence is accurate when the removed fraction is
small; at 12.5% removed it reaches only about a quarter of retraining's rise on this toy.
"""

import json

import torch

from llmeraser.data import apply_request, load_records, load_request
from llmeraser.modeling import load_adapter
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode
from llmeraser.train import TrainSettings, add_lora, train_lora
from llmeraser.api import unlearn
from llmeraser.settings import UnlearnSettings

from helpers import load_tiny, make_base, toy_records, write_jsonl

RECIPE = TrainSettings(rank=4, alpha=8, epochs=600, lr=1e-2, batch_size=48, weight_decay=0.1, seed=0)


def mean_losses(model, tok, groups):
    obj = CausalLMObjective(model, tok.pad_token_id)
    out = []
    with torch.no_grad():
        for records in groups:
            batch = obj.collate([encode(r, tok, "chat", 64) for r in records], "cpu")
            out.append(float(obj.losses(obj.outputs({}, batch), batch).mean()))
    return out


def test_remove_moves_forget_loss_like_retraining(tmp_path):
    make_base(tmp_path / "base", hidden=32, init_range=0.3)
    data = write_jsonl(tmp_path / "train.jsonl", toy_records(48))
    req_path = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r3"}])
    records = load_records(data)
    request = load_request(req_path, records)
    kept = apply_request(records, request)
    forget = [e.old for e in request.edits]

    def trained(recs):
        model, tok = load_tiny(tmp_path / "base")
        peft_model = add_lora(model, RECIPE)
        train_lora(peft_model, tok, recs, RECIPE, progress=False)
        return peft_model, tok

    original, tok = trained(records)
    original.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "train.json").write_text(json.dumps({"arguments": RECIPE.to_dict()}))
    orig_forget, orig_retain = mean_losses(original, tok, [forget, kept])
    assert orig_forget < 2.5  # memorised well below the ~4.6 of a uniform guess
    retrained, _ = trained(kept)
    re_forget, _ = mean_losses(retrained, tok, [forget, kept])

    res = unlearn(str(tmp_path / "base"), tmp_path / "adapter", data, req_path, tmp_path / "out",
                  UnlearnSettings(damping=0.0, curvature_samples=0, batch_size=48, device="cpu"), progress=False,
                  allow_unconverged=True)  # CG at λ = wd alone stops near tol; the claim is the outcome
    assert res.meta["damping_total"] == 0.1  # the training weight decay, read from train.json
    model, tok = load_tiny(tmp_path / "base")
    new_forget, new_retain = mean_losses(load_adapter(model, tmp_path / "out"), tok, [forget, kept])

    rise, target = new_forget - orig_forget, re_forget - orig_forget
    assert target > 0.5
    assert 0.5 * target < rise < 2 * target, (rise, target)
    assert abs(new_retain - orig_retain) < rise
