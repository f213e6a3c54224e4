"""`train`, baselines and `evaluate` on the tiny model; metric functions against reference packages."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from llmeraser.cli import main
from llmeraser.metrics import roc_auc, rouge

from helpers import write_jsonl

RECIPE = ["--rank", "4", "--alpha", "8", "--epochs", "150", "--lr", "2e-2", "--batch-size", "12", "--weight-decay", "0.01"]


def cli(*args):
    assert main([*map(str, args), "--device", "cpu", "--quiet"]) == 0


@pytest.fixture(scope="module")
def trained(trainable_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cli("train", "--base", trainable_dir / "base", "--data", trainable_dir / "train.jsonl", "--out", root / "original", *RECIPE)
    write_jsonl(root / "req.jsonl", [{"op": "remove", "id": "r1"}, {"op": "remove", "id": "r2"}])
    return root


def test_train_reaches_low_loss_and_is_deterministic(trainable_dir, trained, tmp_path):
    meta = json.loads((trained / "original" / "train.json").read_text())
    assert meta["loss_history"][0] > 3 * meta["final_loss"]
    assert meta["arguments"]["weight_decay"] == 0.01 and meta["n"] == 12 and len(meta["data_sha256"]) == 64
    cli("train", "--base", trainable_dir / "base", "--data", trainable_dir / "train.jsonl", "--out", tmp_path / "again", *RECIPE)
    a = load_file(str(trained / "original" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_retrain_equals_train_on_edited_data(trainable_dir, trained, tmp_path):
    cli("baseline", "retrain", "--base", trainable_dir / "base", "--adapter", trained / "original", "--data",
        trainable_dir / "train.jsonl", "--request", trained / "req.jsonl", "--out", tmp_path / "retrain")
    rows = [json.loads(x) for x in (trainable_dir / "train.jsonl").read_text().splitlines()]
    edited = write_jsonl(tmp_path / "edited.jsonl", [r for r in rows if r["id"] not in ("r1", "r2")])
    cli("train", "--base", trainable_dir / "base", "--data", edited, "--out", tmp_path / "direct", *RECIPE)
    a = load_file(str(tmp_path / "retrain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "direct" / "adapter_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert json.loads((tmp_path / "retrain" / "train.json").read_text())["n"] == 10


def test_auc_matches_sklearn():
    rng = random.Random(0)
    for _ in range(20):
        labels = [rng.randint(0, 1) for _ in range(30)]
        scores = [round(rng.gauss(y, 1.0), 1) for y in labels]  # rounding makes ties
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_paired_bootstrap_interval_of_a_difference():
    """Known answers: no difference gives [0, 0]; a constant shift c gives exactly [c, c] (every resample); on
    400 normal differences the interval holds the mean and is 2·1.96·sd/√n wide to within 15%; resamples
    where an AUC is undefined (one class) are left out; the same seed gives the same interval."""
    from llmeraser.metrics import paired_bootstrap

    rng = random.Random(1)
    a = [rng.random() for _ in range(16)]
    mean_diff = lambda x, y: lambda idx: sum(x[i] - y[i] for i in idx) / len(idx)  # noqa: E731
    assert paired_bootstrap(mean_diff(a, a), 16) == (0.0, 0.0, 0.0)
    point, lo, hi = paired_bootstrap(mean_diff([x + 0.25 for x in a], a), 16)
    assert point == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    d = [rng.gauss(0.3, 1.0) for _ in range(400)]
    zeros = [0.0] * 400
    point, lo, hi = paired_bootstrap(mean_diff(d, zeros), 400)
    mean = sum(d) / 400
    sd = (sum((x - mean) ** 2 for x in d) / 399) ** 0.5
    assert point == pytest.approx(mean) and lo < mean < hi
    assert hi - lo == pytest.approx(2 * 1.96 * sd / 400 ** 0.5, rel=0.15)
    assert paired_bootstrap(mean_diff(d, zeros), 400) == (point, lo, hi)
    labels, s1, s2 = [1, 0, 0, 0, 0, 0], [0.9, 0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.9, 0.2, 0.3, 0.4, 0.5]
    auc = lambda s, idx: roc_auc([s[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    point, lo, hi = paired_bootstrap(lambda idx: auc(s1, idx) - auc(s2, idx), 6)
    assert point == pytest.approx(1.0 - 0.0) and lo == hi == pytest.approx(1.0)  # every defined resample: 1 − 0


def test_rouge_is_stemmed_f1():
    """F1 of clipped n-gram overlap (ROUGE-1/2) and of the longest common subsequence (ROUGE-L), on stemmed,
    lower-cased word tokens: hand-counted cases."""
    # 5 of 6 unigrams shared ("the" twice in the reference, once in the hypothesis): P = R = 5/6
    got = rouge("The cat sat on the mat.", "the cat sat on a mat")
    assert got["rouge1"] == pytest.approx(5 / 6)
    assert got["rouge2"] == pytest.approx(3 / 5)  # the cat, cat sat, sat on of 5 bigrams each
    assert got["rougeL"] == pytest.approx(5 / 6)  # the cat sat on … mat
    # the stemmer: "runs"/"running" and "dogs"/"dog" are one token each
    assert rouge("dogs running", "dog runs")["rouge1"] == pytest.approx(1.0)
    assert rouge("a b c d", "d c b a")["rougeL"] == pytest.approx(1 / 4)
    assert rouge("Yes.", "No.") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def all_samples(folder):
    """A config whose curvature sample is the whole training set (curvature_samples is a config setting)."""
    path = folder / "all_samples.json"
    path.write_text(json.dumps({"curvature_samples": 0}))
    return path


def test_evaluate_report(trainable_dir, trained, tmp_path):
    base, data, req = trainable_dir / "base", trainable_dir / "train.jsonl", trained / "req.jsonl"
    cli("baseline", "retrain", "--base", base, "--adapter", trained / "original", "--data", data, "--request", req,
        "--out", tmp_path / "retrain")
    cli("baseline", "gradient-ascent", "--base", base, "--adapter", trained / "original", "--data", data,
        "--request", req, "--out", tmp_path / "ga", "--steps", "3")
    cli("unlearn", "--base", base, "--adapter", trained / "original", "--data", data, "--request", req,
        "--out", tmp_path / "llmeraser", "--config", all_samples(tmp_path), "--allow-unconverged")
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "phone of zed?", "response": "1234"},
                                                {"instruction": "Like it?", "input": "x", "output": "Yes."}][:1])
    cli("evaluate", "--base", base, "--data", data, "--request", req, "--test", test, "--out", tmp_path / "report",
        "--adapter", f"original={trained / 'original'}", "--adapter", f"llmeraser={tmp_path / 'llmeraser'}",
        "--adapter", f"retrain={tmp_path / 'retrain'}", "--adapter", f"gradient-ascent={tmp_path / 'ga'}",
        "--max-new-tokens", "6")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["original", "llmeraser", "retrain", "gradient-ascent"]
    for name, m in report["methods"].items():
        for split in ("forget", "retain", "test"):
            assert {"nll", "rouge1", "rouge2", "rougeL", "exact_match"} <= set(m[split]), (name, split)
            each = m[split]["by_sample"]
            assert len(each["id"]) == m[split]["n"]
            for k in ("rouge1", "rouge2", "rougeL"):
                assert sum(each[k]) / len(each[k]) == pytest.approx(m[split][k])
        assert {"cosine_param", "rel_dist_param", "cosine_merged", "rel_dist_merged", "kl_forget", "kl_test"} <= set(m["vs_retrain"])
        assert m["seconds"] is not None and m["peak_mb"] is not None
    # every adapter's per-record scores are in the same record order: they pair up
    assert len({tuple(m["forget"]["by_sample"]["id"]) for m in report["methods"].values()}) == 1
    r = report["methods"]["retrain"]["vs_retrain"]
    assert r["cosine_param"] == pytest.approx(1.0) and r["rel_dist_param"] == 0.0
    assert r["cosine_merged"] == pytest.approx(1.0) and r["rel_dist_merged"] == 0.0
    assert r["kl_forget"] == pytest.approx(0.0, abs=1e-6) and r["kl_test"] == pytest.approx(0.0, abs=1e-6)
    # removal raises the forget NLL for both removal methods
    nll = {n: m["forget"]["nll"] for n, m in report["methods"].items()}
    assert nll["llmeraser"] > nll["original"] and nll["gradient-ascent"] > nll["original"]
    for f in ("report.md", "metrics.png", "residual_llmeraser.png", "privacy.png"):
        assert (tmp_path / "report" / f).is_file()
    # privacy: every attack's AUC against the test set's non-members, leakage against retrain (0 for itself)
    for name, m in report["methods"].items():
        p = m["privacy"]
        assert set(p["auc"]) == set(p["leakage"]) == {"loss", "zlib", "min_k", "min_k_pp"}
        assert p["n_members"] == m["forget"]["n"] and p["n_nonmembers"] == 1
        assert 0 <= p["exact_memorisation"] <= 1 and p["longest_run_chars"] >= 0
    assert all(v == 0.0 for v in report["methods"]["retrain"]["privacy"]["leakage"].values())
    assert "MIA AUC min_k_pp" in (tmp_path / "report" / "report.md").read_text()


def test_evaluate_retain_samples(tiny_dir, tmp_path, capsys):
    """--retain-samples evaluates a seeded sample of the retained records, the same for every adapter."""
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r1"}])
    args = ["evaluate", "--base", tiny_dir / "base", "--data", tiny_dir / "train.jsonl", "--request", req,
            "--adapter", f"original={tiny_dir / 'adapter'}", "--adapter", f"again={tiny_dir / 'adapter'}"]
    cli(*args, "--out", tmp_path / "all")
    cli(*args, "--out", tmp_path / "some", "--retain-samples", "4")
    every = json.loads((tmp_path / "all" / "report.json").read_text())["methods"]
    some = json.loads((tmp_path / "some" / "report.json").read_text())["methods"]
    assert every["original"]["retain"]["n"] == 11 and some["original"]["retain"]["n"] == 4
    assert some["original"]["retain"]["nll"] == some["again"]["retain"]["nll"]  # the same sample for both
    assert some["original"]["retain"]["nll"] != every["original"]["retain"]["nll"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "bad"), "--retain-samples", "-1", "--quiet"]) != 0
    assert "--retain-samples -1: give an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_retain_sample_is_not_the_curvature_sample():
    """The retained records evaluate scores are not, by construction, the ones `unlearn` took curvature on
    (both used to be the first k of a seed-0 permutation of the same kept records)."""
    from llmeraser.curvature import seeded_subset
    from llmeraser.data import Record
    from llmeraser.evaluate import retain_sample

    recs = [Record(f"s{i}", {"prompt": f"q{i}", "response": "Yes."}, "prompt", None) for i in range(300)]
    sample = retain_sample(recs, 16)
    assert len(sample) == 16 and sample == [r for r in recs if r in sample]  # data order
    assert {r.id for r in retain_sample(list(reversed(recs)), 16)} == {r.id for r in sample}  # by id, not position
    for seed in range(5):
        assert len({r.id for r in sample} & {r.id for r in seeded_subset(recs, 16, seed)}) <= 6


def test_yes_no_metrics(trainable_dir, tmp_path):
    """Yes./No. splits get accuracy and AUC instead of generation metrics."""
    from llmeraser.data import load_records
    from llmeraser.evaluate import AdapterEval, split_metrics
    from llmeraser.modeling import load_adapter

    from helpers import load_tiny

    rows = [{"instruction": f"Does {n} like it?", "input": "", "output": o} for n, o in
            [("ann", "Yes."), ("bob", "No."), ("cy", "Yes."), ("dee", "No.")]]
    recs = load_records(write_jsonl(tmp_path / "yn.jsonl", rows))
    model, tok = load_tiny(trainable_dir / "base")
    m = split_metrics(AdapterEval(load_adapter(model, trainable_dir / "adapter"), tok, "chat"), recs)
    assert set(m) == {"n", "nll", "accuracy", "auc", "by_sample"} and 0 <= m["auc"] <= 1
    # the one-extra-pass score equals scoring both answers from scratch
    from llmeraser.evaluate import _response_fields
    from llmeraser.metrics import roc_auc

    ev = AdapterEval(load_adapter(model, trainable_dir / "adapter"), tok, "chat")
    def logp(ans):
        rs = [r.replaced(_response_fields(r, ans)) for r in recs]
        return [-x * n for x, n in zip(ev.nll(rs), ev._counts(rs))]
    scores = [a - b for a, b in zip(logp("Yes."), logp("No."))]
    assert scores[0] != scores[2]  # a model that scores them apart, else AUC says nothing
    assert m["auc"] == pytest.approx(roc_auc(scores, [1, 0, 1, 0]))
    # per-record scores, in record order, give the split's figures back (paired intervals use them)
    each = m["by_sample"]
    assert each["id"] == [r.id for r in recs] and each["label"] == [1, 0, 1, 0]
    assert each["score"] == pytest.approx(scores) and roc_auc(each["score"], each["label"]) == m["auc"]
    assert m["accuracy"] == pytest.approx(sum((s > 0) == y for s, y in zip(scores, [1, 0, 1, 0])) / 4)


def test_batched_generation_matches_one_at_a_time(trainable_dir):
    """Left-padded batched greedy decoding gives what decoding each prompt alone gives."""
    from llmeraser.data import load_records
    from llmeraser.evaluate import AdapterEval
    from llmeraser.modeling import load_adapter
    from llmeraser.render import resolve_template

    from helpers import load_tiny

    model, tok = load_tiny(trainable_dir / "base")
    model = load_adapter(model, trainable_dir / "adapter")
    records = load_records(trainable_dir / "train.jsonl")[:6]
    records[0] = records[0].replaced({"prompt": "a much longer question than the others, about " + records[0].sides()[0][-1]["content"]})
    template = resolve_template(tok, "auto")
    # batches of 4 in order of prompt length: the long first prompt is answered in the second batch
    batched = AdapterEval(model, tok, template, max_new_tokens=8, generate_batch_size=4).generate(records)
    alone = AdapterEval(model, tok, template, max_new_tokens=8, generate_batch_size=1).generate(records)
    assert batched == alone and len(set(alone)) > 1


def test_scored_from_one_pass_matches_each_record_alone(trainable_dir):
    """The shared forward's NLLs, its log-probs of the first `keep` records (across a batch boundary) and its
    per-token privacy statistics are what scoring each record on its own gives."""
    from llmeraser.data import load_records
    from llmeraser.evaluate import AdapterEval
    from llmeraser.modeling import load_adapter

    from helpers import load_tiny

    model, tok = load_tiny(trainable_dir / "base")
    ev = AdapterEval(load_adapter(model, trainable_dir / "adapter"), tok, "chat", batch_size=4)
    records = load_records(trainable_dir / "train.jsonl")[:7]
    nll, lp, stats = ev.scored(records, 5, stats=True)
    alone = [ev.scored([r], 1, stats=True) for r in records]
    assert nll == pytest.approx([a[0][0] for a in alone], rel=1e-5)
    assert torch.allclose(lp, torch.cat([a[1] for a in alone[:5]]), atol=1e-5)
    for s, a in zip(stats, alone):
        one = a[2][0]
        assert torch.allclose(s.log_p, one.log_p, atol=1e-5) and torch.allclose(s.z, one.z, atol=1e-4)
        assert torch.equal(s.hit, one.hit)
        # the mean NLL is the mean of the tokens' −log p
        assert float(-s.log_p.double().mean()) == pytest.approx(a[0][0], rel=1e-5)
    assert ev.scored(records, 0)[1] is None and ev.scored(records, 0)[2] is None


def test_fused_attention_is_sdpa_inside_and_eager_after(tiny64):
    """Evaluation runs SDPA; the outputs equal eager's, and HVPs after it get eager attention back."""
    import torch

    from llmeraser.modeling import fused_attention
    from llmeraser.objective import CausalLMObjective
    from llmeraser.render import encode

    model, tok, records = tiny64
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([encode(r, tok, "chat", 64) for r in records[:4]], "cpu")
    config = model.get_base_model().config
    with torch.no_grad():
        eager = obj.outputs({}, batch)
        with fused_attention(model):
            assert config._attn_implementation == "sdpa"
            fused = obj.outputs({}, batch)
    assert config._attn_implementation == "eager"
    assert torch.allclose(fused, eager, rtol=1e-6, atol=1e-6)


