"""End-to-end conversions through files: lazy reading, sharded atomic writing, plain reload."""

from __future__ import annotations

import json

import pytest
import torch
from test_gqa_math import IDS, convert_in_memory

import kvslim
from kvslim.convert import RECORD_FILE

from common import load, logits, make_model

CALIB = dict(calib_samples=8, calib_seq_len=32, refine_steps=0, progress=False)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_mean_conversion_reloads_plain_and_matches_in_memory(model_type, save_model, tmp_path):
    model = make_model(model_type, 8, 4)
    src = save_model(model)
    record = kvslim.convert(str(src), tmp_path / "out", to="gqa", kv_heads=2, method="mean", progress=False)
    out = load(tmp_path / "out")  # plain Transformers, no kvslim involved in loading
    assert type(out).__name__ == type(model).__name__
    assert out.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(out, IDS), logits(convert_in_memory(model, 2, "mean"), IDS), rtol=0, atol=1e-5)
    assert record.kv_bytes_per_token_after * 2 == record.kv_bytes_per_token_before


def test_gqa_to_mha_and_identity_are_exact(save_model, tmp_path):
    model = make_model("qwen2", 8, 2)
    src = save_model(model)
    kvslim.convert(str(src), tmp_path / "mha", to="mha", progress=False)
    kvslim.convert(str(src), tmp_path / "same", to="gqa", kv_heads=2, progress=False)
    for name in ("mha", "same"):
        torch.testing.assert_close(logits(load(tmp_path / name), IDS), logits(model, IDS), rtol=0, atol=1e-5)
    assert load(tmp_path / "mha").config.num_key_value_heads == 8


def test_output_is_a_complete_model_directory(save_model, tmp_path, text_file):
    src = save_model(make_model("llama", 8, 8))
    record = kvslim.convert(str(src), tmp_path / "out", to="mqa", calib_data=str(text_file), **CALIB)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", RECORD_FILE} <= files
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1
    assert config["kvslim"]["kv_heads_before"] == 8 and config["kvslim"]["kv_heads_after"] == 1
    saved = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert saved["method"] == "aware" and saved["calibration"]["samples"] == 8
    assert record.kv_bytes_per_token_before == 2 * 2 * 8 * 16 * 4  # layers * heads * head_dim * fp32
    assert record.kv_bytes_per_token_after == 2 * 2 * 1 * 16 * 4
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))("the time")["input_ids"]
    assert not [p for p in tmp_path.iterdir() if "kvslim-tmp" in p.name]


def test_sharded_output_reloads_identically(save_model, tmp_path):
    model = make_model("llama", 8, 4)
    src = save_model(model)
    kvslim.convert(str(src), tmp_path / "big", to="gqa", kv_heads=2, method="mean", progress=False)
    kvslim.convert(str(src), tmp_path / "sharded", to="gqa", kv_heads=2, method="mean",
                   max_shard_bytes=40_000, progress=False)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    # a sharded source is read lazily too
    kvslim.convert(str(tmp_path / "sharded"), tmp_path / "again", to="gqa", kv_heads=2, method="mean", progress=False)
    ref = logits(load(tmp_path / "big"), IDS)
    for name in ("sharded", "again"):
        torch.testing.assert_close(logits(load(tmp_path / name), IDS), ref, rtol=0, atol=0)


def _rel_err(a, b) -> float:
    return float((a - b).pow(2).mean() / b.var())


def test_aware_with_calibration_and_refinement_beats_mean(save_model, tmp_path, text_file):
    from kvslim.recipes.perplexity import load_causal_lm, tokenize_corpus

    model = make_model("llama", 8, 8, seed=5)
    src = save_model(model)
    _, tok = load_causal_lm(str(src))
    ids = torch.tensor(tokenize_corpus([text_file.read_text()], tok, 4 * 48)).view(4, 48)
    ref = logits(model, ids)
    errs = {}
    for name, kwargs in {"mean": dict(method="mean"), "aware": dict(refine_steps=0),
                         "refined": dict(refine_steps=40)}.items():
        kvslim.convert(str(src), tmp_path / name, to="mqa", calib_data=str(text_file), **{**CALIB, **kwargs})
        errs[name] = _rel_err(logits(load(tmp_path / name), ids), ref)
    assert errs["aware"] < errs["mean"] and errs["refined"] < errs["aware"], errs
    record = json.loads((tmp_path / "refined" / RECORD_FILE).read_text())
    assert len(record["refinement"]["relative_output_error"]) == 2


