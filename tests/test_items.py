"""Θ beyond the PEFT adapter: an item projector trained with LoRA, item slots in prompts (items.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.func import hessian, jacrev

from llmeraser.cli import main
from llmeraser.curvature import Curvature
from llmeraser.data import load_records, records_from_rows
from llmeraser.errors import InputError
from llmeraser.evaluate import AdapterEval
from llmeraser.items import MODULES_CONFIG, MODULES_WEIGHTS, attach_items, item_slots
from llmeraser.modeling import load_adapter, theta_of, unload_adapter
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode

from helpers import load_tiny, write_jsonl

ITEMS, WIDTH = 6, 4


def rows(n=8):
    """Histories of two items each and the next one's title: the answer depends on the vectors only through
    the slots, so a projector that does nothing cannot fit them."""
    return [{"id": f"u{i}", "prompt": f"saw [[item:{i % ITEMS}]] and [[item:{(i + 1) % ITEMS}]]. next?",
             "response": f"item {(i + 2) % ITEMS}"} for i in range(n)]


@pytest.fixture(scope="module")
def folder(tiny_dir, tmp_path_factory):
    """The tiny base, an item table, data with slots, and an adapter trained on it with `--item-table`."""
    root = tmp_path_factory.mktemp("items")
    save_file({"embeddings": torch.randn(ITEMS, WIDTH, generator=torch.Generator().manual_seed(0))}, str(root / "table.safetensors"))
    write_jsonl(root / "train.jsonl", rows())
    assert main(["train", "--base", str(tiny_dir / "base"), "--data", str(root / "train.jsonl"), "--out", str(root / "adapter"),
                 "--item-table", str(root / "table.safetensors"), "--epochs", "2", "--batch-size", "4", "--rank", "2", "--device", "cpu",
                 "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def model64(tiny_dir, folder):
    model, tok = load_tiny(tiny_dir / "base", torch.float64)
    return load_adapter(model, folder / "adapter"), tok


def test_train_writes_the_projector_beside_the_adapter_and_theta_holds_it(folder, model64):
    model, _ = model64
    config = json.loads((folder / "adapter" / MODULES_CONFIG).read_text())
    assert config["modules"]["item_slots"]["items"] == ITEMS and config["modules"]["item_slots"]["width"] == WIDTH
    saved = load_file(str(folder / "adapter" / MODULES_WEIGHTS))
    assert torch.equal(saved["item_slots.table"], load_file(str(folder / "table.safetensors"))["embeddings"])
    params, theta = theta_of(model)
    names = [n for n in params.names if n.startswith("llmeraser_modules.")]
    assert sorted(names) == sorted(f"llmeraser_modules.item_slots.projector.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    assert any(".lora_B." in n for n in params.names)
    assert "llmeraser_modules" in params.summary()
    # the projector was trained: it moved from the seeded initialisation a retraining starts from
    from llmeraser.items import attach

    start = attach(torch.nn.Linear(2, 2), config, {"item_slots.table": saved["item_slots.table"]})
    start_state = start.state_dict()
    moved = [k for k in saved if k != "item_slots.table" and not torch.equal(saved[k], start_state[k])]
    assert sorted(moved) == sorted(f"item_slots.projector.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias"))


def test_slots_render_to_the_slot_token_at_their_positions(model64):
    model, tok = model64
    items = item_slots(model)
    rec = records_from_rows([{"prompt": "a [[item:2]] b [[item:5]]", "response": "c"}])[0]
    ex = encode(rec, tok, "chat", 128, items)
    assert [item for _, item in ex.slots] == [2, 5]
    assert all(ex.input_ids[at] == items.slot_token_id for at, _ in ex.slots)
    plain = records_from_rows([{"prompt": "a b", "response": "c"}])[0]
    assert encode(plain, tok, "chat", 128, items) == encode(plain, tok, "chat", 128)  # no slots: ids as before
    # truncation keeps the prompt's end and moves the slots with it
    cut = encode(rec, tok, "chat", 12, items)
    assert cut.truncated and all(cut.input_ids[at] == items.slot_token_id for at, _ in cut.slots)


def test_the_slot_carries_the_items_vector(model64):
    """Two prompts that differ only in an item's row give different logits; the row's vector reaches the model."""
    model, tok = model64
    obj = CausalLMObjective(model, tok.pad_token_id)
    recs = records_from_rows([{"prompt": f"saw [[item:{k}]]", "response": "x"} for k in (1, 3)])
    batch = obj.collate([encode(r, tok, "chat", 64, item_slots(model)) for r in recs], "cpu")
    with torch.no_grad():
        z = obj.outputs({}, batch)
    assert not torch.allclose(z[0], z[1])


def test_each_slot_of_a_padded_batch_gets_its_own_items_vector(model64):
    """In a right-padded training batch of prompts of unequal lengths, what the first decoder layer reads is, at
    every slot, the projected vector of that record's item, and elsewhere the token's own embedding."""
    model, tok = model64
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = item_slots(model)
    recs = records_from_rows([{"prompt": "a long prompt that saw [[item:1]] and then [[item:4]]", "response": "x"},
                              {"prompt": "saw [[item:3]]", "response": "yz"}])
    examples = [encode(r, tok, "chat", 64, items) for r in recs]
    assert len(examples[0].input_ids) != len(examples[1].input_ids)
    batch = obj.collate(examples, "cpu")
    seen = []
    layer = model.base_model.model.model.layers[0]
    hook = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            obj.outputs({}, batch)
    finally:
        hook.remove()
    hidden = seen[0]
    with torch.no_grad():
        embedded = model.get_input_embeddings()(batch["input_ids"])
        for row, ex in enumerate(examples):
            for at, item in ex.slots:
                assert torch.allclose(hidden[row, at], items(torch.tensor([item]))[0].to(hidden.dtype))
                embedded[row, at] = hidden[row, at]
    assert sum(len(ex.slots) for ex in examples) == 3
    assert torch.equal(hidden, embedded)  # nothing else was written


def test_gradient_and_curvature_over_lora_and_projector_match_explicit_matrices(model64):
    """b's gradients and the GGN/Hessian products over Θ = LoRA ∪ projector against jacrev/hessian, float64."""
    model, tok = model64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([encode(r, tok, "chat", 64, item_slots(model)) for r in load_records_rows()], "cpu")

    def loss(t):
        return obj.losses(obj.outputs(params.unflatten(t), batch), batch).mean()

    g = jacrev(loss)(theta)
    proj = torch.cat([g[s] for s in slices(params, "llmeraser_modules.")])
    assert proj.abs().max() > 1e-6  # the projector is in the loss
    t = theta.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(loss(t), t)
    assert torch.allclose(auto, g, rtol=1e-10, atol=1e-14)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    H = hessian(loss)(theta)
    hv = Curvature(obj, params, theta, "hessian", "rev_rev")(v, batch)
    assert torch.linalg.vector_norm(hv - H @ v) <= 1e-6 * torch.linalg.vector_norm(H @ v)
    z = obj.outputs(params.unflatten(theta), batch)
    J = jacrev(lambda tt: obj.outputs(params.unflatten(tt), batch))(theta).reshape(z.numel(), -1)
    Hz = hessian(lambda zz: obj.losses(zz, batch).mean())(z.detach()).reshape(z.numel(), z.numel())
    for mode in ("fwd_rev", "rev_rev"):
        gv = Curvature(obj, params, theta, "ggn", mode)(v, batch)
        assert torch.linalg.vector_norm(gv - J.T @ Hz @ J @ v) <= 1e-6 * torch.linalg.vector_norm(J.T @ Hz @ J @ v)


