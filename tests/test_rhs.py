"""b against a slow, obvious loop of per-sample loss.backward() on the live model."""

import torch

from llmeraser.data import load_request
from llmeraser.modeling import theta_of
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode
from llmeraser.settings import UnlearnSettings
from llmeraser.unlearner import Unlearner

from helpers import write_jsonl


def slow_gradient(model, tok, record):
    """∇ of one sample's mean response-token NLL, through HF's own labels=-100 loss."""
    ex = encode(record, tok, "chat", 64)
    ids = torch.tensor([ex.input_ids])
    labels = ids.clone()
    labels[0, : ex.n_prompt] = -100
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=labels).loss.backward()
    params, _ = theta_of(model)
    named = dict(model.named_parameters())
    return torch.cat([named[n].grad.reshape(-1) for n in params.names])


def test_rhs_matches_per_sample_backward_loop(tiny64, tmp_path):
    model, tok, records = tiny64
    req_path = write_jsonl(tmp_path / "req.jsonl", [
        {"op": "remove", "id": "r1"},
        {"op": "correct_response", "id": "r4", "new": {"response": "0000"}},
        {"op": "modify_query", "id": "r7", "new": {"prompt": "phone of somebody?"}},
    ])
    request = load_request(req_path, records)
    unl = Unlearner(model, tok, records, UnlearnSettings(batch_size=2, template="chat", device="cpu"))
    b = unl.problem.rhs(request, progress=False)
    expected = torch.zeros_like(b)
    for e in request.edits:
        expected += slow_gradient(model, tok, e.old)
        if e.new is not None:
            expected -= slow_gradient(model, tok, e.new)
    # float64 model; HF's eager attention takes its softmax in float32, hence 1e-6
    assert torch.linalg.vector_norm(b - expected) < 1e-6 * torch.linalg.vector_norm(expected)
    assert b.norm() > 0


def test_batched_losses_match_hf_loss(tiny64):
    """The objective's per-sample loss equals HF's labels=-100 loss, padding and all."""
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = [encode(r, tok, "chat", 64) for r in records[:4]]
    with torch.no_grad():
        ours = obj.losses(obj.outputs(params.unflatten(theta), obj.collate(items, "cpu")), obj.collate(items, "cpu"))
        for ex, value in zip(items, ours):
            ids = torch.tensor([ex.input_ids])
            labels = ids.clone()
            labels[0, : ex.n_prompt] = -100
            assert torch.allclose(value, model(input_ids=ids, labels=labels).loss.to(value.dtype), rtol=1e-6)
