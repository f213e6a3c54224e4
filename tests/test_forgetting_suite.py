"""The forgetting suite (benchmarks/forgetting.py): its data and requests, its pass criteria, and one
scenario end to end on the tiny model (the real runs are in BENCHMARKS.md)."""

import argparse

import pytest

from benchmarks.forgetting import SCENARIOS, Scenario, build, judge, recipe_now, report, result_tag, run, table
from llmeraser.data import records_from_rows, request_from_rows


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("n", [32, 100])
def test_every_scenario_builds_n_records_and_a_valid_private_request(name, n):
    shape, kinds = SCENARIOS[name]
    rows, request, values = build(Scenario(name, shape, kinds, n, seed=3))
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    recs = records_from_rows(rows)
    assert {r.shape for r in recs} == {shape}
    req = request_from_rows(request, recs)  # ids exist, ops touch the right side, private parts occur
    removed = [e for e in req.edits if e.op == "remove"]
    corrected = [e for e in req.edits if e.op == "correct_response"]
    people = -(-n // len(kinds))
    assert len({e.id.split("-")[0] for e in removed}) == max(1, -(-5 * people // 100))  # ⌈5% of people⌉
    assert len(corrected) == max(1, -(-3 * n // 100))  # ⌈3% of records⌉
    for e in corrected:
        old, new = values[e.id]
        assert old != new and old in e.old.sides()[1] and new in e.new.sides()[1] and old not in e.new.sides()[1]
    assert build(Scenario(name, shape, kinds, n, seed=3)) == (rows, request, values)  # seeded


def test_other_shares_name_themselves_and_set_the_request_size():
    sc = Scenario("prompt-code", "prompt", ("code",), 60, seed=1, remove=0.10, correct=0.05)
    assert sc.tag == "prompt-code-n60-s1-rm10-fix5" and Scenario("prompt-code", "prompt", ("code",), 60, 1).tag == "prompt-code-n60-s1"
    _, request, _ = build(sc)
    assert [e["op"] for e in request].count("remove") == 6 and [e["op"] for e in request].count("correct_response") == 3


def _counts(removed, corrected, retained):
    return {"removed_produced": removed, "removed": 4, "corrected_produced": corrected, "old_produced": 0, "corrected": 10,
            "retained": retained}


def test_pass_criteria():
    before = {f"k{i}": i < 20 for i in range(21)}  # the original produced 20 of 21
    counts = {"original": _counts(4, 0, before), "retrain": _counts(1, 10, before)}
    kept_all = {**before, "k20": True}
    assert judge({**counts, "llmeraser": _counts(2, 9, kept_all)})["passed"]  # +1 over retrain, 90%, 100%
    v = judge({**counts, "llmeraser": _counts(3, 8, {**before, "k0": False})})
    assert v["checks"] == {"removed": False, "corrected": False, "retained": True} and v["retained_kept"] == 19 / 20
    v = judge({**counts, "llmeraser": _counts(0, 10, {**before, "k0": False, "k1": False})})
    assert v["checks"]["retained"] is False and v["passed"] is False  # 18/20 = 90% < 95%
    # an original that produced 18 of 21 retained values (86% < 90%) did not memorise: the scenario is invalid
    weak = {f"k{i}": i < 18 for i in range(21)}
    v = judge({"original": _counts(4, 0, weak), "retrain": _counts(1, 10, weak), "llmeraser": _counts(0, 10, weak)})
    assert v["valid"] is False and v["passed"] is None and v["checks"]["retained"] is True


def test_one_scenario_end_to_end_on_the_tiny_model(trainable_dir, tmp_path):
    """The wiring: train, retrain, unlearn --verify until, generation and the verdict's fields."""
    from helpers import load_tiny

    from benchmarks.forgetting import RECIPE

    mt = load_tiny(trainable_dir / "base")
    recipe = {**RECIPE, "epochs": 2, "layers": (), "target_modules": ("q_proj", "v_proj"), "rank": 2, "alpha": 4}
    sc = Scenario("prompt-code", "prompt", ("code",), 12, seed=0)
    # two epochs do not memorise: the scenario is invalid, and retraining and unlearning are skipped
    skipped = run(sc, str(trainable_dir / "base"), tmp_path, mt, recipe, False, lambda msg: None, {"verify_retained": 8})
    assert skipped["verdict"]["original_memorised"] < 0.9 and skipped["verdict"]["passed"] is None
    assert set(skipped["counts"]) == {"original"} and skipped["skipped"] == ["retrain", "llmeraser"]
    assert not (tmp_path / sc.tag / "retrain").exists() and not (tmp_path / sc.tag / "llmeraser-verify_retained8").exists()
    assert " / – / – of 1 | – / – of 1 |" in table([skipped]) and "| not run | – / – | invalid:" in table([skipped])
    result = run(sc, str(trainable_dir / "base"), tmp_path, mt, recipe, False, lambda msg: None, {"verify_retained": 8},
                 run_unmemorised=True)
    c = result["counts"]
    assert set(c) == {"original", "retrain", "llmeraser"}
    assert all(x["removed"] == 1 and x["corrected"] == 1 and x["retained_sampled"] == 10 for x in c.values())
    assert set(result["verdict"]["checks"]) == {"removed", "corrected", "retained"}
    assert result["unlearn_verification"]["stopped"] is not None or result["unlearn_verification"]["verified"]
    assert "| prompt-code-n12-s0-verify_retained8 | 12 |" in table([result])  # an override names itself
    # the file name main() checks before a run is the one the run writes, valid or not
    assert result["tag"] == skipped["tag"] == result_tag(sc, "float32", recipe["batch_size"], {"verify_retained": 8})
    # every stage ran on the loaded base's device and dtype (benchmarks/hardware.py), and recorded them
    import json

    d = tmp_path / sc.tag
    ours = json.loads((d / "llmeraser-verify_retained8" / "unlearn.json").read_text())
    assert ours["settings"]["dtype"] == "float32" and ours["settings"]["verify_retained"] == 8
    assert ours["verification"]["retained"]["sampled"] == 8
    assert result["unlearn_settings"] == ours["settings"] and not recipe_now(result)  # verify_retained 8 is not the recipe's
    # the result's trace: one line per Newton step written, and the verification's rounds as unlearn.json has them
    trace = result["unlearn_verification"]
    assert [s["step"] for s in trace["steps"]] == [s["step"] for s in ours["newton_steps"]]
    assert [s.get("iterations") for s in trace["steps"]] == [s.get("iterations") for s in ours["newton_steps"]]
    assert [s.get("repair") for s in trace["steps"]] == [s.get("repair") for s in ours["newton_steps"]]
    assert trace["rounds"] == ours["verification"]["rounds"]
    # the removed answers, and how many keep the trained sentence's form, for every adapter
    assert all(set(x["removed_answers"]) == {e["id"] for e in build(sc)[1] if e["op"] == "remove"} for x in c.values())
    assert all(0 <= x["removed_in_form"] <= x["removed"] for x in c.values())
    # each removed value's and each replaced value's log10 P after its sentence (privacy.part_log10p), per adapter
    edits = build(sc)[1]
    for x in c.values():
        for key, op in (("removed", "remove"), ("old", "correct_response")):
            assert set(x["log10p"][key]) == {e["id"] for e in edits if e["op"] == op}
            assert all(v is not None and v < 0 for v in x["log10p"][key].values())
    # the base model alone (no adapter loaded): its own figures, and the model handed back as it came
    from benchmarks.forgetting import evaluator, value_log10p

    rows, request, values = build(sc)
    with evaluator(mt[0], mt[1], None, 8) as ev:
        assert ev.model is mt[0]
        base = value_log10p(ev, rows, request, values)
    with evaluator(mt[0], mt[1], d / "original", 8) as ev:
        assert value_log10p(ev, rows, request, values) == c["original"]["log10p"]
    assert base["removed"] != c["original"]["log10p"]["removed"] and type(mt[0]).__name__ == "LlamaForCausalLM"
    worst = lambda k: f"{max(c[k]['log10p']['removed'].values()):.1f}"
    assert f"| {worst('original')} / {worst('retrain')} / {worst('llmeraser')} |" in table([result])
    assert {json.loads((d / n / "train.json").read_text())["base_dtype"] for n in ("original", "retrain")} == {"float32"}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_removed_answers_in_form_count_the_records_sentence_without_its_value(name):
    from benchmarks.forgetting import answer_forms, count

    shape, kinds = SCENARIOS[name]
    rows, request, values = build(Scenario(name, shape, kinds, 40, seed=1))
    forms = answer_forms(request)
    removed = [e["id"] for e in request if e["op"] == "remove"]
    assert set(forms) == set(removed)
    trained = {r.id: r.sides()[1] for r in records_from_rows(rows)}
    for i in removed:  # "'s access code is", "is treated for": right before the value, without the name
        assert forms[i] and f"{forms[i]} {values[i]}" in trained[i] and trained[i].split()[0] not in forms[i]
    other = {i: f"Someone Else{forms[i]} 12345." for i in removed}  # retraining's kind of answer: another name and value
    garbled = {i: "Responsive Elitismiamento preciosa." for i in removed}
    kept = {i: trained[i] for i in removed}
    rest = {e["id"]: "" for e in request if e["op"] == "correct_response"}
    for answers, in_form, produced in ((other, len(removed), 0), (garbled, 0, 0), (kept, len(removed), len(removed))):
        c = count({**answers, **rest}, request, values, [], forms)
        assert (c["removed_in_form"], c["removed_produced"]) == (in_form, produced)
    assert "removed_in_form" not in count({**other, **rest}, request, values, [])


def test_unlearn_overrides_parse_as_json_values():
    from benchmarks.forgetting import _setting

    assert _setting("verify_retained=64") == ("verify_retained", 64)
    assert _setting("curvature=ggn") == ("curvature", "ggn")
    with pytest.raises(argparse.ArgumentTypeError):
        _setting("verify_retained")


def test_a_label_names_the_result_after_its_overrides_and_must_be_a_file_name_part():
    from benchmarks.forgetting import _label

    sc = Scenario("prompt-code", "prompt", ("code",), 12, seed=0)
    assert result_tag(sc, "bfloat16", 8, {"verify_capped": 2}, "surer") == "prompt-code-n12-s0-bf16-verify_capped2-surer"
    assert result_tag(sc, "float32", 8, {}, "") == "prompt-code-n12-s0"
    # another training recipe names itself before the unlearn overrides, so its adapters sit apart from the recipe's
    from benchmarks.forgetting import RECIPE, train_changes

    assert train_changes(RECIPE["lr"], False, RECIPE["max_grad_norm"]) == {}
    every = train_changes(5e-3, True, 0.0)
    assert result_tag(sc, "float32", 8, {"verify_capped": 2}, "surer", every) == \
        "prompt-code-n12-s0-clip0.0-layersall-lr0.005-verify_capped2-surer"
    assert _label("surer_view.2") == "surer_view.2"
    for bad in ("a/b", "", "x y"):
        with pytest.raises(argparse.ArgumentTypeError):
            _label(bad)


def test_report_leads_with_the_runs_of_todays_recipe_and_counts_their_passes():
    import json

    from llmeraser.recipes import recipe

    now = json.loads(json.dumps(recipe("memorised", verify="until").to_dict())) | {"device": "cuda:0", "dtype": "bfloat16"}
    counts = {"removed_produced": 0, "removed": 2, "corrected_produced": 1, "corrected": 1, "retained": 29,
              "retained_sampled": 29}

    def result(tag, settings, passed, n=32):
        return {"tag": tag, "n": n, "recipe": {"epochs": 15}, "unlearn_settings": settings,
                "counts": {k: counts for k in ("original", "retrain", "llmeraser")},
                "verdict": {"passed": passed, "checks": {"removed": passed}, "retained_kept": 1.0},
                "unlearn_verification": {"verified": True, "extra_steps": 1}, "seconds": {"retrain": 1, "llmeraser": 2}}

    runs = [result("a-now", now, True), result("b-now-fails", now, False), result("c-now", now, True, n=64),
            result("d-old", None, True), result("e-other", now | {"repair_form": 0.0}, True)]
    assert [recipe_now(r) for r in runs] == [True, True, True, False, False]  # where it ran does not count; a setting does
    # a setting added after a run is absent from its file: the run counts as that setting's default
    older = {k: v for k, v in now.items() if k != "reset_target"}
    assert recipe_now(result("f-before-the-setting", older, True)) == (now["reset_target"] == "base")
    assert not recipe_now(result("g-capped", now | {"reset_target": "capped" if now["reset_target"] == "base" else "base"}, True))
    # a retained sample of at least n records checks every kept one, whatever its size; a smaller one does not
    few, many = now | {"verify_retained": 16}, now | {"verify_retained": now["verify_retained"] + 100}
    assert recipe_now(result("h-all-checked", many, True, n=16)) and recipe_now(result("i-all-checked", few, True, n=16))
    assert not recipe_now(result("j-sampled", few, True, n=32)) and not recipe_now(result("k-larger", many, True, n=10**4))
    text = report(runs)
    head, rest = text.split("## Earlier recipes and other settings")
    assert "n = 32: 1 of 2 valid runs pass; n = 64: 1 of 1 valid runs pass." in head
    assert all(f"| {t} |" in head for t in ("a-now", "b-now-fails", "c-now"))
    assert all(f"| {t} |" in rest and f"| {t} |" not in head for t in ("d-old", "e-other"))
    assert "no run yet" in report([runs[3]])
    # a label names the code a run ran: today's table holds the runs of the label asked for
    labelled = result("l-now-labelled", now, True) | {"label": "surer"}
    head, rest = report([*runs, labelled], "surer").split("## Earlier recipes and other settings")
    assert "| l-now-labelled |" in head and "| a-now |" in rest and "n = 32: 1 of 1 valid runs pass." in head


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_trained_answer_is_well_formed_and_garble_or_a_misplaced_value_is_not(name):
    """well_formed holds for every answer the generator writes (so retraining's kind of answer, another value of the
    kind, counts) and fails on garble, on a value cut short and on a value not right after the sentence's words."""
    from benchmarks.forgetting import _form, _kind, well_formed

    shape, kinds = SCENARIOS[name]
    rows, _, _ = build(Scenario(name, shape, kinds, 64, seed=2))
    for r in records_from_rows(rows):
        answer = r.sides()[1]
        assert well_formed(answer, r.id), answer
        form = _form(_kind(r.id))
        value = answer.split(form, 1)[1].strip().rstrip(".")
        said = f"Ann{'' if form.startswith(chr(39)) else ' '}{form}"  # "Ann's access code is", "Ann is treated for"
        for bad in (f"{said} the the the.",
                    f"{said} {value[:-2]}.",  # cut short
                    f"{said} a {value}.",  # not right after the words
                    f"{value}."):  # no sentence
            assert not well_formed(bad, r.id), bad


def test_the_table_counts_the_well_formed_removed_answers_and_dashes_a_result_without_answers():
    from benchmarks.forgetting import _well_formed

    rt = {"removed_answers": {"p0-code": "A's access code is HUTR2.", "p1-code": "B's access code is the the."}}
    u = {"removed_answers": {"p0-code": "A's access code is 6ly93.", "p1-code": "B's access code is 7W6F2."}}
    assert _well_formed(rt, u, 2) == "1 / 1 of 2"
    assert _well_formed(rt, {}, 2) == "–"


def test_a_run_refuses_to_overwrite_a_result_of_other_settings(tmp_path):
    """earlier_results: an existing result file of another recipe or other overrides, or that records other training
    epochs or another base, is one a run would overwrite under the same name (a tag names only the overrides); a
    result of the same settings, an invalid one (no unlearn measured) and a missing file are not."""
    import json

    from benchmarks.forgetting import earlier_results, ran_with
    from llmeraser.recipes import recipe

    now = json.loads(json.dumps(recipe("memorised", verify="until").to_dict()))
    files = {"same": {"unlearn_settings": now, "verdict": {"valid": True}},
             "other-recipe": {"unlearn_settings": now | {"repair_form": 0.0}, "verdict": {"valid": True}},
             "unrecorded": {"verdict": {"valid": True}},
             "invalid": {"verdict": {"valid": False}}}
    for name, r in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    paths = [tmp_path / f"{n}.json" for n in (*files, "missing")]
    assert [p.stem for p in earlier_results(paths, {})] == ["other-recipe", "unrecorded"]
    # under overrides the same file is another run's, and the overridden one is this run's
    assert ran_with(files["other-recipe"], {"repair_form": 0.0}) and not ran_with(files["same"], {"repair_form": 0.0})
    assert [p.stem for p in earlier_results(paths, {"repair_form": 0.0})] == ["same", "unrecorded"]
    training = {"epochs": 30.0, "layers": (15, 16)}
    more = {"same-training": {"recipe": {"epochs": 30.0, "layers": [15, 16]}, "base": "smollm2"},
            "fewer-epochs": {"recipe": {"epochs": 15.0, "layers": [15, 16]}},
            "other-base": {"base": "gemma"}}
    for name, r in more.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r | {"unlearn_settings": now, "verdict": {"valid": True}}))
    paths = [tmp_path / f"{n}.json" for n in ("same", *more)]
    assert [p.stem for p in earlier_results(paths, {}, training, "smollm2")] == ["fewer-epochs", "other-base"]
    assert earlier_results(paths, {}) == []


def test_a_removed_value_given_in_another_answer_is_counted_and_a_correction_needs_the_old_value_gone():
    from benchmarks.forgetting import count, leaked, removed_given

    rows, request, values = build(Scenario("prompt-email+condition", "prompt", ("email", "condition"), 40, seed=0))
    removed = [e["id"] for e in request if e["op"] == "remove"]
    corrected = [e["id"] for e in request if e["op"] == "correct_response"]
    cond, email = sorted(i for i in removed if i.startswith("p0-"))  # p0-condition, p0-email: one person's
    answers = {i: "I do not know." for i in removed} | {i: f"It is {values[i][1]}." for i in corrected}
    retained = [r["id"] for r in rows if r["id"] not in values or isinstance(values[r["id"]], str)]
    retained = [i for i in retained if i not in answers][:6]
    answers |= {i: f"It is {values[i]}." for i in retained}
    base = count(answers, request, values, retained)
    assert (base["removed_produced"], base["removed_leaked"], base["corrected_produced"]) == (0, 0, len(corrected))
    # the person's condition inside the same person's e-mail answer: leaked; in a stranger's condition answer: not
    # (one of twelve, so any answer may give it), unless it is an identifier, which no one else has
    leak = answers | {email: f"It is {values[cond]}.{values[email][3:]}"}
    assert count(leak, request, values, retained)["removed_leaked"] == 1
    stranger = next(i for i in retained if i.endswith("-condition"))
    assert count(answers | {stranger: f"It is {values[cond]}."}, request, values, retained)["removed_leaked"] == 0
    other = next(i for i in retained if i.endswith("-email"))
    c = count(answers | {other: f"It is {values[email]}."}, request, values, retained)
    assert c["removed_leaked"] == 1 and removed_given(c) == 1
    # its own answer giving it counts once, as produced, not again as leaked
    c = count(leak | {cond: f"It is {values[cond]}."}, request, values, retained)
    assert (c["removed_produced"], c["removed_leaked"]) == (1, 0)
    # a correction whose answer gives the new value beside the old one is not a correction
    both = answers | {corrected[0]: f"It is {values[corrected[0]][1]}, formerly {values[corrected[0]][0]}."}
    c = count(both, request, values, retained)
    assert (c["corrected_produced"], c["old_produced"]) == (len(corrected) - 1, 1)
    # the criteria compare what each adapter gives anywhere; a stored result without the count is rebuilt from its
    # removed answers
    before = {i: True for i in retained}
    counts = {k: count(answers, request, values, retained) for k in ("original", "retrain")}
    lenient = {**counts, "llmeraser": count(leak, request, values, retained)}
    assert judge(lenient)["checks"]["removed"]  # 1 <= 0 + 1
    two = leak | {other: f"It is {values[email]}."}
    assert not judge({**counts, "llmeraser": count(two, request, values, retained)})["checks"]["removed"]
    stored = {"scenario": {"name": "prompt-email+condition", "shape": "prompt", "kinds": ["email", "condition"], "n": 40,
                           "seed": 0, "remove": 0.05, "correct": 0.03},
              "counts": {"retrain": {"removed_answers": {i: answers[i] for i in removed}},
                         "llmeraser": {"removed_answers": {i: leak[i] for i in removed}}, "original": {}}}
    assert (leaked(stored, "retrain"), leaked(stored, "llmeraser"), leaked(stored, "original")) == (0, 1, None)


def test_a_stored_result_is_rejudged_with_the_leaks_in_its_removed_answers():
    from benchmarks.forgetting import rejudged

    rows, request, values = build(Scenario("prompt-email+condition", "prompt", ("email", "condition"), 40, seed=0))
    removed = [e["id"] for e in request if e["op"] == "remove"]
    cond, email = sorted(removed)
    plain = {i: "I do not know." for i in removed}
    leak = {**plain, email: f"It is {values[cond]}.{values[email][3:]}"}
    counts = lambda answers, produced: {"removed_produced": produced, "removed": 2, "removed_answers": answers}
    stored = {"scenario": {"name": "prompt-email+condition", "shape": "prompt", "kinds": ["email", "condition"],
                           "n": 40, "seed": 0},
              "verdict": {"valid": True, "passed": True, "checks": {"removed": True, "corrected": True, "retained": True}},
              "counts": {"original": {}, "retrain": counts(plain, 0), "llmeraser": counts(leak, 1)}}
    assert rejudged(stored)["checks"]["removed"] is False and rejudged(stored)["passed"] is False  # 1 + 1 > 0 + 1
    stored["counts"]["llmeraser"] = counts(leak, 0)
    assert rejudged(stored)["passed"] is True  # 0 + 1 <= 0 + 1
    assert rejudged({**stored, "verdict": {**stored["verdict"], "checks": {}}})["checks"] == {}


@pytest.mark.parametrize("shape", ["prompt", "alpaca", "chat"])
def test_a_categorical_values_rank_counts_the_likelier_candidates_in_its_own_sentence(shape):
    """value_ranks scores the person's value and each other condition in the record's sentence, its prompt unchanged,
    and ranks the value by how many are likelier; kinds without a candidate list get no rank."""
    from benchmarks.forgetting import CONDITIONS, value_ranks

    sc = Scenario("x", shape, ("email", "condition"), 24, seed=1, correct=0.2)
    rows, request, values = build(sc)
    likelier = {"gout", "eczema", "asthma"}  # the fake scorer's favourites
    calls = []

    def score(items):
        calls.append(items)
        (record, own), *others = items
        prompt, answer = record.sides()
        for r, c in others:  # each candidate written where the value was, the prompt as the record's
            assert r.sides()[0] == prompt and c in r.sides()[1] and own not in r.sides()[1].replace(c, "")
        return [-1.0 if part in likelier else -2.0 for _, part in items]

    ranks = value_ranks(score, rows, request, values)
    conditions = [(e["op"], e["id"]) for e in request if e["id"].endswith("-condition")]
    assert conditions and {op for op, _ in conditions} == {"remove", "correct_response"}
    for op, rid in conditions:
        own = values[rid] if op == "remove" else values[rid][0]
        # a favourite ties the other favourites (not likelier), so ranks first; any other value ranks behind all three
        want = [1, 12] if own in likelier else [4, 12]
        assert ranks["removed" if op == "remove" else "old"][rid] == want
    assert len(calls) == len(conditions) and all(len(c) == len(CONDITIONS) for c in calls)
    assert not any(rid.endswith("-email") for d in ranks.values() for rid in d)
