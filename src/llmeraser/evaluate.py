"""Compare named adapters on the forget set, the retained samples and a test set, and against retraining.

Splits: ``forget`` (affected samples as they were), ``forget_new`` (the edited versions, for query
and response edits), ``retain`` (training samples the request does not touch), ``test``.
Metrics per split: mean response NLL; for Yes./No. responses accuracy and ROC-AUC of the score
log P(Yes.) − log P(No.) (the TALLRec metric); otherwise greedy generation scored with ROUGE-1/2/L
and exact match. Against an adapter named ``retrain``: cosine and relative L2 distance of each
adapter's change from the original, in parameter space and in merged ΔW = (α/r)·BA space, and the
mean KL(retrain ‖ adapter) of next-token distributions on the forget and test samples. Privacy
(`privacy.py`): membership-inference AUC of the forget set against the test set as non-members, leakage
against retrain, and extraction of the forget set's answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Record, load_records, load_request
from .errors import InputError
from .fileio import atomic_dir, check_output_dir, sha256_file, write_json
from .metrics import cosine, exact_match, relative_distance, roc_auc, rouge
from .modeling import (DTYPE_CHOICES, adapter_weights_path, check_adapter, check_base, check_device, check_dtype, fused_attention,
                       load_adapter, load_base, merged_adapter, read_adapter_file, resolve_device, resolve_dtype,
                       unload_adapter)
from . import privacy
from .objective import CausalLMObjective
from .privacy import token_stats
from .items import inserting
from .render import TEMPLATES, encode, image_of, model_inputs, prompt_tokens, render_text, resolve_template, with_image

YES_NO = ("Yes.", "No.")


# generation settings under which greedy decoding is not the plain argmax of the logits, with their neutral values
_GREEDY_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                   "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "min_length": (None, 0),
                   "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                   "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0),
                   "exponential_decay_length_penalty": (None,), "watermarking_config": (None,)}


def pure_greedy(config) -> bool:
    """Whether greedy decoding under this generation config picks the argmax of the model's logits at every step."""
    return all(getattr(config, k, None) in neutral for k, neutral in _GREEDY_NEUTRAL.items())


