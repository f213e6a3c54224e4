"""Turning a record into token ids: the one place where a sample's text is made.

The old and new versions of an edited sample go through the same function, so the only
difference between their gradients is the edit itself.

Templates:
* ``chat``: the tokenizer's chat template. The prompt is the template applied to the prompt
  turns with the generation prompt; the response is the rest of the template applied to the
  whole conversation (so it ends with the template's end-of-turn token).
* ``plain``: ``"### User:\\n{content}\\n\\n"`` for each prompt turn (role capitalised), then
  ``"### Assistant:\\n"``; the response is the text followed by the tokenizer's EOS token. A tokenizer
  that starts every text with BOS (a base model's, e.g. Gemma's) gets BOS before the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import Record
from .errors import InputError
from .items import SLOT, ItemEmbeddings, tokens_with_slots

TEMPLATES = ("auto", "chat", "plain")


@dataclass(frozen=True)
class Example:
    """A tokenised sample: ``input_ids = prompt + response``; loss on the response only. `slots`: (position,
    item-table row) of each item slot in the prompt (items.py), whose input embedding is the projected item."""

    input_ids: tuple[int, ...]
    n_prompt: int
    truncated: bool = False
    slots: tuple[tuple[int, int], ...] = ()

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def resolve_template(tokenizer, template: str) -> str:
    if template not in TEMPLATES:
        raise InputError(f"--template must be one of {TEMPLATES}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise InputError("--template chat: this tokenizer has no chat template; use --template plain")
    return template


def render_text(tokenizer, prompt: list[dict], response: str, template: str) -> tuple[str, str]:
    if template == "chat":
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise InputError(
                "the tokenizer's chat template does not render the prompt as a prefix of the full conversation; "
                "use --template plain"
            )
        return head, full[len(head):]
    head = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in prompt) + "### Assistant:\n"
    return head, response + (tokenizer.eos_token or "")


def prompt_ids(tokenizer, head: str, template: str) -> list[int]:
    """The prompt's token ids (a prompt without item slots)."""
    return prompt_tokens(tokenizer, head, template)[0]


def prompt_tokens(tokenizer, head: str, template: str, items: ItemEmbeddings | None = None,
                  where: str = "a record") -> tuple[list[int], list[tuple[int, int]]]:
    """The prompt's token ids and its item slots ((position, table row); items.tokens_with_slots). With the plain
    template, a tokenizer that starts every text with its BOS token (Gemma's, Llama 2's) gets it here too: such
    base models were trained with it first, and answer poorly without it. A chat template writes its own BOS."""
    ids, slots = tokens_with_slots(tokenizer, head, items, where)
    if template == "plain" and _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, slots = [tokenizer.bos_token_id] + ids, [(at + 1, item) for at, item in slots]
    return ids, slots


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    first = tokenizer("a")["input_ids"]
    return bool(first) and first[0] == bos


def encode(record: Record, tokenizer, template: str, max_length: int, items: ItemEmbeddings | None = None) -> Example:
    """`record` as token ids; `items`: the model's item embeddings, which a prompt with item slots needs."""
    prompt, response = record.sides()
    head, tail = render_text(tokenizer, prompt, response, template)
    if SLOT.search(tail):
        raise InputError(f"{record.where}: the response holds an item slot ([[item:...]]); slots belong in the prompt")
    p, slots = prompt_tokens(tokenizer, head, template, items, record.where)
    r = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if not r:
        raise InputError(f"{record.where}: the response renders to no tokens; give a non-empty response")
    if not p:
        raise InputError(f"{record.where}: the prompt renders to no tokens; give a non-empty prompt")
    truncated = len(p) + len(r) > max_length
    if truncated:
        # keep the start of the response and the end of the prompt (the part next to it)
        r = r[: max(1, max_length - 1)]
        cut = len(p) - (max_length - len(r))
        p, slots = p[cut:], [(at - cut, item) for at, item in slots if at >= cut]
    return Example(tuple(p) + tuple(r), len(p), truncated, tuple(slots))
