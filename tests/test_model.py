"""The whole VideoFlash model: splicing, losses, gradients, dropout, generation, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_model import IMAGE_TOKEN, random_frames, tiny_config, tiny_model
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration


def _video_batch():
    """Two right-padded samples: 8 frames (2 clips -> 32 tokens) and 4 frames (16 tokens)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 190, (2, 14), generator=g)
    ids[:, 2] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 6:9] = ids[0, 6:9]  # two answer spans in sample 0 (multi-turn)
    labels[0, 11:14] = ids[0, 11:14]
    labels[1, 8:11] = ids[1, 8:11]
    frames = random_frames(12)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values_videos=frames,
                video_frame_counts=torch.tensor([8, 4]))


def test_visual_token_counts_and_loss_match_a_hand_count():
    model = tiny_model().train()
    batch = _video_batch()
    out = model(**batch)
    assert out.logits is None  # training: no [tokens, vocabulary] logits
    # the same forward without labels returns the logits:
    # sample 0: 14 text tokens - 1 placeholder + 32 visual = 45 positions; sample 1 is shorter
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape == (2, 45, 200)
    # the loss is the mean over the 3 + 3 + 3 supervised tokens of a shifted cross-entropy
    terms = []
    for b, spans, shift in ((0, [(6, 9), (11, 14)], 31), (1, [(8, 11)], 15)):
        for lo, hi in spans:
            for t in range(lo, hi):
                pos = t + shift  # placeholder at 2 replaced by 32 (16) tokens: text index t -> t + 31 (15)
                terms.append(torch.log_softmax(logits[b, pos - 1], -1)[batch["input_ids"][b, t]])
    assert len(terms) == 9
    assert out.loss.item() == pytest.approx(-torch.stack(terms).mean().item(), rel=1e-5)


