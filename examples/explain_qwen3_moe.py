"""A tiny transformers Qwen3-MoE, nothing flagged, for ``python -m leafpass explain``.

    python -m leafpass explain examples/explain_qwen3_moe.py --suggest

Built from a config (no download): two decoder layers, each with a sparse MoE block of
four experts run by the eager loop (``experts_implementation="eager"``), whose
``nonzero`` routing breaks the graph. ``use_cache`` keeps its default, so the decoder
layers receive a ``DynamicCache``.
"""

import torch
import transformers


def build():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    input_ids = torch.randint(0, 64, (2, 8))
    return model, (input_ids,)