class AdapterEval:
    """Metrics for one loaded PEFT model."""

    def __init__(self, model, tok, template, batch_size=8, max_length=512, max_new_tokens=32, generate_batch_size=None):
        self.model, self.tok, self.template = model, tok, template
        self.batch_size, self.max_length, self.max_new_tokens = batch_size, max_length, max_new_tokens
        # a decoding step reads every weight whatever the batch, so wider batches cost little more per step
        self.generate_batch_size = generate_batch_size or 4 * batch_size
        self.objective = CausalLMObjective(model, tok.pad_token_id)
        self.inputs = model_inputs(model)  # item embeddings and vision of prompts with item slots or images, or None

    def _batches(self, records):
        for i in range(0, len(records), self.batch_size):
            yield self.objective.collate([encode(r, self.tok, self.template, self.max_length, **self.inputs)
                                          for r in records[i:i + self.batch_size]], next(self.model.parameters()).device)

    def nll(self, records: list[Record]) -> list[float]:
        return self.scored(records, 0)[0]

    def scored(self, records: list[Record], keep: int, stats: bool = False):
        """(each record's mean response NLL, log p at every response position of the first `keep` records
        ([tokens, vocab], for KL), and with `stats` each record's `privacy.TokenStats`), from one forward pass."""
        nll, lp, per_token, seen = [], [], [], 0
        with torch.no_grad():
            for b in self._batches(records):
                z = self.objective.outputs({}, b)
                nll += self.objective.losses(z, b).tolist()
                if seen < keep:
                    lp.append(torch.log_softmax(z[b["rows"] + seen < keep].float(), -1).cpu())
                if stats:
                    per_token += token_stats(z, b["targets"], b["rows"], b["n"])
                seen += b["n"]
        return nll, (torch.cat(lp) if lp else None), (per_token if stats else None)

    def yes_no(self, records: list[Record], nll: list[float] | None = None) -> dict:
        """Accuracy and AUC of log P(Yes.) − log P(No.), each the summed log-prob of the rendered response.

        `nll` (each record's mean NLL of its own answer, from `self.nll`) saves one of the two
        passes: only the other answer is scored afresh.
        """
        answers = [r.sides()[1].strip() for r in records]
        own = nll if nll is not None else self.nll(records)
        own_logp = [-x * n for x, n in zip(own, self._counts(records))]
        others = [r.replaced(_response_fields(r, "No." if a == "Yes." else "Yes.")) for r, a in zip(records, answers)]
        other_logp = [-x * n for x, n in zip(self.nll(others), self._counts(others))]
        scores = [o - t if a == "Yes." else t - o for a, o, t in zip(answers, own_logp, other_logp)]
        labels = [int(a == "Yes.") for a in answers]
        return {"accuracy": sum((s > 0) == bool(y) for s, y in zip(scores, labels)) / len(labels),
                "auc": roc_auc(scores, labels), "by_sample": {"id": [r.id for r in records], "score": scores, "label": labels}}

    def _counts(self, records):
        return [encode(r, self.tok, self.template, self.max_length, **self.inputs).n_response for r in records]

    def sure_answers(self, records: list[Record], sure_nll: float) -> tuple[list[str | None], list[bool]]:
        """(per record: the text of its own response where greedy decoding certainly starts its answer with it, else
        None; per record: whether the pass could tell, i.e. whether None means "not certain").

        One teacher-forced pass: a response token with −log p(y_t | prompt, y_<t) < sure_nll ≤ ln 2 has p_t > ½, so
        it is the argmax (every other token has less than 1 − p_t); with every token so, greedy decoding emits these
        tokens first. sure_nll below ln 2 leaves a lead over the runner-up as a margin for rounding differences between
        this pass and the cached decoding steps. The pass tells only under plain argmax decoding (`pure_greedy`), for a
        record that is not truncated (generation cuts a long prompt differently) and whose response fits
        max_new_tokens."""
        out: list[str | None] = [None] * len(records)
        if not pure_greedy(self.model.generation_config):
            return out, [False] * len(records)
        xs = [encode(r, self.tok, self.template, self.max_length, **self.inputs) for r in records]
        told = [not x.truncated and x.n_response <= self.max_new_tokens for x in xs]
        fits = sorted((i for i, ok in enumerate(told) if ok), key=lambda i: len(xs[i].input_ids))
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for j in range(0, len(fits), self.batch_size):
                idx = fits[j:j + self.batch_size]
                b = self.objective.collate([xs[i] for i in idx], device)
                worst = self.objective.worst_token_losses(self.objective.outputs({}, b), b)
                for i, w in zip(idx, worst.tolist()):
                    if w < sure_nll:
                        out[i] = self.tok.decode(xs[i].input_ids[xs[i].n_prompt:], skip_special_tokens=True).strip()
        return out, told

    def generate(self, records: list[Record]) -> list[str]:
        """Greedy answers, batched with left padding (positions come from the attention mask).

        Prompts are batched in order of length, so a batch pads little, and answered in input order."""
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id
        heads, slots, images = [], [], []
        vision = self.inputs["vision"]
        for r in records:
            prompt, image = r.sides()[0], image_of(r, vision)  # never an answer without the record's image
            ids, at = prompt_tokens(self.tok, render_text(self.tok, with_image(prompt, r.where) if image else prompt, "",
                                                          self.template)[0], self.template, self.inputs["items"], r.where, vision)
            images.append(image)
            cut = max(0, len(ids) - self.max_length)  # the prompt's end, as training keeps it
            if image and vision.image_token_id in ids[:cut]:
                raise InputError(f"{r.where}: the prompt has {len(ids)} tokens, and cutting it to --max-length "
                                 f"{self.max_length} would cut its image; raise --max-length")
            heads.append(ids[cut:])
            slots.append([(p - cut, item) for p, item in at if p >= cut])
        order = sorted(range(len(heads)), key=lambda i: len(heads[i]))
        outs: list[str] = [""] * len(heads)
        with torch.no_grad():
            for i in range(0, len(order), self.generate_batch_size):
                chunk = order[i:i + self.generate_batch_size]
                width = max(len(heads[j]) for j in chunk)
                ids = torch.tensor([[pad] * (width - len(heads[j])) + heads[j] for j in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(heads[j])) + [1] * len(heads[j]) for j in chunk], device=device)
                # left padding moves each prompt's slots right by its padding
                where = [(k, width - len(heads[j]) + p, item) for k, j in enumerate(chunk) for p, item in slots[j]]
                pixels = [vision.pixels(images[j]) for j in chunk if images[j]]  # the model fills its image tokens in order
                extra = {"pixel_values": torch.stack(pixels).to(device)} if pixels else {}
                with (inserting(self.model, *(torch.tensor(c, device=device) for c in zip(*where)), first_only=True)
                      if where else contextlib.nullcontext()):
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                              do_sample=False, pad_token_id=pad, **extra)
                for j, g in zip(chunk, gen):
                    outs[j] = self.tok.decode(g[width:], skip_special_tokens=True).strip()
        return outs