def load_records_rows():
    return records_from_rows(rows(4))


def slices(params, prefix):
    out, at = [], 0
    for n, k in zip(params.names, params.numels):
        if n.startswith(prefix):
            out.append(slice(at, at + k))
        at += k
    return out


def unlearn_cli(tiny_dir, folder, request, out, *extra):
    return main(["unlearn", "--base", str(tiny_dir / "base"), "--adapter", str(folder / "adapter"), "--data",
                 str(folder / "train.jsonl"), "--request", str(request), "--out", str(out), "--device", "cpu", "--quiet",
                 "--allow-unconverged", *extra])


def test_identity_query_edit_gives_zero_delta_and_the_same_adapter(tiny_dir, folder, tmp_path):
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "modify_query", "id": "u1", "new": {"prompt": rows()[1]["prompt"]}}])
    assert unlearn_cli(tiny_dir, folder, req, tmp_path / "out") == 0
    meta = json.loads((tmp_path / "out" / "unlearn.json").read_text())
    assert meta["rhs_norm"] == 0.0 and meta["delta_norm"] == 0.0
    before, after = (load_file(str(d / MODULES_WEIGHTS)) for d in (folder / "adapter", tmp_path / "out"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (folder / "adapter" / MODULES_CONFIG).read_bytes() == (tmp_path / "out" / MODULES_CONFIG).read_bytes()


def test_an_item_edit_moves_the_projector_and_the_written_adapter_round_trips(tiny_dir, folder, tmp_path):
    """modify_query replacing an item: Δ reaches the projector; the table is kept; the written adapter, loaded,
    gives the logits of the model at Θ̂ + Δ; the slot token's embedding row is the base's (no row is added)."""
    from llmeraser.api import unlearn
    from llmeraser.recipes import recipe

    new = rows()[2]["prompt"].replace("[[item:3]]", "[[item:5]]")
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "modify_query", "id": "u2", "new": {"prompt": new}}])
    res = unlearn(str(tiny_dir / "base"), folder / "adapter", folder / "train.jsonl", req, tmp_path / "out",
                  recipe("default", device="cpu"), progress=False, allow_unconverged=True)
    before, after = (load_file(str(d / MODULES_WEIGHTS)) for d in (folder / "adapter", tmp_path / "out"))
    assert torch.equal(before["item_slots.table"], after["item_slots.table"])
    assert not torch.equal(before["item_slots.projector.0.weight"], after["item_slots.projector.0.weight"])
    base, tok = load_tiny(tiny_dir / "base")
    logits = []
    for adapter, delta in ((folder / "adapter", res.delta), (tmp_path / "out", None)):
        model = load_adapter(base, adapter)
        params, theta = theta_of(model)
        slot = item_slots(model).slot_token_id
        assert torch.equal(model.get_input_embeddings().weight[slot], load_tiny(tiny_dir / "base")[0].get_input_embeddings().weight[slot])
        obj = CausalLMObjective(model, tok.pad_token_id)
        batch = obj.collate([encode(r, tok, "chat", 128, item_slots(model)) for r in load_records(folder / "train.jsonl")], "cpu")
        with torch.no_grad():
            logits.append(obj.outputs(params.unflatten(theta + delta) if delta is not None else {}, batch))
        unload_adapter(model)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_generation_puts_each_items_vector_at_its_slot_under_left_padding(tiny_dir, folder):
    """The first decoder layer's input in generation's prompt pass holds P(T[item]) at every slot, shifted by each
    prompt's left padding, and the plain token embedding elsewhere; later one-token passes are left alone.
    (float32: HF's padded generation in float64 answers differently from unpadded, with or without slots.)"""
    base, tok = load_tiny(tiny_dir / "base")
    model = load_adapter(base, folder / "adapter")
    recs = records_from_rows([{"prompt": p, "response": "x"} for p in
                              ("a longer history: [[item:4]], [[item:0]] and [[item:2]]", "saw [[item:1]]", "none")])
    ev = AdapterEval(model, tok, "chat", max_new_tokens=3)
    seen = []
    layer = model.base_model.model.model.layers[0]
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach()),
                                           with_kwargs=True)
    try:
        answers = ev.generate(recs)
    finally:
        hook.remove()
    assert len(seen) == 3 and seen[1].shape[1] == 1  # the prompt pass, then one token at a time
    prompt = seen[0]
    heads = [encode(r.replaced({"response": "x"}), tok, "chat", 512, item_slots(model)) for r in recs]
    order = sorted(range(3), key=lambda i: heads[i].n_prompt)  # generate batches prompts by length
    width = max(h.n_prompt for h in heads)
    emb, proj = model.get_input_embeddings(), item_slots(model)
    for k, i in enumerate(order):
        pad = width - heads[i].n_prompt
        ids = torch.tensor(heads[i].input_ids[:heads[i].n_prompt])
        want = emb(ids).detach().clone()
        for at, item in heads[i].slots:
            want[at] = proj(torch.tensor([item]))[0].detach()
        assert torch.allclose(prompt[k, pad:], want, atol=1e-6)
    assert answers == [ev.generate([r])[0] for r in recs]
    unload_adapter(model)


