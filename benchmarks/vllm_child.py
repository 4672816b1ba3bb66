"""Runs inside a stock vLLM environment (not kvslim's): loads checkpoints with `vllm.LLM`, and
writes prompt logprobs, greedy tokens and decode throughput as JSON. Called by vllm_serving.py.

    python vllm_child.py JOB.json OUT.json
"""

from __future__ import annotations

import json
import sys
import time


def rotary_probe() -> float:
    """Max error of vLLM-CPU's rotary_embedding op against its own forward_native, on the strided
    view of q that vLLM's MLA layer passes it ([tokens, heads, 192][..., 128:]) and a split k_pe."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        is_neox_style=False, dtype=torch.float32)
        torch.manual_seed(0)
        positions, q, latent = torch.arange(8), torch.randn(8, 4, 192), torch.randn(8, 576)
        expected = rope.forward_native(positions, q.clone()[..., 128:], latent.clone()[:, 512:].unsqueeze(1))
        got = rope.forward_cpu(positions, q.clone()[..., 128:], latent.clone()[:, 512:].unsqueeze(1))
        return max(float((a - b).abs().max()) for a, b in zip(expected, got))


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    if job.get("rotary_probe"):
        return {"rotary_probe_max_error": rotary_probe()}

    # no prefix caching: the timed runs repeat prompts, and vLLM-CPU disables it for MLA models anyway
    llm = LLM(model=job["path"], dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, enable_prefix_caching=False,
              max_model_len=job.get("max_model_len", 256), skip_tokenizer_init=True, seed=0,
              compilation_config=job.get("compilation_config"))
    result = {"architecture": llm.llm_engine.model_config.architectures}
    prompt = {"prompt_token_ids": job["prompt"]}
    greedy = SamplingParams(temperature=0.0, max_tokens=job["steps"], prompt_logprobs=0, ignore_eos=True,
                            detokenize=False)
    out = llm.generate([prompt], greedy, use_tqdm=False)[0]
    result["prompt_logprobs"] = [None if d is None else d[t].logprob
                                 for d, t in zip(out.prompt_logprobs, job["prompt"])]
    result["greedy"] = list(out.outputs[0].token_ids)
    for batch in job.get("throughput_batches", []):
        prompts = [{"prompt_token_ids": job["long_prompts"][i % len(job["long_prompts"])]} for i in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=job["decode_tokens"], ignore_eos=True, detokenize=False)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)  # warm-up
        # prefill alone, then prefill + decode: the difference is the decode time
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, detokenize=False), use_tqdm=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        total = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result.setdefault("throughput", []).append(
            {"batch": batch, "context": len(job["long_prompts"][0]), "decode_tokens": tokens,
             "seconds": round(total, 3), "prefill_seconds": round(prefill, 3),
             # decode alone: the difference of two noisy timings, reported only when it is clearly positive
             "decode_tokens_per_s": round((tokens - batch) / (total - prefill), 2) if total > 1.2 * prefill else None,
             "end_to_end_tokens_per_s": round(tokens / total, 2)})
    return result


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this file
    job = json.loads(open(sys.argv[1]).read())
    try:
        result = run(job)
    except Exception as exc:  # report, so the caller can tell a refused checkpoint from a crash
        result = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
