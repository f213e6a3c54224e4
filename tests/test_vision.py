"""Image records on a LLaVA-style vision-language model (vision.py), on a tiny LLaVA built in the test."""

import json

import pytest
import torch
from torch.func import hessian, jacrev

from llmeraser.api import unlearn
from llmeraser.cli import main
from llmeraser.curvature import Curvature
from llmeraser.data import load_records
from llmeraser.errors import InputError
from llmeraser.evaluate import AdapterEval
from llmeraser.modeling import load_adapter, theta_of, unload_adapter
from llmeraser.objective import CausalLMObjective
from llmeraser.recipes import recipe
from llmeraser.render import encode, model_inputs
from llmeraser.train import TrainSettings, add_lora

from helpers import load_tiny, make_llava, write_images, write_jsonl

TOKENS_PER_IMAGE = 4  # (8 / 4)² patches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    make_llava(root / "base")
    names = write_images(root / "images", 6)
    write_jsonl(root / "train.jsonl", [{"id": f"d{i}", "image": f"images/{n}", "prompt": "which digit?",
                                        "response": f"digit {i % 3}"} for i, n in enumerate(names)])
    assert main(["train", "--base", str(root / "base"), "--data", str(root / "train.jsonl"), "--out", str(root / "adapter"),
                 "--rank", "2", "--epochs", "2", "--batch-size", "3", "--device", "cpu", "--quiet"]) == 0
    return root


def test_a_missing_or_damaged_image_is_refused_with_the_record_named_before_any_model(folder, tmp_path, capsys, monkeypatch):
    import llmeraser.api
    import llmeraser.baselines

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(llmeraser.baselines, "load_base", no_model)
    monkeypatch.setattr(llmeraser.api, "load_base", no_model)
    write_jsonl(tmp_path / "data.jsonl", [{"image": "nowhere.png", "prompt": "which digit?", "response": "1"}])
    with pytest.raises(InputError, match=r"data.jsonl:1: image 'nowhere.png' not found"):
        load_records(tmp_path / "data.jsonl")
    assert main(["train", "--base", str(folder / "base"), "--data", str(tmp_path / "data.jsonl"), "--out",
                 str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 2
    assert "image 'nowhere.png' not found" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    write_jsonl(tmp_path / "data.jsonl", [{"image": "bad.png", "prompt": "which digit?", "response": "1"}])
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "0"}])
    assert main(["unlearn", "--base", str(folder / "base"), "--adapter", str(folder / "adapter"), "--data",
                 str(tmp_path / "data.jsonl"), "--request", str(req), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--quiet"]) == 2
    assert "data.jsonl:1: image" in (err := capsys.readouterr().err) and "is not a readable image" in err
    # a modified query's new image is checked too
    req = write_jsonl(tmp_path / "req2.jsonl", [{"op": "modify_query", "id": "d1", "new": {"image": "gone.png"}}])
    assert main(["unlearn", "--base", str(folder / "base"), "--adapter", str(folder / "adapter"), "--data",
                 str(folder / "train.jsonl"), "--request", str(req), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--quiet"]) == 2
    assert "image 'gone.png' not found" in capsys.readouterr().err


def test_the_loss_masks_image_and_prompt_tokens(folder):
    """Image tokens sit in the prompt; the loss is the response tokens' mean NLL from the model's own logits."""
    model, tok = load_tiny(folder / "base")
    rec = load_records(folder / "train.jsonl")[1]
    ex = encode(rec, tok, "chat", 256, **model_inputs(model))
    image_token = model_inputs(model)["vision"].image_token_id
    at = [i for i, t in enumerate(ex.input_ids) if t == image_token]
    assert len(at) == TOKENS_PER_IMAGE and max(at) < ex.n_prompt
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([ex], "cpu")
    with torch.no_grad():
        loss = float(obj.losses(obj.outputs({}, batch), batch)[0])
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"]).logits[0]
    logp = torch.log_softmax(logits[ex.n_prompt - 1:-1], -1)
    want = -logp.gather(1, ids[0, ex.n_prompt:, None]).mean()
    assert abs(loss - float(want)) < 1e-5
    # text-only bases refuse image records; image records need their image
    with pytest.raises(InputError, match="reads text only"):
        encode(rec, tok, "chat", 256)


def test_a_chat_image_part_is_the_same_sample_as_the_image_field(folder):
    from llmeraser.data import records_from_rows

    model, tok = load_tiny(folder / "base")
    img = str(folder / "images" / "img0.png")
    a, b = records_from_rows([
        {"messages": [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "which digit?"}]},
                      {"role": "assistant", "content": "digit 0"}]},
        {"messages": [{"role": "user", "content": "which digit?"}, {"role": "assistant", "content": "digit 0"}], "image": img}])
    assert encode(a, tok, "chat", 256, **model_inputs(model)) == encode(b, tok, "chat", 256, **model_inputs(model))
    with pytest.raises(InputError, match="give one image"):
        records_from_rows([{**a.fields, "image": img}])


def test_gradient_and_curvature_over_lora_and_projector_match_explicit_matrices(folder):
    """Θ = LoRA on the language model ∪ the multimodal projector (not the vision tower), float64."""
    base, tok = load_tiny(folder / "base", torch.float64)
    model = add_lora(base, TrainSettings(rank=1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn_like(p))
    params, theta = theta_of(model)
    assert any("multi_modal_projector" in n for n in params.names)
    assert not any("vision_tower" in n for n in params.names)
    obj = CausalLMObjective(model, tok.pad_token_id)
    recs = load_records(folder / "train.jsonl")[:2]
    batch = obj.collate([encode(r, tok, "chat", 256, **model_inputs(model)) for r in recs], "cpu")

    def loss(t):
        return obj.losses(obj.outputs(params.unflatten(t), batch), batch).mean()

    g = jacrev(loss)(theta)
    at = 0
    for n, k in zip(params.names, params.numels):
        if "multi_modal_projector" in n:
            assert g[at:at + k].abs().max() > 0  # the images reach the loss through the projector
        at += k
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    H = jacrev(jacrev(loss))(theta)  # torch.func.hessian's vmapped forward mode fails on LLaVA's masked_scatter
    hv = Curvature(obj, params, theta, "hessian", "auto")(v, batch)
    assert torch.linalg.vector_norm(hv - H @ v) <= 1e-6 * torch.linalg.vector_norm(H @ v)
    z = obj.outputs(params.unflatten(theta), batch)
    J = jacrev(lambda tt: obj.outputs(params.unflatten(tt), batch))(theta).reshape(z.numel(), -1)
    Hz = hessian(lambda zz: obj.losses(zz, batch).mean())(z.detach()).reshape(z.numel(), z.numel())
    G = J.T @ Hz @ J
    for mode in ("fwd_rev", "rev_rev"):
        gv = Curvature(obj, params, theta, "ggn", mode)(v, batch)
        assert torch.linalg.vector_norm(gv - G @ v) <= 1e-6 * torch.linalg.vector_norm(G @ v)
    unload_adapter(model)


def test_identity_correction_gives_zero_delta(folder, tmp_path):
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "correct_response", "id": "d4", "new": {"response": rows[4]["response"]}}])
    res = unlearn(str(folder / "base"), folder / "adapter", folder / "train.jsonl", req, tmp_path / "out",
                  recipe("default", device="cpu"), progress=False, allow_unconverged=True)
    assert res.report.rhs_norm == 0.0 and float(res.delta.abs().max()) == 0.0


