"""Training records and edit requests: loading, validation and applying edits.

A record is one training sample in one of three shapes:

* ``{"prompt": str, "response": str}``, with an optional ``"system": str`` (the system turn; without
  it the chat template's default system prompt, if any, is used)
* ``{"instruction": str, "input": str (optional), "output": str}``   (Alpaca / TALLRec)
* ``{"messages": [{"role", "content"}, ...]}``  (chat; the last turn must be the assistant's
  and is the response, every earlier turn is the prompt)

An optional ``"id"`` names the record; without it the id is its 0-based position as a string. An optional
``"image"`` (a path relative to the data file's folder) puts an image before the prompt, for vision-language
bases (vision.py); it is part of the prompt side. Other keys are kept but ignored.

An edit request is JSONL, one edit per line::

    {"op": "remove", "id": "17"}
    {"op": "modify_query", "id": "42", "new": {"input": "..."}}
    {"op": "correct_response", "id": "43", "new": {"output": "No."}}

``new`` replaces fields of the record. ``modify_query`` may change only the prompt side and
``correct_response`` only the response side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

OPS = ("remove", "modify_query", "correct_response")

# shape -> (prompt-side fields, response-side fields)
SHAPES = {
    "prompt": ({"prompt", "system", "image"}, {"response"}),
    "alpaca": ({"instruction", "input", "image"}, {"output"}),
    "chat": ({"messages", "image"}, {"messages"}),
}


@dataclass(frozen=True)
class Record:
    id: str
    fields: dict
    shape: str
    where: str  # "file:line" or "file[index]", for error messages
    root: str = ""  # the data file's folder: relative image paths start there

    def sides(self) -> tuple[list[dict], str]:
        """(prompt as chat messages, response text): the single definition of what a sample says."""
        return sides(self.fields, self.shape, self.where)

    def image(self) -> str | None:
        """The record's image ("image", or a chat turn's image part) as a checked absolute path, or None."""
        part = image_part(self.fields, self.shape, self.where)
        if part is not None and "image" in self.fields:
            raise InputError(f"{self.where}: the record has both an 'image' and an image part; give one image")
        value = self.fields["image"] if "image" in self.fields else part
        if value is None:
            return None
        from .vision import image_path

        return image_path(value, self.root, self.where)

    def replaced(self, new: dict) -> "Record":
        return Record(self.id, {**self.fields, **new}, self.shape, self.where, self.root)


@dataclass(frozen=True)
class Edit:
    op: str
    id: str
    index: int  # position of the record in the training data
    old: Record
    new: Record | None  # None for remove
    line: int
    # substrings of the old record the edited adapter must no longer produce (the request's optional
    # "private"); empty: the verification checks the old response as a whole (verify.py)
    private: tuple[str, ...] = ()


@dataclass
class EditRequest:
    edits: list[Edit]
    path: str
    sha256: str
    raw: list[dict] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {op: sum(e.op == op for e in self.edits) for op in OPS}


def _shape_of(rec: dict, where: str) -> str:
    if "messages" in rec:
        return "chat"
    if "instruction" in rec or "output" in rec:
        if "instruction" not in rec or "output" not in rec:
            raise InputError(f"{where}: an Alpaca-style record needs both 'instruction' and 'output' (and optionally 'input')")
        return "alpaca"
    if "prompt" in rec and "response" in rec:
        return "prompt"
    raise InputError(
        f"{where}: unknown record shape with keys {sorted(rec)}; use {{'prompt','response'}}, "
        "{'instruction','input','output'} or {'messages': [...]}"
    )


def _check_str(value, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def sides(fields: dict, shape: str, where: str) -> tuple[list[dict], str]:
    if shape == "prompt":
        system = [{"role": "system", "content": _check_str(fields["system"], "system", where)}] if "system" in fields else []
        return system + [{"role": "user", "content": _check_str(fields["prompt"], "prompt", where)}], _check_str(
            fields["response"], "response", where
        )
    if shape == "alpaca":
        instruction = _check_str(fields["instruction"], "instruction", where)
        inp = _check_str(fields.get("input", "") or "", "input", where)
        user = instruction if not inp else f"{instruction}\n\n{inp}"
        return [{"role": "user", "content": user}], _check_str(fields["output"], "output", where)
    msgs = fields["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise InputError(f"{where}: 'messages' must be a list with at least a prompt turn and a final assistant turn")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), (str, list)):
            raise InputError(f"{where}: every message needs a string 'role' and a 'content' (a string, or a list of "
                             '{"type": "text", "text": ...} and {"type": "image", "image": PATH} parts)')
    if msgs[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message must have role 'assistant' (it is the response)")
    if not isinstance(msgs[-1]["content"], str):
        raise InputError(f"{where}: the assistant's last turn must be a string (it is the response)")
    return [{"role": m["role"], "content": _text(m["content"], where)} for m in msgs[:-1]], msgs[-1]["content"]


def _text(content, where: str) -> str:
    """A turn's text: the string, or its text parts joined by newlines (image parts are `image_part`'s)."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind != "image":
            raise InputError(f"{where}: a content part must be {{\"type\": \"text\", \"text\": str}} or "
                             f"{{\"type\": \"image\", \"image\": PATH}}, got {part!r}")
    return "\n".join(texts)