def test_bad_items_are_named(tiny_dir, folder, tmp_path, capsys):
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "modify_query", "id": "u1", "new": {"prompt": "saw [[item:99]]"}}])
    assert unlearn_cli(tiny_dir, folder, req, tmp_path / "out") == 2
    assert "[[item:99]] names no item" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # slots without an item table
    write_jsonl(tmp_path / "plain.jsonl", rows())
    assert main(["train", "--base", str(tiny_dir / "base"), "--data", str(tmp_path / "plain.jsonl"), "--out",
                 str(tmp_path / "a"), "--epochs", "1", "--device", "cpu", "--quiet"]) == 2
    assert "train it with `llmeraser train --item-table" in capsys.readouterr().err
    # a table that is not a matrix
    save_file({"embeddings": torch.zeros(3)}, str(tmp_path / "t.safetensors"))
    assert main(["train", "--base", str(tiny_dir / "base"), "--data", str(folder / "train.jsonl"), "--out",
                 str(tmp_path / "b"), "--item-table", str(tmp_path / "t.safetensors"), "--device", "cpu", "--quiet"]) == 2
    assert "must be a float matrix" in capsys.readouterr().err
    # a saved table of another width than its declaration
    import shutil
    shutil.copytree(folder / "adapter", tmp_path / "bad")
    w = load_file(str(tmp_path / "bad" / MODULES_WEIGHTS))
    save_file({**w, "item_slots.table": torch.zeros(ITEMS, WIDTH + 1)}, str(tmp_path / "bad" / MODULES_WEIGHTS))
    model, _ = load_tiny(tiny_dir / "base")
    with pytest.raises(InputError, match="do not match its declaration"):
        load_adapter(model, tmp_path / "bad")
    # an item slot in a response
    with pytest.raises(InputError, match="slots belong in the prompt"):
        encode(records_from_rows([{"prompt": "a", "response": "[[item:1]]"}])[0], load_tiny(tiny_dir / "base")[1], "plain", 64)


