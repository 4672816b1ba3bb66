"""Which Transformers kvslim supports, and the one place that bridges its releases.

The supported range is the one pyproject.toml declares (read back from the installed package's
metadata, so it is written once), and it is the range CI tests: the lower bound is CI's lock
(`.ci/lock.txt`), the upper end the newest release the registry serves. Outside it kvslim still
runs, but says so once. A Transformers name that kvslim imports and the installed release lacks
becomes an error that names the installed version and the supported range.

The hosted modeling files carry their own bridge for the cache argument (`takes_cache` in
modeling/hosted/kvslim_attention.py), because they are loaded without kvslim.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

log = logging.getLogger("kvslim")


def transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def supported_transformers() -> str:
    """The declared requirement, e.g. '>=5.16.1,<6' ('' when kvslim runs from an uninstalled tree)."""
    try:
        requires = importlib.metadata.requires("kvslim") or []
    except importlib.metadata.PackageNotFoundError:
        return ""
    for text in requires:
        requirement = Requirement(text)
        if requirement.name == "transformers" and requirement.marker is None:
            # lower bound first, as people write it (metadata may store "<6,>=5.16.1")
            return ",".join(sorted(map(str, requirement.specifier), key=lambda s: s.startswith("<")))
    return ""


def in_supported_range(version: str | None = None) -> bool:
    spec = supported_transformers()
    version = version or transformers_version()
    return not spec or (version != "not installed" and SpecifierSet(spec).contains(version, prereleases=True))


@functools.cache
def check_transformers() -> bool:
    """Warn once when the installed Transformers is outside the tested range. True when inside."""
    if in_supported_range():
        return True
    log.warning("kvslim: transformers %s is installed; kvslim is tested with transformers%s. "
                "Results may be wrong: install a tested release (pip install 'transformers%s').",
                transformers_version(), supported_transformers(), supported_transformers())
    return False


def missing_symbol_message(error: ImportError) -> str | None:
    """For an ImportError raised inside Transformers or by a name kvslim imports from it, a message
    naming the installed version and the supported range; None for unrelated import errors."""
    name = getattr(error, "name", None) or ""
    text = str(error)
    if not (name.startswith("transformers") or "transformers" in text):
        return None
    spec = supported_transformers() or " (see pyproject.toml)"
    return (f"{text}. kvslim needs a Transformers release it was tested with: transformers{spec}; "
            f"installed: {transformers_version()}. Install one with: pip install 'transformers{spec}'.")


def cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache under: `cache` since Transformers 5.24,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(outputs):
    """The cache a model output carries, under either field name (`cache` since 5.24)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


@functools.cache
def http_errors() -> tuple[type[BaseException], ...]:
    """Network failures of the HTTP client huggingface_hub uses: httpx in 1.x, httpx2 since 2.0
    (neither error derives from OSError)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
