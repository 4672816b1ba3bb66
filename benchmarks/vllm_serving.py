"""kvslim's `--runtime vllm` MLA output served by stock vLLM, checked against Transformers.

For synthetic Llama and Qwen2 sources (4 heads, head_dim 128, hidden 512: KV 1,024 elements per
token and layer; Qwen2 with Q/K/V biases), each converted with `--to mla --runtime vllm` (512 + 64):
- in vLLM (its CPU_MLA backend) against Transformers on the same checkpoint: prompt logprobs of a
  random 48-token sequence (max |difference| <= 0.05) and 16 greedy tokens (identical);
- the default runtime's output (attention biases) in vLLM, as the control that shows why;
- quality at the same cache size, `--runtime vllm` against the default runtime: perplexity on
  text sampled from the source model itself (a random model has no corpus of its own);
- vLLM decode throughput and KV bytes per token, converted against the source served by the
  same vLLM, at batch 1 and 8 with a 2K-token context.

vLLM lives in its own environment (`bash .ci/setup_vllm VENV`, about 8 minutes); then

    python benchmarks/vllm_serving.py --vllm-python VENV/bin/python
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))
STEPS, PROMPT, LOGPROB_TOLERANCE = 16, 48, 0.05
# vLLM-CPU's rotary_embedding op mishandles the strided q / k_pe views its own MLA layer passes it,
# for every DeepseekV3 checkpoint (Transformers' own too): serve with that op off, so vLLM runs its
# forward_native instead (`--compilation-config '{"custom_ops": ["-rotary_embedding"]}'`).
CPU_ROTARY_FIX = {"custom_ops": ["-rotary_embedding"]}


def synthetic_source(model_type: str, path: Path, build_tokenizer, init: float) -> Path:
    """A random model (init std `init`; Transformers' default 0.02)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=512, intermediate_size=1024,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=128,
                                  max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False, initializer_range=init)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(str(path))
    build_tokenizer(path)  # calibration reads text through it
    return path


def native_deepseek(path: Path, init: float) -> Path:
    """Transformers' own DeepseekV3 of the same size and shape, random, no kvslim involved: the
    control for what vLLM does with any DeepseekV3 checkpoint."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=512, hidden_size=512, intermediate_size=1024, moe_intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1,
        n_group=1, topk_group=1, first_k_dense_replace=2, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
        initializer_range=init, architectures=["DeepseekV3ForCausalLM"], bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(str(path))
    return path


def sampled_text(model, n: int, length: int, seed: int) -> torch.Tensor:
    """Token sequences sampled from `model` at temperature 1: text whose perplexity it defines."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = model(input_ids=ids).logits[:, -1].float().softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return ids


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    return float(torch.exp(-logp.gather(-1, ids[:, 1:, None]).mean()))


def transformers_reference(path: Path, prompt: list[int]) -> dict:
    """Prompt logprobs and greedy tokens (full forwards, no cache, EOS ignored) in Transformers."""
    from transformers import AutoModelForCausalLM

    import kvslim

    kvslim.register()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    margins = []  # top-1 minus top-2 log-probability at each greedy step: how near a tie it is
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        seq = ids
        for _ in range(STEPS):
            last = torch.log_softmax(model(input_ids=seq).logits[0, -1].float(), -1)
            top = last.topk(2).values
            margins.append(float(top[0] - top[1]))
            seq = torch.cat([seq, last.argmax().view(1, 1)], dim=1)
    return {"prompt_logprobs": [None] + [float(logp[i, t]) for i, t in enumerate(prompt[1:])],
            "greedy": seq[0, len(prompt):].tolist(), "margins": margins}


