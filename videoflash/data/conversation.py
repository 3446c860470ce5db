"""From a LLaVA conversation to token ids and supervised-token labels.

Steps (reference videochat_flash.md sections 3.4, 5.1 and 5.2):

1. :func:`normalize_conversation` maps ``from``/``value`` or ``role``/``content`` turns to chat
   messages (``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``, ``system``) and
   drops a first turn that is not from the human (after an optional system turn), as LLaVA does.
2. :func:`place_placeholder` leaves exactly one ``<image>`` in the sample: at the start of the first
   user turn, followed by ``\\n`` and, for a video, the time message "The video lasts for X seconds,
   and N frames are uniformly sampled from it." and a space, then the rest of the question. Every other
   ``<image>`` of the record is removed (a multi-image record's tiles all replace the one placeholder).
3. :class:`ConversationTokenizer` renders the messages with the tokenizer's chat template (ChatML for
   Qwen2), tokenizes once, and labels the assistant turns: each assistant turn's content and its end
   token (``<|im_end|>`` in ChatML) are supervised; system and user turns, role headers, the
   placeholder and the newline after ``<|im_end|>`` are ``-100``.

   ``label_quirk=True`` reproduces LLaVA-OneVision's ``preprocess_qwen`` instead: the assistant role
   header ``<|im_start|>assistant\\n`` and the trailing newline are supervised too, and every ``\\n``,
   ``<|im_start|>`` and ``<|im_end|>`` token is supervised everywhere, user turns included. Off by
   default. The placeholder is never supervised.

   ``fmt="plain"`` is stage 1's prompt version: ``<image>`` directly followed by the first answer and
   ``\\n``; only the answer and the ``\\n`` are supervised.

The assistant spans are found by rendering growing prefixes of the conversation, so any chat template
that renders a conversation as the concatenation of its turns works, and token boundaries come from
the fast tokenizer's offsets (a token is supervised when it starts inside a supervised span).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import IMAGE_TOKEN

__all__ = [
    "IGNORE_INDEX",
    "normalize_conversation",
    "time_message",
    "place_placeholder",
    "ConversationTokenizer",
    "TokenizedConversation",
]

IGNORE_INDEX = -100

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


def normalize_conversation(conversations) -> list[dict]:
    """LLaVA turns (``from``/``value`` or ``role``/``content``) -> ``[{"role", "content"}]``.

    A leading system turn is kept; a first non-system turn that is not the user's is dropped. Raises
    ``ValueError`` on an unknown role, a non-string value, or a conversation without assistant turns.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("the record has no 'conversations' list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise ValueError(f"a conversation turn must be an object, got {type(turn).__name__}")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = _ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise ValueError(f"unknown conversation role {who!r}")
        if not isinstance(text, str):
            raise ValueError(f"the {who!r} turn has no text value")
        messages.append({"role": role, "content": text})
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    if body and body[0]["role"] != "user":
        body = body[1:]
    messages = head + body
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn to supervise")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("the conversation has no user turn")
    return messages


def time_message(duration: float, num_frames: int) -> str:
    """VideoChat-Flash's "short" time message (stripped)."""
    return f"The video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled from it."


def place_placeholder(messages: list[dict], has_visual: bool, time_msg: str | None = None) -> list[dict]:
    """Return new messages with exactly one ``<image>`` (or none when ``has_visual`` is false).

    The placeholder goes to the start of the first user turn as ``"<image>\\n"``, followed by
    ``time_msg + " "`` when given, then the turn's own text with its ``<image>`` marks removed.
    """
    out = []
    placed = False
    for m in messages:
        text = m["content"]
        if IMAGE_TOKEN in text:
            text = text.replace(IMAGE_TOKEN, "").strip()
        if has_visual and not placed and m["role"] == "user":
            prefix = IMAGE_TOKEN + "\n" + (time_msg.strip() + " " if time_msg else "")
            text = prefix + text
            placed = True
        out.append({"role": m["role"], "content": text})
    return out


@dataclass
class TokenizedConversation:
    """``input_ids`` and ``labels`` (same length; ``-100`` where not supervised)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ConversationTokenizer:
    """Tokenize normalized messages into ids and labels (see the module doc).

    Args:
        tokenizer: a fast Hugging Face tokenizer with a chat template (``fmt="chatml"``) and ``<image>``
            as a special token.
        fmt: ``"chatml"`` (the tokenizer's chat template) or ``"plain"`` (stage 1).
        label_quirk: reproduce LLaVA-OneVision's unmasking of ``\\n``/``<|im_start|>``/``<|im_end|>``.
    """

    def __init__(self, tokenizer, fmt: str = "chatml", label_quirk: bool = False):
        if fmt not in ("chatml", "plain"):
            raise ValueError(f"unknown conversation format {fmt!r}; expected 'chatml' or 'plain'")
        if fmt == "chatml" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; use fmt='plain' or set one")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.label_quirk = bool(label_quirk)
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id is None or image_id == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; call tokenizer.ensure_image_token first")
        self.image_token_id = int(image_id)
        self._quirk_ids = set()
        if self.label_quirk:
            for t in ("<|im_start|>", "<|im_end|>"):
                tid = tokenizer.convert_tokens_to_ids(t)
                if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
                    self._quirk_ids.add(int(tid))
            self._quirk_ids.update(tokenizer.encode("\n", add_special_tokens=False))

    # -- rendering -----------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _chatml_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        text = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i]) if i else ""
            header = self._render(messages[:i], generation_prompt=True) if i else ""
            upto = self._render(messages[: i + 1])
            if not (text.startswith(upto) and upto.startswith(header) and header.startswith(before)):
                raise ValueError("the chat template does not render a conversation as the sum of its turns")
            if self.label_quirk:
                spans.append((len(before), len(upto)))
            else:
                spans.append((len(header), len(upto.rstrip())))
        return text, spans

    def _plain_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        user = next(m for m in messages if m["role"] == "user")
        answer = next(m for m in messages if m["role"] == "assistant")
        prefix = IMAGE_TOKEN if IMAGE_TOKEN in user["content"] else ""
        text = prefix + answer["content"] + "\n"
        return text, [(len(prefix), len(text))]

    # -- public --------------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> str:
        """The full text the model sees (placeholder included)."""
        return self._chatml_spans(messages)[0] if self.fmt == "chatml" else self._plain_spans(messages)[0]

    def __call__(self, messages: list[dict]) -> TokenizedConversation:
        text, spans = self._chatml_spans(messages) if self.fmt == "chatml" else self._plain_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for k, (start, _end) in enumerate(enc["offset_mapping"]):
            if any(s <= start < e for s, e in spans):
                labels[k] = ids[k]
        if self.label_quirk:
            for k, tid in enumerate(ids):
                if tid in self._quirk_ids:
                    labels[k] = tid
        for k, tid in enumerate(ids):
            if tid == self.image_token_id:
                labels[k] = IGNORE_INDEX
        return TokenizedConversation(ids, labels)
