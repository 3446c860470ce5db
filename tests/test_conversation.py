"""Conversations -> ChatML ids and labels, checked by hand; and the small tokenizer."""

import pytest

from tests.data_fixtures import tokenizer  # noqa: F401  (fixture)
from videoflash.data.conversation import (
    IGNORE_INDEX,
    ConversationTokenizer,
    normalize_conversation,
    place_placeholder,
    time_message,
)
from videoflash.data.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, build_chatml_tokenizer, ensure_image_token

MULTI_TURN = [
    {"from": "human", "value": "What color is the shape? <image>"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And its shape?"},
    {"from": "gpt", "value": "a circle"},
]

TIME_MSG = "The video lasts for 4.00 seconds, and 8 frames are uniformly sampled from it."

# the text the model sees, written out by hand (Qwen2 ChatML with the default system prompt)
EXPECTED_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\n" + TIME_MSG + " What color is the shape?<|im_end|>\n"
    "<|im_start|>assistant\nred<|im_end|>\n"
    "<|im_start|>user\nAnd its shape?<|im_end|>\n"
    "<|im_start|>assistant\na circle<|im_end|>\n"
)


def _runs(tok, ids, labels):
    """The supervised tokens as decoded text runs (contiguous supervised stretches)."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def _messages():
    return place_placeholder(normalize_conversation(MULTI_TURN), True, time_message(4.0, 8))


def test_time_message_text():
    assert time_message(4.0, 8) == TIME_MSG
    assert time_message(123.456, 64) == "The video lasts for 123.46 seconds, and 64 frames are uniformly sampled from it."


def test_multi_turn_text_and_labels_by_hand(tokenizer):
    ct = ConversationTokenizer(tokenizer)
    msgs = _messages()
    assert ct.render(msgs) == EXPECTED_TEXT
    out = ct(msgs)
    assert len(out.input_ids) == len(out.labels)
    assert tokenizer.decode(out.input_ids) == EXPECTED_TEXT
    # supervised: each answer and its <|im_end|>, nothing else (not the newline after it)
    assert _runs(tokenizer, out.input_ids, out.labels) == ["red<|im_end|>", "a circle<|im_end|>"]
    # the placeholder is there exactly once and never supervised
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert out.input_ids.count(image_id) == 1
    assert out.labels[out.input_ids.index(image_id)] == IGNORE_INDEX
    # the supervised count equals the tokens of the two answers plus two <|im_end|> (tokenized apart)
    n_red = len(tokenizer("red", add_special_tokens=False)["input_ids"])
    n_circle = len(tokenizer("a circle", add_special_tokens=False)["input_ids"])
    assert out.num_supervised == n_red + n_circle + 2


def test_llava_ov_label_quirk(tokenizer):
    out = ConversationTokenizer(tokenizer, label_quirk=True)(_messages())
    runs = _runs(tokenizer, out.input_ids, out.labels)
    # every <|im_start|>, <|im_end|> and newline is supervised, and so are whole assistant turns with
    # their role header and trailing newline; user/system words and the placeholder are not
    assert runs == [
        "<|im_start|>",
        "\n",
        "<|im_end|>\n<|im_start|>",
        "\n",
        "\n",
        "<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>",
        "\n",
        "<|im_end|>\n<|im_start|>assistant\na circle<|im_end|>\n",
    ]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert out.labels[out.input_ids.index(image_id)] == IGNORE_INDEX


def test_role_content_equals_from_value(tokenizer):
    role_content = [
        {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in MULTI_TURN
    ]
    ct = ConversationTokenizer(tokenizer)
    a = ct(place_placeholder(normalize_conversation(role_content), True, time_message(4.0, 8)))
    b = ct(_messages())
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_first_turn_not_from_human_is_dropped_and_system_kept():
    conv = [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]
    assert normalize_conversation(conv) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    conv = [{"from": "system", "value": "Be brief."}] + conv
    assert normalize_conversation(conv)[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ValueError):
        normalize_conversation([{"from": "human", "value": "no answer"}])
    with pytest.raises(ValueError):
        normalize_conversation([{"from": "alien", "value": "?"}, {"from": "gpt", "value": "x"}])


def test_custom_system_prompt_replaces_default(tokenizer):
    conv = [{"from": "system", "value": "Be brief."}, *MULTI_TURN[:2]]
    msgs = place_placeholder(normalize_conversation(conv), True, None)
    text = ConversationTokenizer(tokenizer).render(msgs)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat color")
    assert "helpful assistant" not in text


def test_placeholder_moved_to_the_front_and_collapsed():
    conv = [
        {"from": "human", "value": "<image>\n<image>\nCompare the two pictures."},
        {"from": "gpt", "value": "same"},
        {"from": "human", "value": "Really? <image>"},
        {"from": "gpt", "value": "yes"},
    ]
    msgs = place_placeholder(normalize_conversation(conv), True, None)
    assert msgs[0]["content"] == "<image>\nCompare the two pictures."
    assert msgs[2]["content"] == "Really?"
    # text-only: every stray <image> is removed, none is added
    msgs = place_placeholder(normalize_conversation(conv), False, None)
    assert all(IMAGE_TOKEN not in m["content"] for m in msgs)


def test_plain_format_stage1(tokenizer):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square"}]
    msgs = place_placeholder(normalize_conversation(conv), True, None)
    out = ConversationTokenizer(tokenizer, fmt="plain")(msgs)
    assert tokenizer.decode(out.input_ids) == "<image>a red square\n"
    assert _runs(tokenizer, out.input_ids, out.labels) == ["a red square\n"]


def test_tokenizer_special_tokens_and_template(tokenizer):
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|im_end|>"
    for t in ("<|im_start|>", "<|im_end|>", IMAGE_TOKEN):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, t  # one special token each
    assert 300 <= len(tokenizer) <= 1000
    assert tokenizer.chat_template == CHATML_TEMPLATE
    text = "The video lasts for 93.75 seconds. Ünïcode & emoji 🙂 survive byte-level BPE."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    gen = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert gen == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_is_deterministic_and_round_trips(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    again = build_chatml_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ct_a, ct_b = ConversationTokenizer(tokenizer), ConversationTokenizer(loaded)
    a, b = ct_a(_messages()), ct_b(_messages())
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.eos_token == "<|im_end|>"


def test_ensure_image_token_adds_it_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "<pad>": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>")
    assert hf.convert_tokens_to_ids(IMAGE_TOKEN) == hf.unk_token_id
    tid = ensure_image_token(hf)
    assert tid == 3 and hf("hello <image>", add_special_tokens=False)["input_ids"] == [1, 3]
    assert ensure_image_token(hf) == 3  # idempotent