def in_vllm(vllm_python: str, path: Path, prompt: list[int], work: Path, throughput: bool,
            compilation_config: dict | None = CPU_ROTARY_FIX) -> dict:
    job = {"path": str(path), "prompt": prompt, "steps": STEPS, "compilation_config": compilation_config}
    if throughput:
        rng = random.Random(1)
        job.update(max_model_len=2048 + 64, throughput_batches=[1, 8], decode_tokens=32,
                   long_prompts=[[rng.randrange(3, 500) for _ in range(2000)] for _ in range(8)])
    tag = f"{path.name}-{'fix' if compilation_config else 'stock'}"
    job_file, out_file = work / f"{tag}-job.json", work / f"{tag}-vllm.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([vllm_python, str(ROOT / "benchmarks" / "vllm_child.py"), str(job_file), str(out_file)],
                          capture_output=True, text=True, env=env, cwd=work, timeout=1200)
    if not out_file.exists():
        return {"error": f"vLLM exited {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(out_file.read_text())


def compare(reference: dict, served: dict) -> dict:
    if "error" in served:
        return {"loads": False, "error": served["error"][-600:]}
    diffs = [abs(a - b) for a, b in zip(reference["prompt_logprobs"][1:], served["prompt_logprobs"][1:])]
    same = reference["greedy"] == served["greedy"]
    first = next((i for i, (a, b) in enumerate(zip(reference["greedy"], served["greedy"])) if a != b), None)
    return {"loads": True, "architecture": served["architecture"], "max_abs_logprob_diff": round(max(diffs), 5),
            "greedy_identical": same, "first_divergence": first,
            "transformers_margin_there": None if first is None else round(reference["margins"][first], 5), "passes": max(diffs) <= LOGPROB_TOLERANCE and same,
            "greedy_transformers": reference["greedy"], "greedy_vllm": served["greedy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.environ.get("KVSLIM_VLLM_PYTHON"),
                        help="python of an environment with stock vLLM (see .ci/setup_vllm)")
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--init", type=float, default=0.02, help="init std of the synthetic sources")
    parser.add_argument("--out", default="vllm_serving")
    parser.add_argument("--render", action="store_true", help="only rewrite the Markdown from the saved JSON")
    args = parser.parse_args()
    if args.render:
        result = json.loads((RESULTS / f"{args.out}.json").read_text())
        (RESULTS / f"{args.out}.md").write_text(markdown(result))
        return
    if not args.vllm_python:
        sys.exit("Pass --vllm-python (or set KVSLIM_VLLM_PYTHON): a python with stock vLLM, see .ci/setup_vllm.")
    from transformers import AutoModelForCausalLM

    import kvslim

    from common import build_tokenizer, sample_text

    torch.set_num_threads(2)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 500) for _ in range(PROMPT)]
    rows, quality, speed = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib.txt"
        calib.write_text(sample_text(20000, seed=3))
        for model_type in ("llama", "qwen2"):
            src = synthetic_source(model_type, work / f"{model_type}-src", build_tokenizer, args.init)
            source_model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
            text = sampled_text(source_model, 8, 128, seed=5)
            common = dict(calib_data=str(calib), calib_samples=32, calib_seq_len=128,
                          refine_steps=args.refine_steps, progress=False)
            outputs = {
                "vllm": kvslim.convert(str(src), work / f"{model_type}-mla-vllm", to="mla", runtime="vllm", **common),
                "transformers": kvslim.convert(str(src), work / f"{model_type}-mla-transformers", to="mla",
                                               kv_budget=576 / 1024, **common),
                # vLLM's split (511 + anchor, RoPE 64) with biases: isolates what dropping them costs
                "transformers_vllm_split": kvslim.convert(str(src), work / f"{model_type}-mla-transformers_vllm_split",
                                                          to="mla", kv_rank=511, rope_dim=64, **common),
            }
            q = {"model": f"synthetic {model_type}", "source_perplexity": round(perplexity(source_model, text), 3)}
            for runtime, record in outputs.items():
                model = AutoModelForCausalLM.from_pretrained(str(work / f"{model_type}-mla-{runtime}")).eval()
                q[runtime] = {"perplexity": round(perplexity(model, text), 3),
                              "cache_elements_per_layer": record.mla["cache_elements_per_layer"],
                              "kv_rank": record.mla["kv_rank"], "rope_dim": record.mla["rope_dim"],
                              "seconds": record.seconds}
            quality.append(q)
            fix, stock = CPU_ROTARY_FIX, None
            checkpoints = [(f"{model_type}-mla-vllm", "--runtime vllm", fix),
                           (f"{model_type}-mla-transformers", "--runtime transformers (control)", fix)]
            if model_type == "llama":
                native_deepseek(work / "native-deepseek", args.init)
                checkpoints += [(f"{model_type}-src", "source (unconverted)", fix),
                                ("native-deepseek", "Transformers' own DeepseekV3, same shape (control)", fix),
                                (f"{model_type}-mla-vllm", "--runtime vllm, stock rotary op (control)", stock),
                                ("native-deepseek", "Transformers' own DeepseekV3, stock rotary op (control)", stock)]
            for name, label, options in checkpoints:
                path = work / name
                served = in_vllm(args.vllm_python, path, prompt, work, compilation_config=options,
                                 throughput=options is fix and name in ("llama-mla-vllm", "llama-src"))
                row = {"model": f"synthetic {model_type}", "checkpoint": label, "compilation_config": options,
                       **compare(transformers_reference(path, prompt), served)}
                rows.append(row)
                if served.get("throughput"):
                    cfg = json.loads((path / "config.json").read_text())
                    per_layer = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] if "kv_lora_rank" in cfg else \
                        2 * cfg["num_key_value_heads"] * cfg["head_dim"]
                    for t in served["throughput"]:
                        speed.append({"checkpoint": label, "kv_bytes_per_token": per_layer * cfg["num_hidden_layers"] * 4,
                                      **t})
                print(json.dumps(row), flush=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "vllm_python": args.vllm_python, "date": dt.date.today().isoformat()}
    probe_file = Path(tempfile.mkdtemp()) / "probe.json"
    probe_file.write_text(json.dumps({"rotary_probe": True}))
    subprocess.run([args.vllm_python, str(ROOT / "benchmarks" / "vllm_child.py"), str(probe_file), str(probe_file)],
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    probe = json.loads(probe_file.read_text())
    result = {"machine": machine, "init": args.init, "check": rows, "quality": quality, "throughput": speed,
              "rotary_probe_max_error": probe.get("rotary_probe_max_error"), "cpu_rotary_fix": CPU_ROTARY_FIX,
              "tolerance": LOGPROB_TOLERANCE, "steps": STEPS, "prompt_tokens": PROMPT,
              "refine_steps": args.refine_steps}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))
    if not all(r.get("passes") for r in rows if "(control)" not in r["checkpoint"]):
        sys.exit(1)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# kvslim MLA output in stock vLLM ({m['date']})", "",
             f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}; vLLM from `{m['vllm_python']}`.", "",
             f"Prompt logprobs of a random {r['prompt_tokens']}-token sequence and {r['steps']} greedy tokens, "
             f"vLLM (CPU) against Transformers on the same checkpoint, fp32, random weights with init std "
             f"{r['init']}. Pass: max |difference| <= {r['tolerance']} and identical tokens.", "",
             f"vLLM is run with `--compilation-config '{json.dumps(r['cpu_rotary_fix'])}'` except in the rows "
             f"marked 'stock rotary op': vLLM-CPU's `rotary_embedding` op mishandles the strided q / k_pe views "
             f"that vLLM's own MLA layer passes it (max error {r['rotary_probe_max_error']:.3g} against its "
             f"`forward_native` on such a view), which corrupts every DeepseekV3 model on vLLM-CPU, Transformers' "
             f"own included.", "",
             "| model | checkpoint | loads in vLLM | max abs logprob diff | greedy identical | first divergent step "
             "(Transformers' top-1 - top-2 logprob there) | pass |", "|---|---|---|---|---|---|---|"]
    for row in r["check"]:
        where = "-" if row.get("first_divergence") is None else \
            f"{row['first_divergence']} ({row['transformers_margin_there']})"
        lines.append(f"| {row['model']} | {row['checkpoint']} | {row['loads']} | {row.get('max_abs_logprob_diff', '-')} | "
                     f"{row.get('greedy_identical', '-')} | {where} | {row.get('passes', False)} |")
    lines += ["", f"Quality at the same cache size (576 elements per token and layer of the source's 1,024; "
              f"{r['refine_steps']} refinement steps), perplexity on 8 x 128 tokens sampled from each source:", "",
              "| model | source | --runtime transformers, its own split | --runtime transformers, vLLM's split "
              "(511 + anchor + RoPE 64, biases) | --runtime vllm (512 + 64, no biases) |", "|---|---|---|---|---|"]
    for q in r["quality"]:
        t, s, v = q["transformers"], q["transformers_vllm_split"], q["vllm"]
        lines.append(f"| {q['model']} | {q['source_perplexity']} | {t['perplexity']} (rank {t['kv_rank']} + RoPE "
                     f"{t['rope_dim']}) | {s['perplexity']} | {v['perplexity']} |")
    if r["throughput"]:
        lines += ["", "vLLM (CPU) generation, 2K-token prompts, 32 new tokens per sequence (one run each; decode "
                  "tokens/s is (tokens - batch) / (generate time - prefill-only time), shown when the difference is "
                  "clearly positive):", "",
                  "| checkpoint | batch | KV bytes/token | generate s | prefill-only s | end-to-end tokens/s | decode tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        for t in r["throughput"]:
            decode = t["decode_tokens_per_s"] if t["seconds"] > 1.2 * t["prefill_seconds"] else "within noise"
            lines.append(f"| {t['checkpoint']} | {t['batch']} | {t['kv_bytes_per_token']:,} | {t['seconds']} | "
                         f"{t['prefill_seconds']} | {round(t['decode_tokens'] / t['seconds'], 2)} | {decode} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