def test_a_bad_modules_declaration_is_named(folder, tiny_dir, tmp_path):
    import shutil

    from llmeraser.items import ATTR, attach, read_modules

    shutil.copytree(folder / "adapter", tmp_path / "a")
    base, _ = load_tiny(tiny_dir / "base")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    attach(base, *read_modules(tmp_path / "a"), complete=True)
    delattr(base, ATTR)
    assert torch.equal(torch.rand(3), expected)  # building the modules (seeded) leaves the caller's RNG alone
    tensors = load_file(tmp_path / "a" / MODULES_WEIGHTS)
    table = next(k for k in tensors if k.endswith("table"))
    save_file({k: v for k, v in tensors.items() if k != table}, str(tmp_path / "a" / MODULES_WEIGHTS))
    with pytest.raises(InputError, match=f"lacks 1 of the {len(tensors)} tensors .*{table}"):
        load_adapter(base, tmp_path / "a")  # not a zero table in silence
    save_file(tensors, str(tmp_path / "a" / MODULES_WEIGHTS))
    cfg = json.loads((tmp_path / "a" / MODULES_CONFIG).read_text())
    for modules, message in (({"x": {"kind": "soft_prompt"}}, "unknown kind 'soft_prompt'"),
                             ({"items": cfg["modules"]["item_slots"]}, "cannot name a module"),
                             ({"item_slots": {"kind": "item_embeddings"}}, "declared incompletely")):
        (tmp_path / "a" / MODULES_CONFIG).write_text(json.dumps({**cfg, "modules": modules}))
        with pytest.raises(InputError, match=message):
            read_modules(tmp_path / "a")
    (tmp_path / "a" / MODULES_CONFIG).unlink()
    with pytest.raises(InputError, match="llmeraser_modules.json is missing"):
        read_modules(tmp_path / "a")
