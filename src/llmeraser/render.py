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
from .items import SLOT, ItemEmbeddings, item_slots, tokens_with_slots
from .vision import IMAGE_MARK, Vision, vision_of

TEMPLATES = ("auto", "chat", "plain")


@dataclass(frozen=True)
class Example:
    """A tokenised sample: ``input_ids = prompt + response``; loss on the response only. `slots`: (position,
    item-table row) of each item slot in the prompt (items.py), whose input embedding is the projected item."""

    input_ids: tuple[int, ...]
    n_prompt: int
    truncated: bool = False
    slots: tuple[tuple[int, int], ...] = ()
    image: str | None = None  # the record's image (vision.py): its tokens are in the prompt, its pixels batched

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
        from jinja2 import TemplateError  # transformers' chat templates are jinja2; their raise_exception raises it

        try:
            head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        except TemplateError as e:
            roles = ", ".join(m["role"] for m in prompt)
            raise InputError(f"the tokenizer's chat template refused a prompt with the roles {roles} ({e}); fix the "
                             "record's roles (most templates want user and assistant turns in turn) or use "
                             "--template plain") from None
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


def model_inputs(model) -> dict:
    """What rendering needs from a model beyond its tokenizer: {"items": its item embeddings, "vision": its
    Vision}, each None when the model has none."""
    return {"items": item_slots(model), "vision": vision_of(model)}


def with_image(prompt: list[dict], where: str) -> list[dict]:
    """The prompt turns with the image mark at the start of the first user turn."""
    for m in prompt:
        if IMAGE_MARK in m["content"]:
            raise InputError(f"{where}: the text holds {IMAGE_MARK}, which marks where an image goes; remove it")
    at = next((i for i, m in enumerate(prompt) if m["role"] == "user"), 0)
    return [{**m, "content": f"{IMAGE_MARK}\n{m['content']}"} if i == at else m for i, m in enumerate(prompt)]


def prompt_tokens(tokenizer, head: str, template: str, items: ItemEmbeddings | None = None,
                  where: str = "a record", vision: Vision | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """The prompt's token ids and its item slots ((position, table row); items.tokens_with_slots); an image mark
    becomes the model's image tokens. With the plain template, a tokenizer that starts every text with its BOS
    token (Gemma's, Llama 2's) gets it here too: such base models were trained with it first, and answer poorly
    without it. A chat template writes its own BOS."""
    if IMAGE_MARK in head and vision is None:
        raise InputError(f"{where}: the text holds {IMAGE_MARK}, which marks where an image goes; remove it")
    ids, slots = [], []
    for k, piece in enumerate(head.split(IMAGE_MARK)):
        if k:
            ids += [vision.image_token_id] * vision.tokens_per_image
        more, at = tokens_with_slots(tokenizer, piece, items, where) if piece else ([], [])
        slots += [(p + len(ids), item) for p, item in at]
        ids += more
    if vision is not None and ids.count(vision.image_token_id) != vision.tokens_per_image * head.count(IMAGE_MARK):
        raise InputError(f"{where}: the text holds the model's image token ({tokenizer.convert_ids_to_tokens(vision.image_token_id)}); "
                         "give images with the record's 'image' field and remove the token from the text")
    if template == "plain" and _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, slots = [tokenizer.bos_token_id] + ids, [(at + 1, item) for at, item in slots]
    return ids, slots


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    first = tokenizer("a")["input_ids"]
    return bool(first) and first[0] == bos


def image_of(record: Record, vision: Vision | None) -> str | None:
    """The record's image path (None without one); an InputError when the base model cannot read images."""
    image = record.image()
    if image is not None and vision is None:
        raise InputError(f"{record.where}: the record has an image, but the base model reads text only; give a "
                         "vision-language --base (e.g. a LLaVA folder)")
    return image


def encode(record: Record, tokenizer, template: str, max_length: int, items: ItemEmbeddings | None = None,
           vision: Vision | None = None) -> Example:
    """`record` as token ids; `items` and `vision` (`model_inputs`): what prompts with item slots or an image need."""
    prompt, response = record.sides()
    image = image_of(record, vision)
    if image is not None:
        prompt = with_image(prompt, record.where)
    head, tail = render_text(tokenizer, prompt, response, template)
    if image is not None and head.count(IMAGE_MARK) == 0 and IMAGE_MARK not in tail:
        raise InputError(f"{record.where}: the chat template dropped the image's place from the prompt (it renders "
                         "string content only as it likes); use --template plain")
    if head.count(IMAGE_MARK) != (image is not None) or IMAGE_MARK in tail:
        raise InputError(f"{record.where}: the text holds {IMAGE_MARK}, which marks where an image goes; remove it")
    if SLOT.search(tail):
        raise InputError(f"{record.where}: the response holds an item slot ([[item:...]]); slots belong in the prompt")
    p, slots = prompt_tokens(tokenizer, head, template, items, record.where, vision)
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
        if image is not None and vision.image_token_id in p[:cut]:
            raise InputError(f"{record.where}: {len(p) + len(r)} tokens, and cutting the prompt to --max-length "
                             f"{max_length} would cut its image; raise --max-length")
        p, slots = p[cut:], [(at - cut, item) for at, item in slots if at >= cut]
    return Example(tuple(p) + tuple(r), len(p), truncated, tuple(slots), image)