def test_gradient_reaches_encoder_connector_and_llm():
    model = tiny_model().train()
    model(**_video_batch()).loss.backward()
    for name in ("vision_tower.patch_embed.proj.weight", "vision_tower.blocks.0.attn.q_bias",
                 "vision_tower.blocks.1.mlp.fc2.weight", "connector.linear_1.weight", "connector.linear_2.weight",
                 "language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_text_only_batch_still_runs_the_vision_path():
    model = tiny_model().train()
    calls = []
    model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    ids = torch.randint(0, 190, (2, 10))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert sorted(calls) == [1, 4]  # one dummy image tile and one dummy 4-frame clip
    grad = model.vision_tower.patch_embed.proj.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # in the graph, contributing nothing
    assert out.logits is None


def test_placeholder_errors_are_clear():
    model = tiny_model().eval()
    ids = torch.randint(0, 190, (1, 8))
    with pytest.raises(ValueError, match="visual input but no placeholder"):
        model(input_ids=ids, pixel_values_videos=random_frames(4))
    ids[0, 3] = IMAGE_TOKEN
    with pytest.raises(ValueError, match="placeholder token but no visual input"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="multiples? of 4"):
        model(input_ids=ids, pixel_values_videos=random_frames(6))


def test_image_grid_tokens_follow_thumbnail_then_raster_order():
    model = tiny_model()
    per, side = 16, 4  # tokens per tile and tokens per tile side
    gh, gw = 2, 3
    # token (tile t, row r, col c) carries the label 1000*t + 10*r + c
    tokens = torch.tensor([[1000 * t + 10 * r + c] for t in range(1 + gh * gw) for r in range(side) for c in range(side)],
                          dtype=torch.float)
    out = model._layout_image_tokens(tokens, (gh, gw))[:, 0].tolist()
    expected = [10 * r + c for r in range(side) for c in range(side)]  # the thumbnail
    for big_r in range(gh * side):  # then the whole grid as one raster
        for big_c in range(gw * side):
            tile = 1 + (big_r // side) * gw + big_c // side
            expected.append(1000 * tile + 10 * (big_r % side) + big_c % side)
    assert out == expected
    # independent images (grid 0x0) keep tile order
    assert model._layout_image_tokens(tokens, (0, 0)).equal(tokens)


def test_image_sample_and_high_resolution_tiles():
    model = tiny_model().eval()
    ids = torch.randint(0, 190, (2, 6))
    ids[:, 1] = IMAGE_TOKEN
    tiles = random_frames(1 + 7)  # sample 0: one plain image; sample 1: thumbnail + 2x3 grid
    out = model(input_ids=ids, pixel_values_images=tiles, image_tile_counts=torch.tensor([1, 7]),
                image_grids=torch.tensor([[0, 0], [2, 3]]))
    assert out.logits.shape == (2, 5 + 7 * 16, 200)
    # the image path is the encoder with the one-frame table: equal to encoding tiles one by one
    alone = model.encode_images(tiles[:1])
    assert torch.allclose(model.encode_images(tiles)[:16], alone, atol=1e-5)


def _dropout_model(kinds, ratios=(0.75, 0.25), layers=(1, 3), position="compact"):
    return tiny_model(visual_dropout_layers=list(layers), visual_dropout_keep_ratios=list(ratios),
                      visual_dropout_kinds=list(kinds), visual_dropout_position=position,
                      visual_dropout_in_training=True, visual_dropout_in_inference=True)


def _capture_layer_inputs(model):
    seen = {}

    def hook(i):
        def fn(mod, args, kwargs):
            seen[i] = dict(hidden=args[0].detach().clone(), positions=kwargs["position_ids"].clone(),
                           mask=kwargs["attention_mask"])
        return fn

    outputs = {}

    def out_hook(i):
        def fn(mod, args, kwargs, output):
            outputs[i] = output.detach().clone()
        return fn

    for i, layer in enumerate(model.get_decoder().layers):
        layer.register_forward_pre_hook(hook(i), with_kwargs=True)
        layer.register_forward_hook(out_hook(i), with_kwargs=True)
    return seen, outputs


def _real_lengths(mask4d, length):
    """Real tokens per sample from the 4D additive mask (last query row = what the last token sees)."""
    if mask4d is None:
        return None
    return (mask4d[:, 0, -1] == 0).sum(-1)


def test_dropout_keeps_exactly_the_configured_counts():
    model = _dropout_model(["uniform", "uniform"]).train()
    seen, _ = _capture_layer_inputs(model)
    batch = _video_batch()
    model(**batch)
    text_tokens = [14 - 1, 11 - 1]  # real text tokens per sample, the placeholder removed
    visual = [32, 16]
    for layer, ratio in ((0, 1.0), (1, 0.75), (2, 0.75), (3, 0.25)):
        kept = [int(n * ratio) for n in visual]  # 32->24->8, 16->12->4 (int(N * r), the reference's count)
        expected = [t + k for t, k in zip(text_tokens, kept)]
        assert seen[layer]["hidden"].shape[1] == max(expected), layer
        # compact positions: 0..len-1 over the real tokens of each sample
        assert seen[layer]["positions"][0].tolist() == list(range(expected[0]))
        assert seen[layer]["positions"][1, : expected[1]].tolist() == list(range(expected[1]))


def test_uniform_dropout_keeps_evenly_spaced_tokens():
    model = _dropout_model(["uniform", "uniform"], ratios=(0.75, 0.25)).eval()
    seen, outputs = _capture_layer_inputs(model)
    ids = torch.randint(0, 190, (1, 6))
    ids[0, 1] = IMAGE_TOKEN
    model(input_ids=ids, pixel_values_videos=random_frames(4))  # 16 visual tokens at positions 1..16
    before, after = outputs[0][0], seen[1]["hidden"][0]
    kept = [next(j for j in range(1, 17) if torch.equal(before[j], row)) - 1 for row in after[1:13]]
    # 12 of 16, truncated as the reference's linspace(0, 15, 12, dtype=long):
    # 0, 1.36, 2.73, 4.09, 5.45, 6.82, 8.18, 9.55, 10.9, 12.3, 13.6, 15 -> their integer parts
    assert kept == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 15]
    assert torch.equal(after[13:], before[17:])  # the text after the video is untouched


def _rope(vec, pos, theta):
    """Rotate-half RoPE applied to one head vector at one position, written out by pairs."""
    d = vec.shape[0]
    out = vec.clone()
    for i in range(d // 2):
        angle = pos * theta ** (-2.0 * i / d)
        a, b = vec[i].item(), vec[i + d // 2].item()
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def _brute_force_text_scores(layer, hidden, queries, theta, heads, kv_heads):
    """Mean over heads and queries of softmax(q.k / sqrt(d)) over keys <= query, by loops."""
    x = hidden.double()
    norm = layer.input_layernorm
    xn = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    attn = layer.self_attn
    q_all = xn @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
    k_all = xn @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    d = q_all.shape[-1] // heads
    length = x.shape[0]
    total = torch.zeros(length, dtype=torch.float64)
    for qi in queries:
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            q = _rope(q_all[qi, h * d:(h + 1) * d], qi, theta)
            logits = []
            for j in range(qi + 1):
                k = _rope(k_all[j, kvh * d:(kvh + 1) * d], j, theta)
                logits.append((q @ k).item() / math.sqrt(d))
            m = max(logits)
            exp = [math.exp(v - m) for v in logits]
            s = sum(exp)
            for j, e in enumerate(exp):
                total[j] += e / s
    return total / (len(queries) * heads)


def test_text_guided_dropout_matches_an_independent_top_k():
    model = _dropout_model(["text", "text"], ratios=(0.5, 0.25), layers=(1, 3)).train()
    layer1 = model.get_decoder().layers[1]
    with torch.no_grad():  # sharper attention, so the top-k is far from ties
        layer1.self_attn.q_proj.weight.mul_(4.0)
    seen, outputs = _capture_layer_inputs(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 190, (1, 16), generator=g)
    ids[0, 1] = IMAGE_TOKEN
    labels = torch.full_like(ids, -100)
    labels[0, 5:8] = ids[0, 5:8]  # answer spans start after text tokens 4 and 10
    labels[0, 11:14] = ids[0, 11:14]
    frames = random_frames(8, seed=5)  # 32 visual tokens at positions 1..32
    model(input_ids=ids, labels=labels, pixel_values_videos=frames, video_frame_counts=torch.tensor([8]))
    hidden = outputs[0][0]  # what the selection sees: the output of layer 0
    queries = [4 + 31, 10 + 31]  # text index t -> t + 31 in the spliced sequence
    scores = _brute_force_text_scores(layer1, hidden, queries, theta=10000.0, heads=4, kv_heads=2)
    visual = scores[1:33].tolist()
    order = sorted(range(32), key=lambda j: -visual[j])
    assert visual[order[15]] - visual[order[16]] > 1e-6, "ill-posed: a tie at the top-k boundary"
    expected = sorted(order[:16])
    after = seen[1]["hidden"][0]
    kept = [next(j for j in range(1, 33) if torch.equal(hidden[j], row)) - 1 for row in after[1:17]]
    assert kept == expected


def test_keep_position_mode_keeps_original_positions():
    model = _dropout_model(["uniform", "uniform"], position="keep").eval()
    seen, _ = _capture_layer_inputs(model)
    ids = torch.randint(0, 190, (1, 6))
    ids[0, 1] = IMAGE_TOKEN
    model(input_ids=ids, pixel_values_videos=random_frames(4))
    kept = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 15]  # truncated linspace(0, 15, 12)
    assert seen[1]["positions"][0].tolist() == [0] + [1 + k for k in kept] + [17, 18, 19, 20]


@pytest.mark.parametrize("kinds", [["uniform", "text"], ["text", "text"]])
def test_generate_with_dropout_equals_repeated_full_forwards(kinds):
    model = _dropout_model(kinds).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 190, (9,), generator=g), torch.randint(0, 190, (6,), generator=g)]
    prompts[0][2] = IMAGE_TOKEN
    prompts[1][1] = IMAGE_TOKEN
    frames = [random_frames(8, seed=1), random_frames(4, seed=2)]
    # a left-padded batch through HF generate with the KV cache
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = prompts[0], 1
    ids[1, 3:], mask[1, 3:] = prompts[1], 1
    fed = []  # tokens the embedding sees per forward: the prompt once, then one token per step
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1]))
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat(frames),
                         video_frame_counts=torch.tensor([8, 4]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    hook.remove()
    assert fed == [9] + [1] * 5, "generate must decode on the KV cache, one new token per step"
    for b in range(2):
        seq, tokens = prompts[b][None], []
        with torch.no_grad():
            for _ in range(6):  # no cache: the whole sequence again, the query fixed at the last prompt token
                logits = model(input_ids=seq, pixel_values_videos=frames[b], use_cache=False,
                               dropout_query_positions=torch.tensor([len(prompts[b]) - 1])).logits[:, -1]
                nxt = logits.argmax(-1, keepdim=True)
                tokens.append(nxt.item())
                seq = torch.cat([seq, nxt], 1)
        assert out[b, 9:].tolist() == tokens


def test_generate_without_dropout_equals_full_forwards_on_images():
    model = tiny_model().eval()
    ids = torch.randint(0, 190, (1, 7))
    ids[0, 3] = IMAGE_TOKEN
    tiles = random_frames(3)
    out = model.generate(input_ids=ids, pixel_values_images=tiles, image_grids=torch.tensor([[1, 2]]),
                         max_new_tokens=4, do_sample=False)
    seq, tokens = ids, []
    with torch.no_grad():
        for _ in range(4):
            nxt = model(input_ids=seq, pixel_values_images=tiles, image_grids=torch.tensor([[1, 2]]),
                        use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt.item())
            seq = torch.cat([seq, nxt], 1)
    assert out[0, 7:].tolist() == tokens


def test_save_and_load_round_trip_in_safetensors(tmp_path):
    model = _dropout_model(["uniform", "text"]).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = VideoFlashForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.visual_dropout_kinds == ["uniform", "text"]
    batch = _video_batch()
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-5)


def test_tied_embeddings_survive_a_round_trip(tmp_path):
    model = tiny_model(text=dict(tie_word_embeddings=True)).eval()
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = VideoFlashForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_config_rejects_a_bad_dropout_schedule():
    with pytest.raises(ValueError, match="keep_ratios"):
        tiny_config(visual_dropout_layers=[1, 2], visual_dropout_keep_ratios=[0.5])
    with pytest.raises(ValueError, match="outside"):
        tiny_config(visual_dropout_layers=[4], visual_dropout_keep_ratios=[0.5], visual_dropout_kinds=["uniform"])
    with pytest.raises(ValueError, match="unknown kind"):
        tiny_config(visual_dropout_layers=[1], visual_dropout_keep_ratios=[0.5], visual_dropout_kinds=["random"])
