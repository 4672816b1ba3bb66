"""The interface every conversion method implements, and the options all of them share.

The layerwise driver (convert/driver.py) owns everything around the math: reading the source,
calibration, refinement, writing and the record. A method owns the math of one target: it checks
its options against the source, says what the output's config is, and converts one layer's
attention weights at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import torch

from ..adapters import AttentionAdapter, AttentionLayout
from ..errors import ConversionError
from ..records import ConversionRecord
from ..refine import QUALITY_LEVELS, REFINE_EFFORT, REFINE_LR, REFINE_LR_HEAD_MERGE, REFINE_TIME_SHARE, Effort
from ..sources import CheckpointSource

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConversionError(f"Unknown dtype '{name}'; valid: auto, {', '.join(DTYPES)}.") from None


@dataclass(frozen=True)
class Settings:
    """What every conversion takes: where it reads and writes, and its calibration and refinement."""

    calib_data: str | None = None
    calib_samples: int = 128
    calib_seq_len: int = 512
    refine_steps: int | None = None  # None: the method's default at `quality`
    refine_lr: float | None = None  # None: the method's default
    quality: str = "default"  # refinement steps of a calibrated method: default or max
    dtype: str | None = None
    overwrite: bool = False
    revision: str | None = None
    device: str = "cpu"
    max_shard_bytes: int = 2 * 1024**3
    tokenizer: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise ConversionError("--calib-samples must be >= 1 and --calib-seq-len >= 2.")
        if self.refine_lr is not None and not self.refine_lr > 0:
            raise ConversionError(f"refine_lr {self.refine_lr} must be a positive step size (the defaults are "
                                  f"{REFINE_LR:g} for MLA and {REFINE_LR_HEAD_MERGE:g} for merged heads).")
        if self.refine_steps is not None and self.refine_steps < 0:
            raise ConversionError(f"--refine-steps {self.refine_steps} is negative; use 0 (closed form only) or more.")
        if self.quality not in QUALITY_LEVELS:
            raise ConversionError(f"--quality {self.quality!r} is not one of {', '.join(QUALITY_LEVELS)} "
                                  f"(default: steps of 512 tokens, as many as fit in {REFINE_TIME_SHARE:g}x the closed form's time; "
                                  "max: 300 steps of 2,048 tokens per layer).")
        parse_dtype(self.dtype)

    @property
    def out_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.dtype)


FLAGS = {"regroup": "--regroup/--no-regroup", "max_shard_bytes": "--max-shard-size"}


def flag(name: str) -> str:
    """How the CLI spells an option."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def option_names(options_class) -> list[str]:
    return [f.name for f in fields(options_class)]


@dataclass
class Job:
    """One conversion: the opened source, its architecture, and the shared settings."""

    source_id: str
    target: str
    src: CheckpointSource
    adapter: AttentionAdapter
    layout: AttentionLayout
    settings: Settings

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.settings.out_dtype or self.src.reader.dtype(self.adapter.required(0)[0])


@dataclass
class LayerOutput:
    """One converted layer, and how it goes into the output checkpoint.

    `attention`: the converted attention tensors (refined by the driver). `extra`: other tensors of
    the layer the target names differently (frozen during refinement, written first). Each source
    tensor of the layer is dropped when `drops(name)`, replaced where it stands by the converted
    tensor of the same name when `in_place` (same class: the checkpoint keeps its order), and
    copied otherwise; converted tensors not placed yet follow.
    """

    attention: dict[str, torch.Tensor]
    drops: Callable[[str], bool] = lambda name: False
    in_place: bool = False
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    call: dict | None = None  # the target layer's arguments when they differ from the source's
    frozen: tuple[str, ...] = ()  # attention parameters refinement leaves alone


class ConversionMethod:
    """Base of the conversion methods. Subclasses set `targets` and `Options` (a frozen dataclass
    validated in `__post_init__`) and implement the steps below; the driver calls them in order:
    `check`, `calibrates`, `output_config`, `prepare_layers`, `new_record`, then `convert_layer` per layer, `finish`."""

    targets: ClassVar[tuple[str, ...]]
    Options: ClassVar[type]

    def __init__(self, job: Job, options):
        self.job, self.options, self.target = job, options, job.target

    @classmethod
    def applies(cls, adapter: AttentionAdapter, config: Any) -> bool:
        """Whether this method converts `config`'s architecture (several methods may share a target)."""
        return True

    def check(self) -> None:
        """Refuse what this source cannot do, before anything is read or written."""

    def calibrates(self) -> bool:
        return True

    refine_levels: ClassVar[dict[str, Effort]] = REFINE_EFFORT  # the refinement of each --quality

    def refine_effort(self) -> Effort:
        """The --quality level's refinement, with --refine-steps and the step size where given."""
        settings, effort = self.job.settings, self.refine_levels[self.job.settings.quality]
        if settings.refine_steps is not None:
            effort = replace(effort, steps=settings.refine_steps)
        return effort if settings.refine_lr is None else replace(effort, lr=settings.refine_lr)

    def output_config(self, runner):
        """The converted model's config (`runner`: the calibration runner, None when uncalibrated)."""
        raise NotImplementedError

    def prepare_layers(self, target_model) -> None:
        """See the converted model (on the meta device) before the first layer, when calibrated."""

    def hosted_class(self) -> str | None:
        """The kvslim-hosted class the output uses (its modeling file travels with it), or None."""
        return None

    def new_record(self, common: dict) -> ConversionRecord:
        raise NotImplementedError

    def progress_label(self) -> str:
        raise NotImplementedError

    def convert_layer(self, index: int, weights, cov: torch.Tensor | None, runner) -> LayerOutput:
        raise NotImplementedError

    def finish(self, record: ConversionRecord) -> None:
        """Add what was learnt over the layers to the record."""
