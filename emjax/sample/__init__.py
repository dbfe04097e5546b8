"""Sampling: a jitted prefill + decode loop over a KV cache (`sampler`) and the `sample` job (`run`).

    from emjax.sample import Sampler, SamplingParams
    sampler = Sampler(model_cfg, prompt_buckets=(64, 128), max_new_tokens_cap=256)
    weights = sampler.prepare_weights(params)        # once per set of weights
    out = sampler.generate(weights, prompts, SamplingParams(max_new_tokens=128, temperature=0.7, n=4))
"""

from emjax.sample.sampler import SampleOutput, Sampler, SamplingParams, SamplingRules

__all__ = ["SampleOutput", "Sampler", "SamplingParams", "SamplingRules"]