def test_a_correction_moves_the_projector_and_the_written_adapter_round_trips(folder, tmp_path):
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "correct_response", "id": "d4", "new": {"response": "digit 2"}},
                                               {"op": "remove", "id": "d0"}])
    res = unlearn(str(folder / "base"), folder / "adapter", folder / "train.jsonl", req, tmp_path / "out",
                  recipe("default", device="cpu"), progress=False, allow_unconverged=True)
    base, _ = load_tiny(folder / "base")
    before = load_adapter(base, folder / "adapter")
    params, theta_hat = theta_of(before)
    unload_adapter(before)
    after = load_adapter(base, tmp_path / "out")
    params2, theta = theta_of(after)
    unload_adapter(after)
    assert params2.names == params.names
    assert torch.allclose(theta, theta_hat + res.delta, atol=1e-7)
    proj = [n for n in params.names if "multi_modal_projector" in n]
    moved = params.unflatten(res.delta)
    assert proj and any(float(moved[n].abs().max()) > 0 for n in proj)


def test_generation_reads_the_image_and_batches_like_one_at_a_time(folder):
    base, tok = load_tiny(folder / "base")
    model = load_adapter(base, folder / "adapter")
    recs = load_records(folder / "train.jsonl")
    recs = [recs[0], recs[1].replaced({"prompt": "which digit is shown here, please?"}), recs[2]]
    ev = AdapterEval(model, tok, "chat", max_new_tokens=3)
    seen = []
    proj = model.base_model.model.model.multi_modal_projector
    hook = proj.register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    try:
        together = ev.generate(recs)
    finally:
        hook.remove()
    assert seen == [3]  # one prompt pass with the 3 images, none in the one-token passes
    assert together == [ev.generate([r])[0] for r in recs]
    unload_adapter(model)


