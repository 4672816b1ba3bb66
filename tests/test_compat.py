"""kvslim.compat: the declared Transformers range, its one-time warning, missing-symbol errors, and
the cache-argument bridge the hosted modeling files carry."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import kvslim.compat as compat
from kvslim.modeling.hosted.kvslim_attention import CACHE_ARGUMENT_NAMES, takes_cache


def test_supported_range_is_the_declared_requirement_and_holds_the_installed_release():
    spec = compat.supported_transformers()
    assert spec.startswith(">=") and "<" in spec  # both ends declared in pyproject.toml
    assert compat.in_supported_range()  # CI installs releases inside it
    assert not compat.in_supported_range("4.57.6") and not compat.in_supported_range("99.0")


def test_outside_the_range_warns_once_naming_the_range(monkeypatch, caplog):
    compat.check_transformers.cache_clear()
    monkeypatch.setattr(compat, "transformers_version", lambda: "4.40.0")
    with caplog.at_level(logging.WARNING, logger="kvslim"):
        assert compat.check_transformers() is False
        assert compat.check_transformers() is False
    warnings = [r.getMessage() for r in caplog.records if "tested with" in r.getMessage()]
    assert len(warnings) == 1 and "4.40.0" in warnings[0] and compat.supported_transformers() in warnings[0]
    compat.check_transformers.cache_clear()


def test_missing_transformers_name_becomes_an_error_naming_version_and_range():
    err = ImportError("cannot import name 'LlamaAttention' from 'transformers.models.llama.modeling_llama'",
                      name="transformers.models.llama.modeling_llama")
    message = compat.missing_symbol_message(err)
    assert compat.transformers_version() in message and compat.supported_transformers() in message
    assert compat.missing_symbol_message(ImportError("No module named 'peft'", name="peft")) is None


def test_cli_reports_a_missing_transformers_name_without_a_traceback(tmp_path):
    code = """
import functools, sys
import kvslim.cli as cli
command = cli.app.registered_commands[0]
@functools.wraps(command.callback)  # same options, so typer parses the command line as usual
def broken(*args, **kwargs):
    raise ImportError("cannot import name 'Gone' from 'transformers.cache_utils'", name="transformers.cache_utils")
command.callback = broken
sys.argv = ["kvslim", "convert", "x", "-o", "y"]
cli.main()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Gone" in proc.stderr
    assert compat.supported_transformers() in proc.stderr and compat.transformers_version() in proc.stderr


@pytest.mark.parametrize("name", CACHE_ARGUMENT_NAMES)
def test_takes_cache_accepts_every_name_a_release_has_used(name):
    class Attention(torch.nn.Module):
        @takes_cache
        def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
            return cache, kwargs

    marker = object()
    got, rest = Attention()(torch.zeros(1), attention_mask=None, **{name: marker}, use_cache=True)
    assert got is marker and rest == {"use_cache": True}  # no leftover alias reaches the body
    assert Attention()(torch.zeros(1))[0] is None


def test_cache_argument_matches_the_installed_release():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    import inspect

    assert compat.cache_argument(model) in inspect.signature(model.forward).parameters
