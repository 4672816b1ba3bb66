"""Tiny random models and a tokenizer built in-test: the suite never touches the Hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import build_tokenizer, sample_text  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(sample_text(8000, seed=7))
    return path


@pytest.fixture
def save_model(tmp_path, tokenizer_dir):
    """save_model(model, name) -> directory with weights, config and tokenizer."""
    import shutil

    def _save(model, name: str = "src"):
        path = tmp_path / name
        model.save_pretrained(str(path))
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, path / f.name)
        return path

    return _save