def test_a_shared_base_keeps_its_own_projector_through_train_unlearn_and_evaluation(folder, tmp_path):
    """PEFT's own `unload` would leave the adapter's trained projector in the base (modules_to_save), so a second
    training on the same loaded base would start from the first one's projector; `unload_adapter` puts the base's
    back. Checked through every stage a benchmark runs on one loaded base."""
    from llmeraser.baselines import train

    base, tok = load_tiny(folder / "base")
    start = {k: v.clone() for k, v in base.model.multi_modal_projector.state_dict().items()}

    def same_as_start():
        now = base.model.multi_modal_projector.state_dict()
        return all(torch.equal(now[k], v) for k, v in start.items())

    out = train(str(folder / "base"), folder / "train.jsonl", tmp_path / "a", TrainSettings(rank=2, epochs=2, batch_size=3),
                device="cpu", progress=False, model_and_tokenizer=(base, tok))
    assert same_as_start()
    trained = load_adapter(base, out)
    saved = {n: p.detach().clone() for n, p in trained.named_parameters() if "multi_modal_projector" in n and p.requires_grad}
    unload_adapter(trained)
    assert saved and not all(torch.equal(p, start[n.rsplit("multi_modal_projector.", 1)[1].replace("modules_to_save.default.", "")])
                             for n, p in saved.items())  # the training moved the projector: the checks can fail
    assert same_as_start()
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "correct_response", "id": "d4", "new": {"response": "digit 2"}}])
    unlearn(str(folder / "base"), out, folder / "train.jsonl", req, tmp_path / "u", recipe("default", device="cpu"),
            progress=False, allow_unconverged=True, model_and_tokenizer=(base, tok))
    assert same_as_start()
    model = load_adapter(base, tmp_path / "u")
    AdapterEval(model, tok, "chat", max_new_tokens=2).generate(load_records(folder / "train.jsonl")[:2])
    unload_adapter(model)
    assert same_as_start()


def test_a_bfloat16_base_gives_the_float32_update(folder, tmp_path):
    """The projector's tensors are in Θ as float32 while a bfloat16 base hands it bfloat16 image features: the
    update must run and agree with the float32 one (the adapter's maths is float32 whatever the base)."""
    import dataclasses

    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "correct_response", "id": "d4", "new": {"response": "digit 2"}}])
    deltas = {}
    for name in ("float32", "bfloat16"):
        s = dataclasses.replace(recipe("default"), dtype=name, device="cpu", verify="off")
        res = unlearn(str(folder / "base"), folder / "adapter", folder / "train.jsonl", req, None, settings=s,
                      progress=False, allow_unconverged=True)
        deltas[name] = res.delta.double()
    cos = float(torch.nn.functional.cosine_similarity(deltas["bfloat16"], deltas["float32"], 0))
    assert cos > 0.99 and not torch.equal(deltas["bfloat16"], deltas["float32"]), cos


def test_a_vision_family_other_than_llava_is_refused_by_name(folder, tmp_path):
    import shutil

    shutil.copytree(folder / "base", tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2_vl"}))
    with pytest.raises(InputError, match="a 'qwen2_vl' vision-language model; llmeraser supports \\['llava'\\]"):
        load_tiny(tmp_path / "base")


def test_the_pixel_cache_stays_within_its_bound_and_gives_the_same_pixels(folder):
    from llmeraser.vision import vision_of

    base, _ = load_tiny(folder / "base")
    vision = vision_of(base)
    paths = sorted(str(p) for p in (folder / "images").iterdir())
    first = vision.pixels(paths[0]).clone()
    one = first.numel() * first.element_size()
    vision.cache_mb = 2.5 * one / 2**20  # room for two images
    for p in paths:
        vision.pixels(p)
    assert len(vision._cache) == 2 and vision._cached_bytes == 2 * one and paths[0] not in vision._cache
    assert torch.equal(vision.pixels(paths[0]), first)  # read again after eviction: the same tensor values


def test_modules_to_save_given_by_the_user_add_to_the_projector(folder):
    base, _ = load_tiny(folder / "base")
    model = add_lora(base, TrainSettings(rank=2, modules_to_save=("lm_head",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unload_adapter(model)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_a_chat_template_that_drops_the_image_place_is_named(folder, monkeypatch):
    import llmeraser.render as render

    base, tok = load_tiny(folder / "base")
    real = render.render_text
    def dropping(*args):  # as a template that renders only list-of-parts content would
        head, tail = real(*args)
        return head.replace("[[image]]", ""), tail

    monkeypatch.setattr(render, "render_text", dropping)
    with pytest.raises(InputError, match="dropped the image's place.*--template plain"):
        encode(load_records(folder / "train.jsonl")[0], tok, "chat", 256, **model_inputs(base))


def test_a_text_base_refuses_to_answer_an_image_record(folder, tiny_dir):
    base, tok = load_tiny(tiny_dir / "base")
    model = load_adapter(base, tiny_dir / "adapter")
    try:
        with pytest.raises(InputError, match="reads text only"):  # not an answer from the text alone
            AdapterEval(model, tok, "chat", max_new_tokens=2).generate(load_records(folder / "train.jsonl")[:1])
    finally:
        unload_adapter(model)