def _response_fields(record: Record, response: str) -> dict:
    if record.shape == "prompt":
        return {"response": response}
    if record.shape == "alpaca":
        return {"output": response}
    return {"messages": record.fields["messages"][:-1] + [{"role": "assistant", "content": response}]}


def is_yes_no(records: list[Record]) -> bool:
    """Scored as Yes./No. classification (accuracy, AUC) rather than by generation."""
    return all(r.sides()[1].strip() in YES_NO for r in records)


def split_metrics(ev: AdapterEval, records: list[Record], samples: int = 10, nll: list[float] | None = None,
                  generated: list[str] | None = None) -> dict:
    """Metrics of one split; `nll` and `generated`, when given, are the split's, computed by the caller."""
    if not records:
        return {}
    nll = nll if nll is not None else ev.nll(records)
    out = {"n": len(records), "nll": sum(nll) / len(nll)}
    responses = [r.sides()[1].strip() for r in records]
    if is_yes_no(records):
        out.update(ev.yes_no(records, nll))
    else:
        gen = generated if generated is not None else ev.generate(records)
        scores = [rouge(a, b) for a, b in zip(responses, gen)]
        each = {k: [x[k] for x in scores] for k in ("rouge1", "rouge2", "rougeL")}
        out.update({k: sum(v) / len(v) for k, v in each.items()})
        out["exact_match"] = sum(exact_match(a, b) for a, b in zip(responses, gen)) / len(gen)
        # per record, in split order: two adapters' scores pair up by id (paired intervals on small test sets)
        out["by_sample"] = {"id": [r.id for r in records], **each}
        out["samples"] = [{"id": r.id, "prompt": r.sides()[0][-1]["content"], "reference": a, "generated": b}
                          for r, a, b in zip(records[:samples], responses, gen)]
    return out


def merged_inner(wa: dict, wb: dict, wo: dict, scale: float) -> float:
    """⟨ΔW_a, ΔW_b⟩ summed over LoRA modules, ΔW_x = scale·(B_x A_x − B_o A_o), without forming a d×d matrix.

    ΔW_x = U_x V_x with U_x = [B_x, −B_o] and V_x = [A_x; A_o] (rank 2r), and
    ⟨U_a V_a, U_b V_b⟩ = tr(U_aᵀU_b · V_b V_aᵀ): products of r-sized matrices. Forming the merged
    matrices instead means ~120M float64 entries per adapter with LoRA on all of SmolLM2's linear layers."""
    total = 0.0
    for key in sorted(k for k in wo if k.endswith("lora_A.weight")):
        kb = key.replace("lora_A", "lora_B")
        ua = torch.cat([wa[kb].double(), -wo[kb].double()], 1)
        ub = torch.cat([wb[kb].double(), -wo[kb].double()], 1)
        va = torch.cat([wa[key].double(), wo[key].double()], 0)
        vb = torch.cat([wb[key].double(), wo[key].double()], 0)
        total += float(((ua.T @ ub) * (va @ vb.T)).sum())
    return scale * scale * total


