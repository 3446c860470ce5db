"""Memory of fine-tuning VideoChat-Flash-Qwen2-7B, computed from its shapes (no weights loaded).

    python scripts/finetune_memory.py [--gpus 8] [--ranks 8 16 64] [--tokens 8192]

Counts the parameters of the UMT-L encoder (23 blocks), the connector and Qwen2-7B from their
layer shapes, then the bytes that each recipe keeps per GPU under ZeRO-3 (everything sharded over
``--gpus``): full fine-tuning (bf16 weights and gradients, fp32 master weights and two Adam moments:
16 bytes per trained parameter, 2 per frozen one), LoRA (bf16 base, 16 bytes per adapter and
connector parameter) and QLoRA (the LLM's linear layers in NF4 with double quantization, about 4.13
bits per weight). Activations are the checkpointed layer inputs of ``--tokens`` tokens (one per
LLM layer, bf16) plus one layer's recomputation, and the logits with the cross-entropy's float32
copy and gradient over the whole sequence (as the model's forward computes them today); the vision
tower's own activations are left out (frozen and not adapted, it runs without autograd). The last
line is LoRA's total over full fine-tuning's at the first rank.
"""

from __future__ import annotations

import argparse

GB = 1e9

# Qwen2-7B (config.json of the release) and UMT-L
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 3584, 28, 28, 4, 128, 18944, 152064
VIT_WIDTH, VIT_BLOCKS, VIT_MLP = 1024, 23, 4096


def llm_linear_shapes() -> list[tuple[str, int, int]]:
    """(group, in, out) of one decoder layer's linear layers."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return [("attn", HIDDEN, q), ("attn", HIDDEN, kv), ("attn", HIDDEN, kv), ("attn", q, HIDDEN),
            ("mlp", HIDDEN, INTER), ("mlp", HIDDEN, INTER), ("mlp", INTER, HIDDEN)]


def counts() -> dict[str, int]:
    linear = LAYERS * sum(i * o for _, i, o in llm_linear_shapes())
    biases = LAYERS * (HEADS + 2 * KV_HEADS) * HEAD_DIM  # q, k, v biases
    norms = LAYERS * 2 * HIDDEN + HIDDEN
    embed = 2 * VOCAB * HIDDEN  # embeddings and the untied head
    vit_block = 3 * VIT_WIDTH * VIT_WIDTH + 2 * VIT_WIDTH + VIT_WIDTH * VIT_WIDTH + VIT_WIDTH \
        + 2 * VIT_WIDTH * VIT_MLP + VIT_MLP + VIT_WIDTH + 4 * VIT_WIDTH
    vision = VIT_BLOCKS * vit_block + 3 * 16 * 16 * VIT_WIDTH + VIT_WIDTH + 2 * VIT_WIDTH
    connector = VIT_WIDTH * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN
    return dict(llm_linear=linear, llm_rest=biases + norms + embed, vision=vision, connector=connector)


def lora_params(rank: int, groups=("attn", "mlp")) -> int:
    return LAYERS * sum(rank * (i + o) for g, i, o in llm_linear_shapes() if g in groups)


def activations(tokens: int) -> float:
    """Checkpointed inputs of every layer + one layer's recomputed working set, bf16 bytes."""
    saved = LAYERS * tokens * HIDDEN * 2
    one_layer = tokens * (4 * HIDDEN + 2 * (HEADS + 2 * KV_HEADS) * HEAD_DIM + 3 * INTER) * 2
    logits = tokens * VOCAB * (2 + 4 + 4)  # bf16 logits, their float32 copy, its gradient
    return float(saved + one_layer + logits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, default=8192 + 512, help="sequence: 512 frames x 16 + text")
    args = parser.parse_args(argv)
    c = counts()
    total = sum(c.values())
    print(f"parameters: LLM linear {c['llm_linear'] / 1e9:.3f} B, LLM embeddings/head/norms/biases "
          f"{c['llm_rest'] / 1e9:.3f} B, vision {c['vision'] / 1e6:.0f} M, connector {c['connector'] / 1e6:.1f} M, "
          f"total {total / 1e9:.3f} B")
    act = activations(args.tokens) / GB
    n = args.gpus
    rows = []
    full = (16 * (c["llm_linear"] + c["llm_rest"] + c["connector"]) + 2 * c["vision"]) / n / GB
    rows.append(("full (LLM + connector; encoder frozen)", full))
    for r in args.ranks:
        adapter = lora_params(r)
        lora = (2 * total + 16 * (adapter + c["connector"])) / n / GB
        rows.append((f"LoRA r={r} attn+MLP ({adapter / 1e6:.0f} M) + connector", lora))
        nf4 = c["llm_linear"] * 4.127 / 8  # 4-bit codes + double-quantized block constants
        qlora = (nf4 + 2 * (c["llm_rest"] + c["vision"] + c["connector"]) + 16 * (adapter + c["connector"])) / n / GB
        rows.append((f"QLoRA r={r} attn+MLP + connector", qlora))
    print(f"per GPU over {n} GPUs (ZeRO-3), activations of {args.tokens} tokens: {act:.2f} GB")
    for name, gb in rows:
        print(f"  {name:<46} states {gb:6.2f} GB   with activations {gb + act:6.2f} GB")
    print(f"LoRA r={args.ranks[0]} over full fine-tuning, per GPU with activations: "
          f"{(rows[1][1] + act) / (rows[0][1] + act):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
