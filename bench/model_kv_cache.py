"""KV-cache bytes per token: MLA's latent cache vs MHA and GQA with the same heads (no GPU needed).

    python bench/model_kv_cache.py

Formula from `posttrain.model.kv_cache_report`; the MLA column is checked against a real LatentKVCache's
allocation.
"""

import torch

from posttrain.model import DeepseekV3Config, LatentKVCache, kv_cache_report

CONFIGS = {
    "DeepSeek-V3 (61 layers, 128 heads)": DeepseekV3Config(),
    "V2-Lite-class (27 layers, 16 heads)": DeepseekV3Config(
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_size=2048,
        q_lora_rank=None,
    ),
}


def main():
    print(
        f"{'model':38s} {'MLA B/tok':>10s} {'GQA-8 B/tok':>12s} {'MHA B/tok':>10s} {'MHA/MLA':>8s} {'GQA/MLA':>8s}"
    )
    for name, config in CONFIGS.items():
        report = kv_cache_report(config, bytes_per_number=2)
        cache = LatentKVCache(config.num_hidden_layers, 1, config, torch.bfloat16, "meta", capacity=1000)
        assert cache.nbytes() == 1000 * report["mla_bytes_per_token"], "allocation disagrees with the formula"
        print(
            f"{name:38s} {report['mla_bytes_per_token']:10,.0f} {report['gqa_bytes_per_token']:12,.0f} "
            f"{report['mha_bytes_per_token']:10,.0f} {report['mha_over_mla']:7.1f}x {report['gqa_over_mla']:7.1f}x"
        )
    print("bf16; per token over all layers; MLA keeps d_c + d_h^R = 576 numbers per token per layer")


if __name__ == "__main__":
    main()