def image_part(fields: dict, shape: str, where: str) -> str | None:
    """The image of a chat record's image part (one per record; it goes before the first user turn's text)."""
    if shape != "chat" or not isinstance(fields.get("messages"), list):
        return None
    parts = [p for m in fields["messages"] if isinstance(m, dict) and isinstance(m.get("content"), list)
             for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]
    if len(parts) > 1:
        raise InputError(f"{where}: {len(parts)} image parts; a record holds one image")
    if parts:
        value = parts[0].get("image", parts[0].get("path"))
        if not isinstance(value, str):
            raise InputError(f"{where}: an image part needs \"image\": a path to the image file")
        return value
    return None


def _read_json_rows(path: Path) -> list[tuple[dict, str]]:
    """Rows of a JSON array or JSONL file, each with a 'file:line' (or 'file[i]') locator."""
    from .fileio import loads_json, read_text

    if not path.is_file():
        raise InputError(f"data file {path} {'is a folder; give the data file in it' if path.is_dir() else 'does not exist'}")
    text = read_text(path, "data file")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = loads_json(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file or use JSONL, one record per line") from None
        out = []
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise InputError(f"{path}[{i}]: each element must be a JSON object")
            out.append((r, f"{path}[{i}]"))
        return out
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = loads_json(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: malformed JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(r, dict):
            raise InputError(f"{path}:{lineno}: each line must be a JSON object")
        out.append((r, f"{path}:{lineno}"))
    return out


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    rows = _read_json_rows(path)
    if not rows:
        raise InputError(f"data file {path} has no records")
    return _records(rows, str(path.resolve().parent))


def records_from_rows(rows, source: str = "records", root: str = "") -> list[Record]:
    """Records from any sequence of mappings (a list of dicts, a `datasets.Dataset`), checked as a file's are;
    errors name `source[i]`; relative image paths start at `root` (default: the working directory)."""
    out = []
    for i, r in enumerate(rows):
        if not hasattr(r, "keys"):
            raise InputError(f"{source}[{i}]: each record must be a mapping like {{'prompt': ..., 'response': ...}}")
        out.append((dict(r), f"{source}[{i}]"))
    if not out:
        raise InputError(f"{source}: no records")
    return _records(out, root)


def _records(rows: list[tuple[dict, str]], root: str = "") -> list[Record]:
    records, seen = [], {}
    for i, (r, where) in enumerate(rows):
        rid = r.get("id", str(i))
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise InputError(f"{where}: 'id' must be a string or an integer")
        rid = str(rid)
        if rid in seen:
            raise InputError(f"{where}: duplicate id {rid!r} (first at {seen[rid]}); ids must be unique")
        seen[rid] = where
        rec = Record(rid, r, _shape_of(r, where), where, root)
        rec.sides()  # validates types now, not halfway through a solve
        rec.image()  # and that an image is there and readable, before any model is loaded
        records.append(rec)
    return records


def _check_new(op: str, old: Record, new: dict, where: str) -> Record:
    if not isinstance(new, dict) or not new:
        raise InputError(f"{where}: '{op}' needs a non-empty object 'new' with the replaced fields")
    prompt_fields, response_fields = SHAPES[old.shape]
    allowed = prompt_fields if op == "modify_query" else response_fields
    bad = sorted(set(new) - allowed)
    if bad:
        raise InputError(
            f"{where}: '{op}' may change only {sorted(allowed)} of a {old.shape!r} record, not {bad}; "
            + ("use correct_response for the response side" if op == "modify_query" else "use modify_query for the prompt side")
        )
    rec = old.replaced(new)
    rec.image()
    old_prompt, old_resp = old.sides()
    new_prompt, new_resp = sides(rec.fields, rec.shape, where)
    if op == "modify_query" and new_resp != old_resp:
        raise InputError(f"{where}: modify_query changed the response (the last assistant turn); use correct_response")
    if op == "correct_response" and new_prompt != old_prompt:
        raise InputError(f"{where}: correct_response changed the prompt turns; use modify_query")
    return rec


def _check_private(private, op: str, old: Record, where: str) -> tuple[str, ...]:
    """The edit's "private" parts: non-empty strings of the old record that the edited adapter must no longer
    produce. A removal's or a correction's are parts of the old response (what its prompt asks for); a modified
    query's are parts of the old prompt that its response does not hold (the response must still be given)."""
    if private is None:
        return ()
    if not isinstance(private, list) or not private or not all(isinstance(x, str) and x.strip() for x in private):
        raise InputError(f"{where}: 'private' must be a non-empty list of strings, the parts of the record that must "
                         'no longer be produced, e.g. ["jane@example.com"]')
    prompt, response = old.sides()
    if op == "modify_query":
        query = " ".join(m["content"] for m in prompt)
        bad = next((x for x in private if x not in query or x in response), None)
        if bad is not None:
            raise InputError(f"{where}: 'private' {bad!r} must occur in the old prompt of record {old.id!r} and not in its "
                             "response (a modified query's answer is still given); give the private part of the query")
    else:
        bad = next((x for x in private if x not in response), None)
        if bad is not None:
            raise InputError(f"{where}: 'private' {bad!r} does not occur in the response of record {old.id!r}; give "
                             "substrings of the answer that must no longer be produced, exactly as written")
    return tuple(private)


def load_request(path: str | Path, records: list[Record]) -> EditRequest:
    from .fileio import loads_json, read_text, sha256_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"request file {path} {'is a folder; give the request file in it' if path.is_dir() else 'does not exist'}")
    rows = []
    for lineno, line in enumerate(read_text(path, "request file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rows.append((loads_json(line), where, lineno))
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: malformed JSON ({err.msg}); each line must be one JSON object") from None
    return _request(rows, records, str(path), sha256_file(path))


def request_from_rows(rows, records: list[Record], source: str = "request") -> EditRequest:
    """An edit request from a sequence of mappings ({op, id, new}), checked as a file's is. Its sha256 is
    that of the rows as JSONL, so it equals the file's when the file holds the same lines."""
    import hashlib

    rows = [dict(r) if hasattr(r, "keys") else r for r in rows]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    return _request([(r, f"{source}[{i}]", i + 1) for i, r in enumerate(rows)], records, source,
                    hashlib.sha256(text.encode("utf-8")).hexdigest())


def _request(rows: list[tuple], records: list[Record], source: str, sha256: str) -> EditRequest:
    index = {r.id: i for i, r in enumerate(records)}
    edits, raw, seen = [], [], {}
    for e, where, lineno in rows:
        if not isinstance(e, dict):
            raise InputError(f"{where}: each line must be a JSON object like {{\"op\": \"remove\", \"id\": \"17\"}}")
        op = e.get("op")
        if op not in OPS:
            raise InputError(f"{where}: 'op' must be one of {list(OPS)}, got {op!r}")
        unknown = sorted(set(e) - {"op", "id", "new", "private"})
        if unknown:
            raise InputError(f"{where}: unknown keys {unknown}; an edit has only 'op', 'id', 'new' and 'private'")
        if "id" not in e or isinstance(e["id"], bool) or not isinstance(e["id"], (str, int)):
            raise InputError(f"{where}: missing or invalid 'id'; give the id of a training record")
        rid = str(e["id"])
        if rid not in index:
            raise InputError(f"{where}: unknown id {rid!r}: no training record has it; check --data and the ids")
        if rid in seen:
            raise InputError(f"{where}: id {rid!r} is already edited at line {seen[rid]}; give one edit per record")
        seen[rid] = lineno
        old = records[index[rid]]
        if op == "remove":
            if "new" in e:
                raise InputError(f"{where}: 'remove' takes no 'new'")
            new = None
        else:
            new = _check_new(op, old, e.get("new"), where)
        edits.append(Edit(op, rid, index[rid], old, new, lineno, _check_private(e.get("private"), op, old, where)))
        raw.append(e)
    if not edits:
        raise InputError(f"request {source} has no edits")
    removed = sum(e.op == "remove" for e in edits)
    if removed == len(records):
        raise InputError(f"{source}: the request removes every training record, which leaves nothing to train on")
    return EditRequest(edits, source, sha256, raw)


def records_jsonl(records: list[Record]) -> str:
    """Records as the JSONL text a user would write for them (their fields, one object a line)."""
    return "".join(json.dumps(r.fields) + "\n" for r in records)


def apply_request(records: list[Record], request: EditRequest) -> list[Record]:
    """The training data after the request: removed records dropped, edited ones replaced, order kept."""
    by_index = {e.index: e for e in request.edits}
    out = []
    for i, r in enumerate(records):
        e = by_index.get(i)
        if e is None:
            out.append(r)
        elif e.new is not None:
            out.append(e.new)
    return out
