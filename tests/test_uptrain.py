"""Uptraining recipe on tiny models, CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kvslim.recipes import uptrain as recipe
from kvslim.recipes.data import collate, pack_documents
from kvslim.recipes.uptrain import UptrainConfig, UptrainError

from common import load, make_model, registered_source


@pytest.fixture
def setup(save_model, text_file, tmp_path):
    teacher = save_model(make_model("llama", 8, 8, seed=1), "teacher")
    import kvslim

    kvslim.convert(str(teacher), tmp_path / "student", to="mqa", method="mean", progress=False)
    return dict(model=str(tmp_path / "student"), teacher=str(teacher), data=[str(text_file)], seq_len=32,
                micro_batch=4, eval_rows=4, progress=False, eval_every=1000, checkpoint_every=1000, log_every=1)


def cfg(base, tmp_path, name, **kw) -> UptrainConfig:
    return UptrainConfig(**{**base, "output": str(tmp_path / name), **kw})


def log(tmp_path, name) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / f"{name}.log.jsonl").read_text().splitlines()]


def weights(path) -> dict:
    return {k: v.clone() for k, v in load(path).state_dict().items()}


def test_packing_keeps_documents_apart(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = list(pack_documents(["the time of day", "a new year was good for us and them, the people"], tok, 16))
    first = rows[0]
    starts = (first["position_ids"] == 0).nonzero().flatten().tolist()
    assert starts[0] == 0 and len(starts) >= 2  # a second document starts inside the row
    assert all(first["labels"][s] == -100 for s in starts)
    # a packed row gives each document the logits it gets alone: no attention across the boundary
    model = make_model("llama", 8, 8)
    b = starts[1]
    with torch.no_grad():
        packed = model(input_ids=first["input_ids"][None], position_ids=first["position_ids"][None],
                       use_cache=False).logits
        alone = model(input_ids=first["input_ids"][None, b:]).logits
    torch.testing.assert_close(packed[0, b:], alone[0], atol=1e-5, rtol=0)


def test_loss_goes_down(setup, tmp_path):
    recipe.run(cfg(setup, tmp_path, "lm", tokens=128 * 40, lr=3e-3))
    records = log(tmp_path, "lm")
    losses = [r["lm"] for r in records]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    # the logged lr is the one each step used: warmup, stable peak, WSD decay ending at the floor
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(3e-3 / 2) and max(lrs) == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(0.1 * 3e-3) and min(lrs) >= 0.1 * 3e-3 - 1e-12, lrs
    summary = json.loads((tmp_path / "lm" / "kvslim_uptrain.json").read_text())
    assert summary["steps"] == 40 and summary["evaluations"][-1]["eval_ppl"] > 1


def test_distillation_from_identical_teacher_has_zero_kl(setup, tmp_path):
    recipe.run(cfg(setup, tmp_path, "kd", model=setup["teacher"], tokens=128 * 2, lm=0.0, kd=1.0))
    first = log(tmp_path, "kd")[0]
    assert abs(first["kd"]) < 1e-6


def test_resume_after_a_kill_matches_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    settings = dict(tokens=128 * 12, checkpoint_every=3, eval_every=3, lr=3e-3)
    recipe.run(cfg(setup, tmp_path, "straight", **settings))
    calls = {"n": 0}
    real = recipe.losses

    def dies_at_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "losses", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        recipe.run(cfg(setup, tmp_path, "resumed", **settings))
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.checkpoints" / "step-6").is_dir()
    assert log(tmp_path, "resumed")[-1]["step"] == 7  # logged past the last checkpoint before the kill
    monkeypatch.setattr(recipe, "losses", real)
    recipe.run(cfg(setup, tmp_path, "resumed", **settings))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    # the resumed run's records are the uninterrupted run's: every step logged once, every evaluation kept
    drop = ("tokens_per_s",)
    straight, resumed = log(tmp_path, "straight"), log(tmp_path, "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 13))
    for x, y in zip(straight, resumed):
        assert {k: v for k, v in x.items() if k not in drop} == pytest.approx({k: v for k, v in y.items() if k not in drop})
    evals = [json.loads((tmp_path / n / "kvslim_uptrain.json").read_text())["evaluations"] for n in ("straight", "resumed")]
    assert [e["step"] for e in evals[1]] == [e["step"] for e in evals[0]] == [0, 3, 6, 9, 12]
    assert [e["eval_ppl"] for e in evals[1]] == pytest.approx([e["eval_ppl"] for e in evals[0]])
    # only the last checkpoint is kept after a finished run
    assert [p.name for p in (tmp_path / "resumed.checkpoints").iterdir()] == ["step-9"]
    assert sorted(p.name for p in (tmp_path / "straight.checkpoints").iterdir()) == ["step-9"]


def test_overwrite_starts_fresh_and_a_resume_with_other_settings_is_refused(setup, tmp_path):
    recipe.run(cfg(setup, tmp_path, "run", tokens=128 * 4, checkpoint_every=2, lr=1e-4, keep_checkpoints=True))
    assert sorted(p.name for p in (tmp_path / "run.checkpoints").iterdir()) == ["step-2"]
    (tmp_path / "run").rename(tmp_path / "run-first")  # as if the run had been killed after step 2
    with pytest.raises(UptrainError, match=r"lr: 0\.0001 in the checkpoint, 0\.001 now.*--overwrite"):
        recipe.run(cfg(setup, tmp_path, "run", tokens=128 * 4, checkpoint_every=2, lr=1e-3))
    recipe.run(cfg(setup, tmp_path, "run", tokens=128 * 4, checkpoint_every=2, lr=1e-3, overwrite=True))
    records = log(tmp_path, "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # a fresh run: not resumed from step 2
    assert records[0]["lr"] == pytest.approx(1e-3 / 1)  # warmup of 5% of 4 steps is one step
    summary = json.loads((tmp_path / "run" / "kvslim_uptrain.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["steps"] == 4


def test_non_finite_loss_stops_and_keeps_last_checkpoint(setup, tmp_path, monkeypatch):
    real = recipe.losses
    calls = {"n": 0}

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        parts = real(*args, **kwargs)
        if calls["n"] == 3:
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(recipe, "losses", nan_at_step_3)
    with pytest.raises(UptrainError, match="diverged.*step-2"):
        recipe.run(cfg(setup, tmp_path, "nan", tokens=128 * 6, checkpoint_every=2))
    assert (tmp_path / "nan.checkpoints" / "step-2").is_dir() and not (tmp_path / "nan").exists()


def test_lora_distillation_merges_into_a_plain_checkpoint(setup, tmp_path):
    recipe.run(cfg(setup, tmp_path, "lora", train="lora", lm=0.5, kd=1.0, tokens=128 * 4, lr=1e-2))
    out = load(tmp_path / "lora")  # plain Transformers
    assert not any("lora" in k for k in out.state_dict())
    before = load(setup["model"]).state_dict()
    after = out.state_dict()
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_attention_only_training_freezes_the_rest(setup, tmp_path):
    recipe.run(cfg(setup, tmp_path, "attn", train="attention", tokens=128 * 3, lr=1e-2))
    before, after = load(setup["model"]).state_dict(), load(tmp_path / "attn").state_dict()
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.k_proj.weight"], before["model.layers.0.self_attn.k_proj.weight"])


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(setup, tmp_path):
    def launch(name, processes, micro_batch):
        settings = [f"{k}={json.dumps(v)}" for k, v in {**setup, "output": str(tmp_path / name), "micro_batch": micro_batch,
                                                         "tokens": 128 * 4, "lr": 3e-3, "kd": 1.0}.items()]
        # accelerate picks up a torchrun world on CPU (gloo) when told to use the CPU; its own
        # `launch` needs mpirun for multi-CPU jobs
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        if processes == 1:
            cmd = [sys.executable, "-m", "kvslim.recipes.uptrain", "--set", *settings]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                   "kvslim.recipes.uptrain", "--set", *settings]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("one", 1, 4)
    launch("two", 2, 2)
    assert json.loads((tmp_path / "two" / "kvslim_uptrain.json").read_text())["processes"] == 2
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)  # lr 3e-3: a wrong split moves weights ~1e-3


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_inputs(setup, tmp_path, tokenizer_dir, save_model):
    with pytest.raises(UptrainError, match="does not exist"):
        recipe.run(cfg(setup, tmp_path, "x", data=[str(tmp_path / "missing.txt")]))
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    with pytest.raises(UptrainError, match="empty"):
        recipe.run(cfg(setup, tmp_path, "x", data=[str(empty)]))
    with pytest.raises(UptrainError, match="longer than the model allows"):
        recipe.run(cfg(setup, tmp_path, "x", seq_len=4096))
    # a teacher with another tokenizer (other vocabulary)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = make_model("llama", 8, 8, vocab_size=400)
    path = tmp_path / "other"
    other.save_pretrained(str(path))
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(path))
    with pytest.raises(UptrainError, match="different tokenizer"):
        recipe.run(cfg(setup, tmp_path, "x", teacher=str(path), kd=1.0))
    with pytest.raises(UptrainError, match="Unknown recipe"):
        UptrainConfig.load("nope")
    with pytest.raises(UptrainError, match="Unknown setting"):
        UptrainConfig.load("distill", {"learning_rate": 1})
    assert not (tmp_path / "x").exists()


def test_settings_are_typed_and_checked():
    from kvslim.recipes.uptrain import parse_overrides

    config = UptrainConfig.load("distill", parse_overrides(["lr=1e-4", "seq_len=256", "progress=false", "tokens=500K"]))
    assert config.lr == 1e-4 and config.seq_len == 256 and config.progress is False  # YAML reads 1e-4 as a string
    for bad, message in [({"seq_len": "abc"}, "seq_len must be an integer"), ({"lr": "fast"}, "lr must be a float"),
                         ({"tokens": 0}, "tokens must be a positive"), ({"lr": -1}, "lr must be positive"),
                         ({"warmup": 2}, "warmup must be between 0 and 1"), ({"micro_batch": 0}, "micro_batch"),
                         ({"train": "mlp"}, "valid: all, attention, lora"), ({"seq_len": 2.5}, "integer")]:
        with pytest.raises(UptrainError, match=message):
            UptrainConfig.load("distill", bad)


def test_cli_uptrain(setup, tmp_path):
    from typer.testing import CliRunner

    from kvslim.cli import app

    r = CliRunner().invoke(app, ["uptrain", setup["model"], "-o", str(tmp_path / "cli"), "--teacher", setup["teacher"],
                                 "--recipe", "distill", "--data", setup["data"][0], "--tokens", "512",
                                 "--set", "seq_len=32", "micro_batch=4", "--set", "eval_rows=4", "lr=1e-4",
                                 "--set", "progress=false"])  # the README's --set a=1 b=2, and --set repeated
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli" / "kvslim_uptrain.json").read_text())["config"]["lr"] == 1e-4
    for args, message in [(["--set", "seq_len=abc"], "seq_len must be an integer"), (["--tokens", "0"], "tokens must"),
                          (["--set", "lr=1e-4", "stray"], "Unexpected argument(s) stray")]:
        bad = CliRunner().invoke(app, ["uptrain", setup["model"], "-o", str(tmp_path / "bad"), "--data",
                                       setup["data"][0], *args])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
        assert not (tmp_path / "bad").exists()
    assert "held-out perplexity" in r.output and load(tmp_path / "cli").config.num_key_value_heads == 1
    assert collate([{"a": torch.zeros(2)}, {"a": torch.ones(2)}])["a"].shape == (2, 2)


def test_tensorboard_logging_and_bad_tracker(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe.run(cfg(setup, tmp_path, "tb", tokens=128 * 4, report_to="tensorboard", eval_every=2))
    events = list((tmp_path / "tb.runs").rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"lm", "total", "eval_ppl"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("lm")] == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "tb" / "kvslim_uptrain.json").read_text())
    assert summary["evaluations"][0]["tokens"] == 0  # the converted model before training
    with pytest.raises(UptrainError, match="report_to"):
        recipe.run(cfg(setup, tmp_path, "bad", tokens=128, report_to="mlflowz"))


def _one_adapter_per_kind():
    from kvslim.convert import get_adapter, supported_model_types

    seen, cases = set(), []
    for model_type in supported_model_types():
        adapter = get_adapter(model_type)
        if adapter.name not in seen:
            seen.add(adapter.name)
            cases.append(model_type)
    return cases


@pytest.mark.parametrize("model_type", _one_adapter_per_kind())
def test_attention_only_and_lora_training_find_every_architectures_attention(model_type, save_model, tmp_path,
                                                                              text_file):
    import kvslim
    from kvslim.convert import get_adapter
    from kvslim.convert.adapters import attention_module_names

    if get_adapter(model_type).model_kind != "causal":
        pytest.skip(f"{model_type} is an encoder: uptraining trains causal language models")
    src = save_model(registered_source(model_type), model_type)
    kvslim.convert(str(src), tmp_path / "student", to="gqa", kv_heads=2, method="mean", progress=False)
    base = dict(model=str(tmp_path / "student"), data=[str(text_file)], seq_len=32, micro_batch=2, eval_rows=2,
                progress=False, tokens=64 * 2, lr=1e-2, eval_every=1000, checkpoint_every=1000)
    before = load(tmp_path / "student").state_dict()
    attention = tuple(f"{n}." for n in attention_module_names(load(tmp_path / "student")))
    recipe.run(UptrainConfig(**base, output=str(tmp_path / "attn"), train="attention"))
    after = load(tmp_path / "attn").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(attention) for k in changed), sorted(changed)[:5]
    recipe.run(UptrainConfig(**base, output=str(tmp_path / "lora"), train="lora", teacher=str(src), kd=1.0))
    merged = load(tmp_path / "lora").state_dict()
    assert not any("lora" in k for k in merged)
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all(k.startswith(attention) for k in changed), sorted(changed)[:5]


def test_lora_without_peft_names_the_extra(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(UptrainError, match=r"pip install 'kvslim\[peft\]'"):
        recipe.run(cfg(setup, tmp_path, "nopeft", train="lora", tokens=128))
