"""`kvslim push` / `--push-to-hub` against a local Hub-compatible server (HF_ENDPOINT on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common import make_model
from hub_server import FakeHub

TOKEN = "hf_kvslimTestToken0123456789abcdefXYZ"


def kvslim(*args, endpoint: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(cwd / "hf-home"), TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "kvslim.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture
def converted(save_model, tmp_path, text_file):
    import kvslim

    src = save_model(make_model("llama", heads=4, kv_heads=4), "src")
    out = tmp_path / "mqa"
    kvslim.convert(str(src), str(out), to="mqa", calib_data=str(text_file), calib_samples=8, calib_seq_len=32,
                   refine_steps=0, progress=False)
    return src, out


def no_token_anywhere(*texts: str, folder=None) -> None:
    for text in texts:
        assert TOKEN not in text
    if folder is not None:
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_push_uploads_everything_with_a_card(converted, tmp_path, text_file):
    from huggingface_hub import ModelCard

    src, out = converted
    with FakeHub(TOKEN) as hub:
        proc = kvslim("push", out, "--repo-id", "alice/tiny-mqa", "--private", "--eval-data", text_file,
                      "--window", 32, "--max-tokens", 512, endpoint=hub.endpoint, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert "alice/tiny-mqa" in hub.repos and hub.repos["alice/tiny-mqa"]["private"]
        files = hub.files("alice/tiny-mqa")
    local = {p.name for p in out.iterdir()}
    assert local <= set(files), local - set(files)  # every file of the output, the card included
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model is None  # a local source path is not a Hub id
    assert {"kvslim", "mqa"} <= set(card.data.tags) and card.data.library_name == "transformers"
    text = card.text
    record = json.loads((out / "kvslim_conversion.json").read_text())
    assert f"{record['kv_heads_before']} -> 1" in text and "aware" in text  # the recipe
    after = record["kv_bytes_per_token_after"]
    assert (f"{after / 1024:,.1f} KiB" if after >= 1024 else f"{after:,} B") in text
    assert "| this model |" in text and "| source `" in text  # perplexity before/after
    assert "AutoModelForCausalLM.from_pretrained(repo)" in text and "trust_remote_code" not in text
    no_token_anywhere(proc.stdout, proc.stderr, folder=out)


def test_push_to_branch_and_hub_id_source_becomes_base_model(converted, tmp_path):
    from huggingface_hub import ModelCard

    _, out = converted
    record = json.loads((out / "kvslim_conversion.json").read_text())
    record["source"] = "someorg/tiny-llama"  # as if converted from the Hub
    (out / "kvslim_conversion.json").write_text(json.dumps(record))
    with FakeHub(TOKEN) as hub:
        proc = kvslim("push", out, "--repo-id", "alice/tiny-mqa", "--revision", "v1", endpoint=hub.endpoint, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        card = ModelCard(hub.files("alice/tiny-mqa", "v1")["README.md"].decode())
    assert card.data.base_model == "someorg/tiny-llama"


def test_convert_push_to_hub(save_model, tmp_path, text_file):
    src = save_model(make_model("llama", heads=4, kv_heads=2), "src")
    with FakeHub(TOKEN) as hub:
        proc = kvslim("convert", src, "-o", tmp_path / "out", "--to", "mqa", "--calib-data", text_file,
                      "--calib-samples", 8, "--calib-seq-len", 32, "--refine-steps", 0,
                      "--push-to-hub", "bob/tiny", endpoint=hub.endpoint, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert {"config.json", "model.safetensors", "README.md", "kvslim_conversion.json"} <= set(hub.files("bob/tiny"))
    no_token_anywhere(proc.stdout, proc.stderr, folder=tmp_path / "out")


def test_failed_upload_is_reported_clearly(converted, tmp_path):
    _, out = converted
    with FakeHub(TOKEN) as hub:
        hub.fail_commits = True
        proc = kvslim("push", out, "--repo-id", "alice/tiny-mqa", endpoint=hub.endpoint, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Uploading to 'alice/tiny-mqa' failed (HTTP 500)" in proc.stderr
    assert "Traceback" not in proc.stderr
    no_token_anywhere(proc.stdout, proc.stderr, folder=out)
    before = sorted(p.name for p in out.iterdir())
    assert "README.md" not in before  # the card is written only into what is uploaded
    unreachable = kvslim("push", out, "--repo-id", "alice/tiny-mqa", endpoint="http://127.0.0.1:9", cwd=tmp_path)
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr, unreachable.stderr
    assert "Uploading to 'alice/tiny-mqa' failed" in unreachable.stderr and "HF_ENDPOINT" in unreachable.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_wrong_token_and_bad_input(converted, tmp_path):
    _, out = converted
    with FakeHub("hf_someoneElsesToken") as hub:
        proc = kvslim("push", out, "--repo-id", "alice/tiny-mqa", endpoint=hub.endpoint, cwd=tmp_path)
        assert proc.returncode == 2 and "HTTP 401" in proc.stderr and "hf auth login" in proc.stderr
        no_token_anywhere(proc.stdout, proc.stderr)
        bad = kvslim("push", out, "--repo-id", "no spaces/allowed!", endpoint=hub.endpoint, cwd=tmp_path)
        assert bad.returncode == 2 and "Invalid --repo-id" in bad.stderr
        empty = tmp_path / "empty"
        empty.mkdir()
        missing = kvslim("push", empty, "--repo-id", "alice/x", endpoint=hub.endpoint, cwd=tmp_path)
        assert missing.returncode == 2 and "no *.safetensors" in missing.stderr
        assert not hub.repos  # nothing was created for bad input


def test_user_readme_is_kept(converted, tmp_path):
    _, out = converted
    (out / "README.md").write_text("# my own card\n")
    with FakeHub(TOKEN) as hub:
        proc = kvslim("push", out, "--repo-id", "alice/tiny-mqa", endpoint=hub.endpoint, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert hub.files("alice/tiny-mqa")["README.md"] == b"# my own card\n"


def test_card_for_a_hosted_mla_model(save_model, tmp_path, text_file):
    from kvslim.recipes.publish import render_card

    from common import gpt2

    src = save_model(gpt2(), "gpt2")
    out = tmp_path / "mla"
    kvslim_convert = __import__("kvslim").convert
    kvslim_convert(str(src), str(out), to="mla", kv_budget=0.25, calib_data=str(text_file), calib_samples=8,
                   calib_seq_len=32, progress=False)
    card = render_card(out, "me/gpt2-mla")
    assert card.data.pipeline_tag == "text-generation"  # GPT-2's causal LM class is an LMHeadModel
    text = card.content
    assert "latent of rank 32" in text and "trust_remote_code=True" in text and "| source | 1.0 KiB |" in text
    assert "RoPE frequencies kept" not in text and "http" not in text.split("---")[2]


def test_card_never_publishes_a_local_path_and_finds_the_hub_id(converted, tmp_path):
    from kvslim.recipes.publish import hub_id_of, render_card

    src, out = converted
    text = render_card(out, "me/tiny").content
    assert str(src) not in text and str(tmp_path) not in text and "a local model (`src`)" in text
    assert hub_id_of("/home/u/.cache/huggingface/hub/models--someorg--tiny-llama/snapshots/abc", {}) == "someorg/tiny-llama"
    assert hub_id_of("someorg/tiny-llama", {}) == "someorg/tiny-llama"
    assert hub_id_of(str(src), {"_name_or_path": "someorg/tiny-llama"}) == "someorg/tiny-llama"
    assert hub_id_of(str(src), {"_name_or_path": str(src)}) is None
    card = render_card(out, "me/tiny", base_model="someorg/tiny-llama")
    assert card.data.base_model == "someorg/tiny-llama" and "`someorg/tiny-llama` converted by kvslim" in card.content


def test_cli_version_short_help_and_one_evaluation_default():
    from typer.testing import CliRunner

    from kvslim import __version__
    from kvslim.cli import app
    from kvslim.recipes.perplexity import EVAL_TOKENS, EVAL_WINDOW

    runner = CliRunner()
    assert __version__ in runner.invoke(app, ["--version"]).output
    top = runner.invoke(app, ["-h"])
    assert top.exit_code == 0 and "MLA" in top.output
    for command in ("eval", "report", "push"):
        page = runner.invoke(app, [command, "-h"]).output
        assert f"[default: {EVAL_WINDOW}]" in page and f"[default: {EVAL_TOKENS}]" in page, command
    assert "--overwrite <bool>" not in runner.invoke(app, ["convert", "-h"]).output
    assert "resume" in runner.invoke(app, ["uptrain", "-h"]).output