def _flat(weights: dict) -> torch.Tensor:
    return torch.cat([weights[k].double().reshape(-1) for k in sorted(weights)])


def _cost(adapter_dir: Path) -> dict:
    for name in ("unlearn.json", "baseline.json", "train.json"):
        p = adapter_dir / name
        if p.is_file():
            try:
                meta = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                raise InputError(f"{p}: not a valid JSON object; repair it or move it out of the adapter folder")
            secs = meta.get("seconds")
            if isinstance(secs, dict):
                secs = sum(v for k, v in secs.items() if k != "load")
            return {"seconds": secs, "peak_mb": meta.get("peak_memory_mb"), "source": name}
    return {"seconds": None, "peak_mb": None, "source": None}


def parse_named(specs: list[str]) -> dict[str, Path]:
    named = {}
    for s in specs:
        if "=" not in s:
            raise InputError(f"--adapter {s}: give NAME=FOLDER, e.g. --adapter original=runs/original")
        name, folder = s.split("=", 1)
        if name in named:
            raise InputError(f"--adapter {name}: the name is given twice")
        check_name(name)
        adapter_weights_path(folder)
        named[name] = Path(folder)
    return named


def check_name(name: str) -> str:
    """An adapter name becomes part of file names (the plots, the evaluation cache): letters, digits, . _ + -."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", name):
        raise InputError(f"--adapter {name!r}=...: a name may hold only letters, digits and . _ + - (starting with a "
                         "letter or digit, at most 64 characters), because it names files; e.g. --adapter llmeraser=runs/x")
    return name


def retain_sample(records: list[Record], k: int) -> list[Record]:
    """k retained records, in data order, chosen by a hash of their ids.

    Not a seeded permutation: `unlearn` takes its curvature sample as the first records of a seeded
    permutation of the same kept records (seed 0 by default), so a permutation here with that seed
    would score the records the curvature was fitted on (docs/design.md#retain-sample).
    """
    chosen = set(sorted(range(len(records)), key=lambda i: hashlib.sha256(records[i].id.encode()).hexdigest())[:k])
    return [r for i, r in enumerate(records) if i in chosen]


@dataclass
class EvaluateSettings:
    original: str = field(default="original", metadata={"help": "name of the original adapter, for parameter changes"})
    max_new_tokens: int = field(default=32, metadata={"help": "greedy generation length for non-Yes/No responses"})
    kl_samples: int = field(default=32, metadata={"help": "samples per split for the KL to retrain"})
    retain_samples: int = field(default=0, metadata={"help": "evaluate a seeded sample of this many retained records (0: all); "
                                                              "every adapter sees the same sample"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass"})
    max_length: int = field(default=512, metadata={"help": "tokens per sample"})
    template: str = field(default="auto", metadata={"help": "prompt rendering", "choices": TEMPLATES})
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"})
    dtype: str = field(default="auto", metadata={"help": "the base model's dtype (auto: bfloat16 on CUDA, float32 on CPU/MPS)",
                                                 "choices": DTYPE_CHOICES})
    keep_samples: int = 10  # generated answers kept per split in the report (not a flag)

    def __post_init__(self):
        check_device(self.device)
        check_dtype(self.dtype)
        if self.template not in TEMPLATES:
            raise InputError(f"--template must be one of {list(TEMPLATES)}")
        for name, least in (("max_new_tokens", 1), ("batch_size", 1), ("kl_samples", 0), ("retain_samples", 0),
                            ("max_length", 2), ("keep_samples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: give an integer >= {least}")


def evaluate(base: str, adapters: dict[str, Path], data, request, out, settings: EvaluateSettings | None = None,
             test=None, overwrite: bool = False, progress: bool = True, model_and_tokenizer=None, cache_dir=None) -> dict:
    """Evaluate named adapters on the forget, forget_new, retain and test splits; write report.json, report.md, plots.

    `cache_dir`: a folder of each adapter's last metrics, keyed by everything they depend on (the adapter's
    weights, data, request, test set, the base by its name, these settings and, for the KL, retrain's weights); an adapter
    whose key matches is not evaluated again (the demo's rerun re-evaluates only adapters whose weights changed)."""
    st = settings or EvaluateSettings()
    original, max_new_tokens, kl_samples, batch_size = st.original, st.max_new_tokens, st.kl_samples, st.batch_size
    max_length, template, retain_samples, keep_samples = st.max_length, st.template, st.retain_samples, st.keep_samples
    if not adapters:
        raise InputError("give at least one --adapter NAME=FOLDER to evaluate")
    inputs = tuple(adapters.values()) + (data, request, test, base)
    out = check_output_dir(out, overwrite, inputs=inputs)
    for name, folder in adapters.items():
        check_name(name)
        check_adapter(folder)
    device = resolve_device(st.device)
    if model_and_tokenizer is None:
        check_base(base)
    records = load_records(data)
    req = load_request(request, records)
    edited = {e.index for e in req.edits}
    splits = {"forget": [e.old for e in req.edits], "forget_new": [e.new for e in req.edits if e.new is not None],
              "retain": [r for i, r in enumerate(records) if i not in edited], "test": load_records(test) if test else []}
    if retain_samples and len(splits["retain"]) > retain_samples:
        splits["retain"] = retain_sample(splits["retain"], retain_samples)
    base_model, tok = model_and_tokenizer or load_base(base, device, resolve_dtype(st.dtype, device))
    tpl = resolve_template(tok, template)
    # records per split whose next-token distributions are compared with retrain's (KL)
    kl_keep = {s: min(kl_samples, len(recs)) if "retrain" in adapters and s in ("forget", "test") else 0
               for s, recs in splits.items()}
    order = sorted(adapters, key=lambda n: n != "retrain")  # retrain first: the others' KL needs it
    methods, reference = {}, {}
    keys = _cache_keys(adapters, (data, request, test), dict(base=base, max_new_tokens=max_new_tokens, kl_samples=kl_samples,
                       batch_size=batch_size, max_length=max_length, template=tpl, retain_samples=retain_samples,
                       retain_sampling="id-sha256", keep_samples=keep_samples, by_sample=1, privacy=1, rouge="rouge-score-stemmed")) if cache_dir else {}
    cached = {name: _cached(cache_dir, name, keys[name]) for name in keys}
    if cached.get("retrain") is not None and any(cached[n] is None for n in adapters) and any(kl_keep.values()):
        # the others' KL needs retrain's next-token log-probs on the forget and test samples: one forward pass
        model = load_adapter(base_model, adapters["retrain"])
        try:
            with fused_attention(model), merged_adapter(model):
                ev = AdapterEval(model, tok, tpl, batch_size, max_length, max_new_tokens)
                reference = {s: ev.scored(splits[s], k)[1] for s, k in kl_keep.items() if k}
        finally:
            unload_adapter(model)
    for name in tqdm(order, desc="evaluate", disable=not progress):
        if cached.get(name) is not None:  # the adapter's own cost is read again: a rerun may have made it anew
            methods[name] = {**cached[name], **_cost(adapters[name]), "cached": True}
            continue
        t0 = time.perf_counter()
        model = load_adapter(base_model, adapters[name])
        try:
            with fused_attention(model), merged_adapter(model):  # nothing here is differentiated
                ev = AdapterEval(model, tok, tpl, batch_size, max_length, max_new_tokens)
                # one forward per split gives its NLLs and the log-probs KL needs; one generation pass
                # answers every split (fewer, fuller batches than one pass per split)
                # token statistics for the privacy figures: the forget records and the non-members (test)
                scored = {s: ev.scored(recs, kl_keep[s], stats=s in ("forget", "test")) for s, recs in splits.items() if recs}
                to_generate = [s for s, recs in splits.items() if recs and not is_yes_no(recs)]
                answers = ev.generate([r for s in to_generate for r in splits[s]])
                generated, at = {}, 0
                for s in to_generate:
                    generated[s], at = answers[at:at + len(splits[s])], at + len(splits[s])
                res = {s: split_metrics(ev, splits[s], keep_samples, scored[s][0], generated.get(s)) for s in scored}
                if splits["forget"]:
                    res["privacy"] = privacy.summary(
                        [r.sides()[1].strip() for r in splits["forget"]], scored["forget"][2], generated.get("forget"),
                        [r.sides()[1].strip() for r in splits["test"]], scored["test"][2] if splits["test"] else None)
                if "retrain" in adapters:
                    kl = {}
                    for split in ("forget", "test"):
                        if not kl_keep[split]:
                            continue
                        lp = scored[split][1]
                        if name == "retrain":
                            reference[split] = lp
                        kl[f"kl_{split}"] = float((reference[split].exp() * (reference[split] - lp)).sum(-1).mean())
                    res["vs_retrain"] = kl
        finally:
            unload_adapter(model)
        res.update(_cost(adapters[name]))
        res["eval_seconds"] = time.perf_counter() - t0
        methods[name] = res
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            # write_json renames a whole file into place: a reader never sees half an entry
            write_json(Path(cache_dir) / f"{name}.json", {"key": keys[name], "result": res})
    if "retrain" in adapters and original in adapters:
        _parameter_space(adapters, original, methods)
    retrain_auc = methods.get("retrain", {}).get("privacy", {}).get("auc")
    for m in methods.values():  # after every adapter: cached results hold AUCs, leakage is always fresh
        if retrain_auc and "auc" in m.get("privacy", {}):
            m["privacy"]["leakage"] = privacy.leakage(m["privacy"]["auc"], retrain_auc)
    report = {"methods": {n: methods[n] for n in adapters}, "splits": {k: len(v) for k, v in splits.items()},
              "request_sha256": req.sha256, "original": original, "template": tpl}
    with atomic_dir(out, overwrite, inputs) as tmp:
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown_table(report))
        from .plots import plot_report

        plot_report(report, adapters, tmp)
    return report


def _cache_keys(adapters: dict, files: tuple, settings: dict) -> dict[str, str]:
    """Per adapter, a SHA-256 of all its metrics depend on (KL: also retrain's weights)."""
    from . import __version__

    common = {"files": [sha256_file(f) if f else None for f in files], "settings": settings, "version": __version__}
    weights = {n: sha256_file(adapter_weights_path(a)) + sha256_file(Path(a) / "adapter_config.json") for n, a in adapters.items()}
    ref = weights.get("retrain")
    return {n: hashlib.sha256(json.dumps({**common, "weights": w, "retrain": ref}, sort_keys=True).encode()).hexdigest()
            for n, w in weights.items()}


def _cached(cache_dir, name: str, key: str) -> dict | None:
    p = Path(cache_dir) / f"{name}.json"
    try:
        saved = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("result") if isinstance(saved, dict) and saved.get("key") == key else None


def _parameter_space(adapters, original, methods):
    cfg = json.loads((adapters[original] / "adapter_config.json").read_text())
    load = {n: read_adapter_file(adapter_weights_path(d)) for n, d in adapters.items()}
    if any(set(w) != set(load[original]) for w in load.values()):
        return  # different architectures: parameter-space comparison is meaningless
    d_param = {n: _flat(w) - _flat(load[original]) for n, w in load.items()}
    scale = cfg.get("lora_alpha", 8) / cfg.get("r", 8)
    same = {n: all(torch.equal(w[k], load[original][k]) for k in w) for n, w in load.items()}
    # an adapter equal to the original has ΔW = 0 exactly (the Gram form would leave rounding there)
    gram = (lambda a, b: 0.0 if same[a] or same[b] else merged_inner(load[a], load[b], load[original], scale))
    g_ref = gram("retrain", "retrain")
    for n in adapters:
        g_nn, g_nr = gram(n, n), gram(n, "retrain")
        methods[n].setdefault("vs_retrain", {}).update({
            "cosine_param": cosine(d_param[n], d_param["retrain"]),
            "rel_dist_param": relative_distance(d_param[n], d_param["retrain"]),
            "cosine_merged": _cosine_from_gram(g_nn, g_ref, g_nr),
            "rel_dist_merged": 0.0 if n == "retrain" else _distance_from_gram(g_nn, g_ref, g_nr),
        })


def _cosine_from_gram(g_aa: float, g_bb: float, g_ab: float) -> float:
    """`metrics.cosine` from inner products (same conventions at zero)."""
    if g_aa <= 0 or g_bb <= 0:
        return float("nan") if (g_aa <= 0) != (g_bb <= 0) else 1.0
    return g_ab / math.sqrt(g_aa * g_bb)


def _distance_from_gram(g_aa: float, g_bb: float, g_ab: float) -> float:
    """`metrics.relative_distance(a, b)` from inner products."""
    d = math.sqrt(max(g_aa - 2 * g_ab + g_bb, 0.0))
    return d / math.sqrt(g_bb) if g_bb > 0 else (0.0 if d == 0 else float("inf"))


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown_table(report: dict) -> str:
    cols = []
    first = next(iter(report["methods"].values()))
    for split in ("forget", "forget_new", "retain", "test"):
        if split in first:
            for k in ("nll", "accuracy", "auc", "rougeL", "exact_match"):
                if k in first[split]:
                    cols.append((split, k))
    vs = sorted({k for m in report["methods"].values() for k in m.get("vs_retrain", {})})
    lines = ["| method | " + " | ".join(f"{s} {k}" for s, k in cols) + "".join(f" | {k}" for k in vs) + " | seconds | peak MB |",
             "| --- " * (len(cols) + len(vs) + 3) + "|"]
    for name, m in report["methods"].items():
        row = [_fmt(m.get(s, {}).get(k)) for s, k in cols] + [_fmt(m.get("vs_retrain", {}).get(k)) for k in vs]
        lines.append(f"| {name} | " + " | ".join(row + [_fmt(m.get("seconds")), _fmt(m.get("peak_mb"))]) + " |")
    return "\n".join(lines) + "\n" + privacy_table(report)


def privacy_table(report: dict) -> str:
    """Membership inference (forget vs the test set's non-members) and extraction, one row per adapter."""
    methods = {n: m.get("privacy", {}) for n, m in report["methods"].items()}
    cols = []
    if any("auc" in p for p in methods.values()):
        cols += [("auc", a) for a in privacy.ATTACKS]
    if any("leakage" in p for p in methods.values()):
        cols += [("leakage", a) for a in privacy.ATTACKS]
    extraction = [k for k in ("exact_memorisation", "longest_run_chars") if any(k in p for p in methods.values())]
    if not cols and not extraction:
        return ""
    title = ("\n**Privacy**: membership-inference AUC of the forget set against the test set (0.5: indistinguishable "
             "from unseen data) and leakage (AUC − AUC_retrain) / AUC_retrain; extraction on the forget set.\n\n")
    head = [f"MIA AUC {a}" if kind == "auc" else f"leakage {a}" for kind, a in cols] + [k.replace("_", " ") for k in extraction]
    lines = ["| method | " + " | ".join(head) + " |", "| --- " * (len(head) + 1) + "|"]
    for name, p in methods.items():
        row = [_fmt(p.get(kind, {}).get(a)) for kind, a in cols] + [_fmt(p.get(k)) for k in extraction]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return title + "\n".join(lines) + "\n"