def test_merged_adapter_gives_the_same_outputs_and_restores_the_base(tiny64):
    """Evaluation merges the LoRA update into the base weights: same outputs, base weights bit for bit after."""
    from llmeraser.modeling import merged_adapter
    from llmeraser.objective import CausalLMObjective
    from llmeraser.render import encode

    model, tok, records = tiny64
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([encode(r, tok, "chat", 64) for r in records[:4]], "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = obj.outputs({}, batch)
        with merged_adapter(model):
            changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
            merged = obj.outputs({}, batch)
    assert changed and all(".base_layer." in n for n in changed)  # the merge did happen, in the base weights only
    assert torch.allclose(merged, unmerged, rtol=1e-9, atol=1e-10)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_merged_inner_products_match_the_dense_delta_w():
    """⟨ΔW_a, ΔW_b⟩ from r-sized products equals the sum over modules of the dense (α/r)(BA − B_oA_o) products."""
    from llmeraser.evaluate import _cosine_from_gram, _distance_from_gram, merged_inner
    from llmeraser.metrics import cosine, relative_distance

    g = torch.Generator().manual_seed(0)
    shapes = {"m1": (6, 10), "m2": (12, 5)}  # (out, in), rank 3

    def adapter():
        w = {}
        for m, (o, i) in shapes.items():
            w[f"{m}.lora_A.weight"] = torch.randn(3, i, generator=g, dtype=torch.float64)
            w[f"{m}.lora_B.weight"] = torch.randn(o, 3, generator=g, dtype=torch.float64)
        return w

    o, a, b = adapter(), adapter(), adapter()
    scale = 2.0

    def dense(w):
        return torch.cat([(scale * (w[f"{m}.lora_B.weight"] @ w[f"{m}.lora_A.weight"]
                                    - o[f"{m}.lora_B.weight"] @ o[f"{m}.lora_A.weight"])).reshape(-1) for m in shapes])

    da, db = dense(a), dense(b)
    g_aa, g_bb, g_ab = (merged_inner(x, y, o, scale) for x, y in ((a, a), (b, b), (a, b)))
    assert g_ab == pytest.approx(float(da @ db), rel=1e-12)
    assert g_aa == pytest.approx(float(da @ da), rel=1e-12)
    assert _cosine_from_gram(g_aa, g_bb, g_ab) == pytest.approx(cosine(da, db), rel=1e-10)
    assert _distance_from_gram(g_aa, g_bb, g_ab) == pytest.approx(relative_distance(da, db), rel=1e-10)
    assert math.isnan(_cosine_from_gram(0.0, g_bb, 0.0))  # the original itself: no change, as metrics.cosine says


def test_evaluate_cache_reuses_unchanged_adapters_only(trainable_dir, trained, tmp_path):
    """Cached metrics equal fresh ones; a changed adapter is evaluated again, with its KL against retrain."""
    from llmeraser.evaluate import EvaluateSettings, evaluate

    base, data, req = trainable_dir / "base", trainable_dir / "train.jsonl", trained / "req.jsonl"
    cli("baseline", "retrain", "--base", base, "--adapter", trained / "original", "--data", data, "--request", req,
        "--out", tmp_path / "retrain")
    for steps in (1, 2):
        cli("baseline", "gradient-ascent", "--base", base, "--adapter", trained / "original", "--data", data,
            "--request", req, "--out", tmp_path / f"ga{steps}", "--steps", steps)
    adapters = {"original": trained / "original", "retrain": tmp_path / "retrain", "ga": tmp_path / "ga1"}
    run = lambda out, named, cache: evaluate(str(base), named, data, req, tmp_path / out,
                                             EvaluateSettings(max_new_tokens=4, device="cpu"),
                                             progress=False, cache_dir=cache)["methods"]
    # as json text: NaN (the original's cosine with itself) compares equal there
    strip = lambda m: json.dumps({k: v for k, v in m.items() if k not in ("cached", "eval_seconds")}, sort_keys=True)
    first = run("r1", adapters, tmp_path / "cache")
    again = run("r2", adapters, tmp_path / "cache")
    assert all(again[n].get("cached") for n in adapters) and not any(first[n].get("cached") for n in adapters)
    assert {n: strip(m) for n, m in again.items()} == {n: strip(m) for n, m in first.items()}
    changed = {**adapters, "ga": tmp_path / "ga2"}
    mixed = run("r3", changed, tmp_path / "cache")
    fresh = run("r4", changed, None)
    assert mixed["original"].get("cached") and mixed["retrain"].get("cached") and not mixed["ga"].get("cached")
    assert mixed["ga"]["vs_retrain"]["kl_forget"] == pytest.approx(fresh["ga"]["vs_retrain"]["kl_forget"], rel=1e-6)
    assert mixed["ga"]["forget"] == fresh["ga"]["forget"] and mixed["ga"]["forget"] != first["ga"]["forget"]


def test_layers_adapts_only_those_layers_through_train_retrain_and_unlearn(trainable_dir, trained, tmp_path):
    """--layers 1: LoRA on layer 1 of the 2-layer model only; retrain reads it from train.json, unlearn keeps it."""
    recipe = [*RECIPE[:5], "20", *RECIPE[6:]]  # 20 epochs: the test is about where the tensors are
    cli("train", "--base", trainable_dir / "base", "--data", trainable_dir / "train.jsonl", "--out", tmp_path / "top",
        *recipe, "--layers", "1")
    keys = set(load_file(str(tmp_path / "top" / "adapter_model.safetensors")))
    assert keys and all(".layers.1." in k for k in keys)
    assert json.loads((tmp_path / "top" / "train.json").read_text())["arguments"]["layers"] == [1]
    cli("baseline", "retrain", "--base", trainable_dir / "base", "--adapter", tmp_path / "top", "--data",
        trainable_dir / "train.jsonl", "--request", trained / "req.jsonl", "--out", tmp_path / "retrain")
    assert set(load_file(str(tmp_path / "retrain" / "adapter_model.safetensors"))) == keys
    cli("unlearn", "--base", trainable_dir / "base", "--adapter", tmp_path / "top", "--data", trainable_dir / "train.jsonl",
        "--request", trained / "req.jsonl", "--out", tmp_path / "unlearned", "--config", all_samples(tmp_path))
    new = load_file(str(tmp_path / "unlearned" / "adapter_model.safetensors"))
    old = load_file(str(tmp_path / "top" / "adapter_model.safetensors"))
    assert set(new) == keys and any(not torch.equal(new[k], old[k]) for k in keys)


@pytest.mark.parametrize("layers, message", [(["5"], "the base model has layers 0 to 1"),
                                             (["x"], "give layer indices as integers"),
                                             (["-1"], "layer indices start at 0")])
def test_bad_layers_name_the_problem(trainable_dir, tmp_path, capsys, layers, message):
    code = main(["train", "--base", str(trainable_dir / "base"), "--data", str(trainable_dir / "train.jsonl"),
                 "--out", str(tmp_path / "out"), "--layers", *layers, "--device", "cpu", "--quiet"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quiet_draws_no_bar_not_even_transformers(trainable_dir, tmp_path, capfd):
    """--quiet: no progress bar on stderr, including transformers' own while the base loads."""
    from transformers.utils import logging as hf_logging

    try:
        hf_logging.enable_progress_bar()
        cli("train", "--base", trainable_dir / "base", "--data", trainable_dir / "train.jsonl", "--out", tmp_path / "a",
            "--epochs", "1", "--batch-size", "12")
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "it/s]" not in err, err[-500:]
    finally:
        hf_logging.enable_progress_bar()


def test_wrapping_a_model_in_peft_warns_nothing_about_gradient_checkpointing(tiny_dir):
    """PEFT's read of transformers' deprecated `is_gradient_checkpointing` is not our users' concern."""
    import warnings

    from helpers import load_tiny

    from llmeraser.modeling import load_adapter, unload_adapter
    from llmeraser.train import TrainSettings, add_lora

    model, _ = load_tiny(tiny_dir / "base")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        unload_adapter(add_lora(model, TrainSettings(rank=2, alpha=4)))
        unload_adapter(load_adapter(model, tiny_dir / "adapter"))
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in seen]


def test_max_grad_norm_scales_long_gradients_only(trainable_dir):
    """Adam's first update is lr·g/(|g| + ε) per element: ≈ lr·sign(g) for the raw gradient, ≈ 0 once g is clipped to
    a norm far below ε; a bound above ‖g‖ changes nothing, bit for bit."""
    from helpers import load_tiny

    from llmeraser.data import load_records
    from llmeraser.modeling import unload_adapter
    from llmeraser.train import TrainSettings, add_lora, train_lora

    model, tok = load_tiny(trainable_dir / "base")
    records = load_records(trainable_dir / "train.jsonl")

    def first_update(clip):
        settings = TrainSettings(rank=2, alpha=4, lr=1e-2, max_grad_norm=clip, max_length=64)
        peft = add_lora(model, settings)
        before = [p.detach().clone() for p in peft.parameters() if p.requires_grad]
        train_lora(peft, tok, records, settings, progress=False, max_steps=1)
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip((p for p in peft.parameters() if p.requires_grad), before)])
        unload_adapter(peft)
        return step

    raw = first_update(0.0)
    assert raw.abs().max() > 1e-3  # lr·sign(g) on lora_B, which starts at 0
    assert first_update(1e-14).abs().max() < 1e-5 * raw.abs().max()
    assert torch.equal(first_update(1e9), raw)
    with pytest.raises(Exception, match="max-grad-norm"):
        TrainSettings(max_grad_norm=-1.0)
