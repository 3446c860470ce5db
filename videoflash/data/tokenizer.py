"""A small ChatML tokenizer for tests and the quickstart (no download, deterministic).

:func:`build_chatml_tokenizer` trains a byte-level BPE with the ``tokenizers`` library on a built-in
text that covers the synthetic corpus (``data_tools.synth_videos``), the time message and some plain
English, then wraps it as a ``transformers.PreTrainedTokenizerFast`` that behaves like Qwen2's:

- special tokens ``<|endoftext|>`` (id 0, also the pad token), ``<|im_start|>``, ``<|im_end|>`` (the
  eos token, as in Qwen2-Instruct) and the visual placeholder ``<image>`` (an added special token);
- Qwen2's pre-tokenization (digits one by one, words with their leading space) and byte-level
  fallback, so any text encodes and decodes losslessly;
- a Qwen2-style ChatML ``chat_template`` whose default system prompt is "You are a helpful assistant.".

A real Qwen2 tokenizer works everywhere this one does; the data room only needs a chat template, a pad
token and the ``<image>`` special token (:func:`ensure_image_token` adds it when missing).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "IMAGE_TOKEN",
    "CHATML_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "SPECIAL_TOKENS",
    "build_chatml_tokenizer",
    "ensure_image_token",
    "builtin_corpus",
]

IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]

#: Qwen2-Instruct style ChatML: a default system turn when the conversation has none, then every turn
#: as ``<|im_start|>{role}\n{content}<|im_end|>\n``; the generation prompt opens an assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Qwen2's pre-tokenizer pattern: contractions, letters with one leading non-letter, single digits,
#: punctuation runs, newlines, spaces.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = """
red green blue yellow white black orange purple pink gray brown cyan magenta
square circle triangle star cross diamond shape shapes object objects dot ball box
left right up down top bottom center middle beginning end start
one two three four five six seven eight nine ten zero
none once twice times time
flash flashes flashed flashing blink blinks appear appears appeared appearing move moves moved moving
color colour colors which what where when how many much is are was were the a an of in on at to from
it its this that these those and or but with without for by during after before
video videos clip clips frame frames image images picture scene second seconds minute minutes
lasts uniformly sampled question answer answers word choose one from options option
Answer with a single word . , ? ! : ; ' " ( ) - _ / %
You are a helpful assistant . Describe the video in detail . Describe the image .
There is There are shown shows showing see seen look looks
briefly brief colored coloured background foreground small large big tiny
The shape moves to the left . The shape moves to the right . The shape moves up . The shape moves down .
What color is the shape ? What shape is shown ? Which direction does the shape move ?
How many times does the shape flash ? A colored shape appeared briefly in the video . What color was it ?
When did the colored shape appear : beginning , middle , or end ?
The video lasts for 12.00 seconds , and 64 frames are uniformly sampled from it .
The video lasts for 4.00 seconds , and 8 frames are uniformly sampled from it .
0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 128 256 512 0.5 1.5 2.25 3.75
yes no true false correct wrong hello world please thank thanks
system user assistant system user assistant system user assistant
"""

#: The answer words as an assistant reply starts them, at the start of a line (no leading space):
#: each one line of its own, so that it is one token as in Qwen2's vocabulary (and not ``t w o``).
_REPLY_WORDS = """
red green blue yellow square circle triangle left right up down one two three beginning middle end
yes no
"""


def builtin_corpus() -> str:
    """The deterministic training text of the small tokenizer."""
    lines = [line.strip() for line in _WORDS.strip().splitlines() if line.strip()]
    # Repeat common phrases so their merges win; sentences in both cases.
    lines += _REPLY_WORDS.split()
    text = "\n".join(lines)
    return "\n".join([text, text.lower(), text.capitalize()] * 4)


def build_chatml_tokenizer(
    vocab_size: int = 768,
    extra_text: str | None = None,
    model_max_length: int = 32768,
):
    """Train the small byte-level BPE tokenizer and return a ``PreTrainedTokenizerFast``.

    Args:
        vocab_size: target vocabulary size, special tokens included (256 byte symbols + merges + 4).
        extra_text: more training text (e.g. a corpus's own questions); same input, same tokenizer.
        model_max_length: recorded on the tokenizer.

    The result round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = builtin_corpus() + ("\n" + extra_text if extra_text else "")
    tok.train_from_iterator(text.splitlines(), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", IMAGE_TOKEN],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def ensure_image_token(tokenizer) -> int:
    """Add ``<image>`` as a special token when the tokenizer lacks it; return its id.

    A model whose embedding table is smaller than the new vocabulary must be resized by the caller.
    """
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
        tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return int(tid)
