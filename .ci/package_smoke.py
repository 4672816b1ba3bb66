"""What a user of the installed wheel does, run from outside the checkout: the CLI, one conversion
per target family (GQA, DeepseekV3 MLA, a hosted class), and a reload with plain Transformers,
checking cached greedy generation against full forwards without a cache.

Usage: python package_smoke.py WORKDIR   (with the wheel's venv; kvslim must not come from a checkout)
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import kvslim

work = Path(sys.argv[1])
kvslim_root = Path(kvslim.__file__).resolve().parent
assert "site-packages" in kvslim_root.parts, f"kvslim imported from {kvslim_root}, not from the installed wheel"
cli = Path(sys.executable).with_name("kvslim")

rng = random.Random(0)
words = "the a of and to in is was he she it that for on with as his her at by from they we you this".split()
text = " ".join(rng.choice(words) for _ in range(20000))
(work / "calib.txt").write_text(text)
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

torch.manual_seed(0)
sources = {
    "llama": LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                          bos_token_id=1, eos_token_id=2)),
    "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=320, n_positions=128,
                                       bos_token_id=1, eos_token_id=2)),
}
for name, model in sources.items():
    model.save_pretrained(str(work / name))
    tokenizer.save_pretrained(str(work / name))


def run(*args):
    proc = subprocess.run([str(cli), *args], capture_output=True, text=True, cwd=work)
    assert proc.returncode == 0, f"kvslim {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


assert "convert" in run("--help")
from kvslim.cli import DEMO_CALIB, DEMO_EVAL  # noqa: E402  (the demo's text is package data of the wheel)

assert all(p.is_file() and p.stat().st_size > 100_000 for p in (DEMO_CALIB, DEMO_EVAL)), (DEMO_CALIB, DEMO_EVAL)
calib = ["--calib-data", str(work / "calib.txt"), "--calib-samples", "8", "--calib-seq-len", "32",
         "--refine-steps", "2"]
cases = {
    "gqa": ("llama", ["--to", "gqa", "--kv-heads", "2", "--method", "mean"]),
    "deepseek-mla": ("llama", ["--to", "mla", "--kv-budget", "0.5", *calib]),
    "hosted-gpt2-mla": ("gpt2", ["--to", "mla", "--kv-budget", "0.5", *calib]),
}
ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))
kvslim.register()  # the hosted classes, as a user with kvslim installed loads them without remote code
for case, (source, options) in cases.items():
    out = work / f"out-{case}"
    run("convert", str(work / source), "-o", str(out), *options)
    assert json.loads(run("inspect", str(out), "--json"))["kv_bytes_per_token"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # plain Transformers, kvslim's classes registered
    want = ids
    with torch.no_grad():
        for _ in range(5):
            want = torch.cat([want, model(input_ids=want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want), case
    print(f"ok: {case}: {type(model).__name__}, cached == uncached greedy")
print("package smoke test passed")