def test_qk_norm_conversion_is_recorded_and_runs(save_model, tmp_path, text_file):
    model = make_model("qwen3", 8, 4)
    src = save_model(model)
    record = kvslim.convert(str(src), tmp_path / "out", to="gqa", kv_heads=2, calib_data=str(text_file), **CALIB)
    assert any("q/k-norm" in note for note in record.notes)
    out = load(tmp_path / "out")
    assert torch.isfinite(logits(out, IDS)).all()
    assert out.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_regrouping_is_recorded(save_model, tmp_path, text_file):
    src = save_model(make_model("llama", 8, 8))
    record = kvslim.convert(str(src), tmp_path / "out", to="gqa", kv_heads=4, calib_data=str(text_file), **CALIB)
    assert record.regrouped and len(record.groups) == 2
    for groups in record.groups:
        assert sorted(h for g in groups for h in g) == list(range(8)) and all(len(g) == 2 for g in groups)


def test_bfloat16_output(save_model, tmp_path):
    src = save_model(make_model("llama", 8, 4))
    record = kvslim.convert(str(src), tmp_path / "out", to="mqa", method="mean", dtype="bfloat16", progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_dtype() == "BF16"
    assert record.kv_bytes_per_token_after == 2 * 2 * 1 * 16 * 2


def test_streamed_shards_are_valid_safetensors_for_every_dtype(tmp_path):
    from safetensors import safe_open

    from kvslim.convert.writer import SAFETENSORS_DTYPES, ShardedWriter

    tensors = {f"t.{str(dtype).split('.')[-1]}": (torch.arange(24) % 7).to(dtype).reshape(2, 3, 4)
               for dtype in SAFETENSORS_DTYPES}
    tensors["empty"] = torch.zeros(0, 5)
    tensors["scalar"] = torch.tensor(3.5)
    writer = ShardedWriter(tmp_path, max_shard_bytes=200)  # several shards
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert len(files) > 1 and not list(tmp_path.glob("*.data"))
    seen = {}
    for f in files:
        with safe_open(str(tmp_path / f), framework="pt") as handle:
            seen.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert seen.keys() == tensors.keys()
    for name, t in tensors.items():
        same = torch.equal(seen[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        assert seen[name].dtype == t.dtype and seen[name].shape == t.shape and same, name


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_stored_tensors_are_copied_byte_for_byte_between_written_ones(tmp_path, monkeypatch, kernel_copy):
    """Unchanged source tensors go out as their stored bytes (copy_file_range, or a buffered copy
    where the kernel cannot), in order with tensors written from memory, across shards; a source
    that ends early is a clear error."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvslim.convert.errors import ConversionError
    from kvslim.convert.sources import SafetensorsReader
    from kvslim.convert.writer import ShardedWriter

    if not kernel_copy:
        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    src = {"big": torch.randn(64, 33), "ids": torch.arange(9), "half": torch.randn(5, 7).to(torch.bfloat16)}
    save_file(src, str(tmp_path / "src.safetensors"))
    reader = SafetensorsReader([tmp_path / "src.safetensors"])
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, max_shard_bytes=8000)  # "big" fills a shard of its own
    made = torch.full((3, 3), 2.5)
    writer.add("made", made)
    for name in src:
        writer.add(name, reader.stored(name))
    writer.add("made.after", made * 2)
    files = writer.close()
    got = {}
    for f in files:
        with safe_open(str(out / f), framework="pt") as handle:
            got.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert len(files) > 1
    for name, t in {**src, "made": made, "made.after": made * 2}.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name

    odd = {"u16": torch.zeros(4, dtype=torch.uint16), "f": torch.ones(2)}  # a dtype the output cannot name
    save_file(odd, str(tmp_path / "odd.safetensors"))
    odd_reader = SafetensorsReader([tmp_path / "odd.safetensors"])
    assert odd_reader.stored("u16") is None and odd_reader.stored("f").dtype == torch.float32

    stored = reader.stored("big")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "src.safetensors").read_bytes()[:stored.offset + 100])
    writer = ShardedWriter(tmp_path / "out2")
    (tmp_path / "out2").mkdir()
    with pytest.raises(ConversionError, match="truncated"):
        writer.add("big", type(stored)(truncated, stored.offset, stored.nbytes, stored.dtype, stored.shape))


def test_a_name_written_twice_keeps_its_last_tensor(tmp_path):
    from safetensors.torch import load_file

    from kvslim.convert.writer import ShardedWriter

    writer = ShardedWriter(tmp_path)
    writer.add("a", torch.zeros(3))
    writer.add("b", torch.ones(2))
    writer.add("a", torch.full((4,), 7.0))  # a later value for the same tensor replaces the first
    writer.close()
    got = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(got["a"], torch.full((4,), 7.0)) and torch.equal(got["b"], torch.ones(2))


def test_a_shard_is_written_once_behind_its_reserved_header_and_rewritten_when_the_header_outgrows_it(
        tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from kvslim.convert import writer as w

    tensors = {f"layer.{i}.weight": torch.randn(3, 5) * i for i in range(40)}
    for reserve, name in ((w.HEADER_RESERVE, "once"), (256, "rewritten")):  # 40 entries need ~2.8 KB
        monkeypatch.setattr(w, "HEADER_RESERVE", reserve)
        out = tmp_path / name
        out.mkdir()
        writer = w.ShardedWriter(out)
        for k, t in tensors.items():
            writer.add(k, t)
        writer.close()
        path = out / "model.safetensors"
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        assert (header_len == reserve) == (name == "once")
        assert path.stat().st_size == 8 + header_len + 40 * 15 * 4 and not list(out.glob("*.data"))
        got = load_file(str(path))
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], t) for k, t in tensors.items())


def test_refinement_step_size_defaults_by_method_and_is_recorded(save_model, tmp_path, text_file):
    from kvslim.convert.refine import REFINE_LR, REFINE_LR_HEAD_MERGE

    src = save_model(make_model("llama", 4, 4, seed=2))
    calib = dict(calib_data=str(text_file), **{**CALIB, "refine_steps": 2})
    for name, kwargs, lr in [("merged", dict(to="mqa"), REFINE_LR_HEAD_MERGE),
                             ("latent", dict(to="mla", kv_budget=0.5), REFINE_LR),
                             ("given", dict(to="mqa", refine_lr=1e-3), 1e-3)]:
        record = kvslim.convert(str(src), tmp_path / name, **kwargs, **calib).to_dict()
        assert record["refinement"]["lr"] == lr, name
    assert REFINE_LR_HEAD_MERGE != REFINE_LR
    with pytest.raises(kvslim.ConversionError, match="refine_lr 0 must be a positive step size"):
        kvslim.convert(str(src), tmp_path / "bad", to="mqa", refine_lr=0, **calib)
    assert not (tmp_path / "bad").exists()


def test_default_refinement_takes_what_fits_its_time_share_between_a_floor_and_a_most_passes():
    from kvslim.convert.refine import REFINE_EFFORT, REFINE_EFFORT_HEAD_MERGE, Effort, TimeBudget

    effort = Effort(512, 1e-2, time_share=1.8, min_steps=25, max_epochs=8)
    assert effort.step_range(32 * 512, 512) == (25, 256)
    assert effort.step_tokens(256) == 512 and effort.step_range(128 * 256, 256) == (25, 512)
    # windows longer than a step's tokens: one window a step, counted whole
    assert effort.step_tokens(2048) == 2048 and effort.step_range(8 * 2048, 2048) == (25, 64)
    assert effort.step_range(8 * 16, 16) == (25, 25)  # tiny calibration sets: the floor
    assert Effort(2048, 2e-2, steps=300).step_range(10**6, 512) == (300, 300)
    budget = TimeBudget(10.0, 25, 256)
    assert budget.steps(0.05, spent=2.0) == 160  # (10 - 2) / 0.05
    assert budget.steps(0.001, 2.0) == 256 and budget.steps(1.0, 2.0) == 25 == budget.steps(1.0, 20.0)
    for levels in (REFINE_EFFORT, REFINE_EFFORT_HEAD_MERGE):
        assert levels["max"].step_range(10**6, 512) == levels["max"].step_range(10, 512) == (300, 300)
        assert levels["default"].batch_tokens < levels["max"].batch_tokens and levels["default"].time_share
    assert budget.steps(0.05, 2.0, done=40) == 200  # the steps taken come on top of what still fits


@pytest.mark.parametrize("stall", [0.0, 1.0])
def test_a_stall_during_the_first_steps_does_not_set_the_step_count(monkeypatch, stall):
    """A fake clock that moves only when the layer computes (10 ms a call): one call that stalls
    for `stall` seconds among the first timed steps costs the count only the stall's own time: the
    pace leaves stalls out, and it is set again after the first ten steps."""
    import time

    from torch import nn

    from kvslim.convert.refine import TimeBudget, refine_attention

    clock, calls = [0.0], [0]

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8, bias=False)

        def forward(self, hidden_states, **_):
            calls[0] += 1
            clock[0] += 0.01 + (stall if calls[0] == 2 + 6 else 0.0)  # after the 2-batch guard pass: step 6
            return self.proj(hidden_states)

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    torch.manual_seed(0)
    source, target = nn.Linear(8, 8, bias=False), Layer()
    inputs = [torch.randn(2, 4, 8) for _ in range(8)]
    with torch.no_grad():
        wanted = [source(x) for x in inputs]
    fit = refine_attention(target, wanted, inputs, {}, TimeBudget(3.0, 25, 1000), lr=1e-2, batch_tokens=4)
    # 3 s less the guard pass (0.02 s) and the stall, at 10 ms a step
    assert abs(fit.steps - (298 - 100 * stall)) <= 2, fit.steps


def test_the_pace_is_the_mean_step_without_stalls():
    from kvslim.convert.refine import TimeBudget

    uneven = [0.01, 0.01, 0.03] * 5  # the median is 0.01
    assert TimeBudget.pace(uneven) == pytest.approx(0.05 / 3)  # uneven steps: their mean
    assert TimeBudget.pace(uneven + [1.0]) == pytest.approx(0.05 / 3)  # a stall: left out


def test_the_default_sets_one_step_count_on_the_first_layer_and_records_its_budget(save_model, tmp_path, text_file):
    from kvslim.convert.refine import REFINE_EFFORT

    src = save_model(make_model("llama", 4, 4, seed=5))
    record = kvslim.convert(str(src), tmp_path / "out", to="mla", kv_budget=0.5, calib_data=str(text_file),
                            calib_samples=32, calib_seq_len=64, progress=False).to_dict()
    refinement = record["refinement"]
    fewest, most = REFINE_EFFORT["default"].step_range(32 * 64, 64)
    assert fewest <= refinement["steps"] <= most and refinement["quality"] == "default"
    assert refinement["time_share"] == REFINE_EFFORT["default"].time_share
    assert 0 < refinement["closed_form_estimate_s"] < record["seconds"]
    assert len(refinement["relative_output_error"]) == 2


def test_a_refinement_that_does_not_help_leaves_the_closed_form_bit_for_bit(save_model, tmp_path, text_file):
    from safetensors.torch import load_file

    src = save_model(make_model("llama", 4, 4, seed=2))
    for name, extra in [("closed", dict(refine_steps=0)), ("diverged", dict(refine_steps=3, refine_lr=1e4))]:
        kvslim.convert(str(src), tmp_path / name, to="mla", kv_budget=0.5, calib_data=str(text_file),
                       **{**CALIB, **extra})
    closed, diverged = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("closed", "diverged"))
    assert closed.keys() == diverged.keys()
    for key in closed:
        assert torch.equal(closed[key], diverged[key]), key
    record = json.loads((tmp_path / "diverged" / RECORD_FILE).read_text())
    assert len(record["refinement"]["relative_output_error"]) == 2


@pytest.mark.parametrize("target, dtype", [("mla", torch.float32), ("mla", torch.bfloat16), ("mqa", torch.bfloat16)])
def test_the_stream_takes_over_refinement_outputs_and_writes_what_it_would_compute(
        target, dtype, save_model, tmp_path, text_file, monkeypatch):
    """The calibration stream advances through a refined layer with the outputs of refinement's
    final error pass, which describe the weights as written (rounded to the checkpoint's dtype):
    the conversion is the same, bit for bit, as one that computes the attention again."""
    from safetensors.torch import load_file

    from kvslim.convert import calibration

    src = save_model(make_model("llama", 4, 4, seed=3).to(dtype))
    options = dict(to=target, calib_data=str(text_file), **{**CALIB, "refine_steps": 5},
                   **({"kv_budget": 0.5} if target == "mla" else {}))
    replayed = []
    forward = calibration._Replay.forward

    def counted(self, *args, **kwargs):
        replayed.append(forward(self, *args, **kwargs))
        return replayed[-1]

    monkeypatch.setattr(calibration._Replay, "forward", counted)
    kvslim.convert(str(src), tmp_path / "replayed", **options)
    assert len(replayed) == 2  # each layer's one calibration batch (256 tokens), none computed again

    advance = calibration.LayerwiseRunner.advance
    monkeypatch.setattr(calibration.LayerwiseRunner, "advance",
                        lambda self, *a, replay=None, **k: advance(self, *a, **k))
    kvslim.convert(str(src), tmp_path / "computed", **options)
    replayed_weights, computed = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("replayed", "computed"))
    assert replayed_weights.keys() == computed.keys()
    for key in computed:
        assert torch.equal(replayed_weights[key], computed[key]), key
    records = [json.loads((tmp_path / n / RECORD_FILE).read_text())["refinement"] for n in ("replayed", "computed")]
    assert records[0]["relative_output_error"] == records[1]["relative_output_error"]


def test_the_stream_computes_an_attention_whose_inputs_are_not_the_replayed_ones(save_model, text_file):
    from kvslim.convert.adapters import get_adapter
    from kvslim.convert.calibration import LayerwiseRunner, calibration_windows
    from kvslim.convert.sources import open_source

    src = open_source(str(save_model(make_model("llama", 4, 4, seed=4))), None)
    adapter = get_adapter("llama")
    ids, _ = calibration_windows(src, str(text_file), 4, 16)
    runner = LayerwiseRunner(src, ids, adapter=adapter)
    start = list(runner.hidden)
    inputs, call = runner.attention_inputs(0, adapter.attention_module)
    zeros = [(torch.zeros_like(x), None) for x in inputs]
    shifted = [x + 1 for x in inputs]
    used = (adapter.attention_module, list(inputs), list(zeros))
    runner.advance(0, None, {}, replay=used)
    replayed = runner.hidden  # the attention contributed nothing: the residual stream plus the MLP only
    assert all(x is None for x in used[1] + used[2])  # each batch let go once replayed
    runner.hidden = start
    runner.advance(0, None, {}, replay=(adapter.attention_module, shifted, list(zeros)))
    computed = runner.hidden
    runner.hidden = start
    runner.advance(0, None, {})
    torch.testing.assert_close(computed, runner.hidden, rtol=0, atol=0)
    assert not torch.allclose(replayed[0], computed[0])


def test_a_layer_pass_loads_each_projection_on_call_and_falls_back_where_a_module_reads_weights_directly(
        save_model, text_file):
    """Advancing the calibration stream holds one projection's weights at a time (7B: one MLP
    matrix instead of the whole float32 layer) with bit-identical outputs. A module that reads
    another's weights without calling it (MLA's absorbed attention does) would meet unloaded
    (meta) weights, on which some CPU ops silently return garbage: that pass loads the whole layer."""
    import torch.nn.functional as F

    from kvslim.convert.adapters import get_adapter
    from kvslim.convert.calibration import LayerwiseRunner, calibration_windows
    from kvslim.convert.sources import open_source

    source = open_source(str(save_model(make_model("llama"), "llama")), None)
    ids, _ = calibration_windows(source, str(text_file), 4, 32)
    runner = LayerwiseRunner(source, ids, adapter=get_adapter("llama"))
    layer = runner.layers[0]

    def outputs(loaded):
        return [runner._call(loaded, 0, h) for h in runner.hidden]

    with runner.loaded_layer(0) as loaded:
        want = outputs(loaded)
    loaded_at_down_proj = []  # (this hook runs before the one that drops the weights again)
    hook = layer.mlp.down_proj.register_forward_hook(
        lambda m, a, o: loaded_at_down_proj.append([n for n, p in layer.named_parameters() if not p.is_meta]))
    got = runner._run_layer(0, outputs, release=True)
    hook.remove()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert loaded_at_down_proj[0] == ["mlp.down_proj.weight"]  # the projections before it went again

    mlp = layer.mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * F.linear(x, mlp.up_proj.weight))
    got = runner._run_layer(0, outputs, release=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(p.is_meta for p in layer.parameters())


def test_the_calibration_stream_starts_from_float32_embeddings_looked_up_in_the_stored_dtype(save_model, text_file):
    """The embedding table stays in the checkpoint's dtype while the first layer's inputs are
    captured (a 128K-vocabulary table is 2 GiB in float32), and the stream still starts from
    exactly the float32 embeddings."""
    from kvslim.convert.adapters import get_adapter
    from kvslim.convert.calibration import LayerwiseRunner, calibration_windows
    from kvslim.convert.sources import open_source

    model = make_model("llama").to(torch.bfloat16)
    source = open_source(str(save_model(model, "llama")), None)
    ids, _ = calibration_windows(source, str(text_file), 4, 32)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: seen.append(m.weight.dtype) if isinstance(m, torch.nn.Embedding) else None)
    try:
        runner = LayerwiseRunner(source, ids, adapter=get_adapter("llama"))
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    table = model.model.embed_tokens.weight.detach().float()
    got = torch.cat(runner.hidden)
    assert got.dtype == torch.float32 and torch.equal(got, table[ids])
    assert runner.base.embed_tokens.weight.is_meta  # and it goes after the capture


def test_lean_adam_follows_torch_adam_with_bfloat16_moments():
    """Refinement's Adam keeps its moments in bfloat16 (half the state of a 7B layer): over 30 steps of a
    noisy least-squares fit, with a slice smaller than the tensor so the sliced update runs, it stays
    within 1% of torch.optim.Adam's trajectory and fits as well."""
    from kvslim.convert.refine import LeanAdam

    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(256, 40, generator=g), torch.randn(256, 24, generator=g)
    start = torch.randn(40, 24, generator=g) * 0.1
    results = []
    for lean in (False, True):
        w = start.clone().requires_grad_(True)
        if lean:
            opt = LeanAdam(w, 0.05, (0.8, 0.95))
            opt.SLICE = 100  # 960 elements: ten slices
        else:
            opt = torch.optim.Adam([w], lr=0.05, betas=(0.8, 0.95))
        for i in range(30):
            loss = (x[i * 8:(i + 1) * 8] @ w - target[i * 8:(i + 1) * 8]).pow(2).mean()
            loss.backward()
            if lean:
                opt.step(w)
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert w.grad is None
        results.append(w.detach())
    torch_w, lean_w = results
    assert (lean_w - torch_w).norm() / (torch_w - start).norm() < 0.01
    fit = [(x @ r - target).pow(2).mean() for r in results]
    assert abs(fit[1] - fit[0]) < 0.01 * fit[0]
