"""GQA, MQA and MHA: merge (or replicate) KV heads; the model keeps its attention class.

The math is in convert/gqa.py: mean-pooling (the GQA paper) or the activation-aware merge with
per-head key/value folds, and optional regrouping of query heads by similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConversionError
from ..formatting import plural
from ..gqa import METHODS, check_kv_heads, convert_attention, pairwise_merge_cost, plan_groups
from ..records import HeadMergeRecord, kv_bytes_per_token
from ..refine import REFINE_EFFORT_HEAD_MERGE, Effort
from .base import ConversionMethod, LayerOutput


@dataclass(frozen=True)
class HeadMergeOptions:
    kv_heads: int | None = None  # --to gqa only; mqa means 1, mha one per query head
    method: str = "aware"
    regroup: bool | None = None  # None: on for the aware merge

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConversionError(f"Unknown method '{self.method}'; valid: {', '.join(METHODS)}.")


class HeadMerge(ConversionMethod):
    targets = ("gqa", "mqa", "mha")
    Options = HeadMergeOptions

    def check(self) -> None:
        layout, kv = self.job.layout, self.options.kv_heads
        if self.target == "mqa" and kv not in (None, 1):
            raise ConversionError(f"--to mqa means 1 KV head; drop --kv-heads {kv} or use --to gqa.")
        if self.target == "mha" and kv not in (None, layout.num_heads):
            raise ConversionError(f"--to mha means {layout.num_heads} KV heads (one per query head).")
        if self.target == "gqa" and kv is None:
            raise ConversionError("--to gqa needs --kv-heads N (a divisor of the query heads).")
        self.kv_heads = {"mqa": 1, "mha": layout.num_heads}.get(self.target, kv)
        check_kv_heads(layout, self.kv_heads)
        self.merging = self.kv_heads < layout.num_kv_heads
        regroup = (self.options.method == "aware") if self.options.regroup is None else self.options.regroup
        self.regroup = regroup and self.merging and 1 < self.kv_heads
        self.rope = self.job.adapter.rope(self.job.src.config)
        self.groups: list = []

    def calibrates(self) -> bool:
        return self.options.method == "aware" and self.merging

    refine_levels = REFINE_EFFORT_HEAD_MERGE

    def refine_effort(self) -> Effort:
        """Mean-pooling is the paper's baseline and is left as is."""
        effort = super().refine_effort()
        return replace(effort, steps=0) if self.options.method == "mean" else effort

    def output_config(self, runner):
        return self.job.adapter.target_config(self.job.src.config, self.kv_heads)

    def hosted_class(self) -> str | None:
        return self.job.adapter.hosted

    def new_record(self, common: dict) -> HeadMergeRecord:
        layout = self.job.layout
        method = self.options.method if self.merging else \
            "replicate" if self.kv_heads > layout.num_kv_heads else "identity"
        record = HeadMergeRecord(
            **common, method=method, kv_heads_after=self.kv_heads, regrouped=self.regroup,
            kv_bytes_per_token_after=kv_bytes_per_token(layout.num_layers, 2 * self.kv_heads * layout.head_dim,
                                                        self.job.weight_dtype))
        if self.job.adapter.qk_norm and self.options.method == "aware" and self.merging:
            record.notes.append(
                "q/k-norm model: the per-head key folds are restricted to phases (rotations), which pass "
                "the query RMSNorm exactly only when its weight is equal within each RoPE pair; otherwise "
                "the fold is an approximation."
            )
        return record

    def progress_label(self) -> str:
        return f"converting ({self.options.method} -> {plural(self.kv_heads, 'KV head')})"

    def convert_layer(self, index, weights, cov, runner) -> LayerOutput:
        layout, groups = self.job.layout, None
        if self.regroup:
            groups = plan_groups(pairwise_merge_cost(weights, layout, cov, self.rope), self.kv_heads)
            self.groups.append(groups)
        new = convert_attention(weights, layout, self.kv_heads, self.options.method if self.merging else "mean",
                                groups=groups, cov=cov, rope_layout=self.rope)
        out = self.job.adapter.write(new, index)
        # Tensors the merge returned as they were read (an unregrouped mean merge's queries and outputs;
        # `write` places them under the names `read` took them from) are left to be copied as the source
        # stores them, by the kernel (driver.kept), not written from this process's pages of the
        # source: 2 GiB of a 7B model's reads.
        read = {id(t) for t in vars(weights).values() if isinstance(t, torch.Tensor)}
        unchanged = {n for n, t in out.items() if id(t) in read and self.job.src.reader.stored(n) is not None}
        return LayerOutput({n: t for n, t in out.items() if n not in unchanged}, in_place=True)

    def finish(self, record: HeadMergeRecord) -> None:
        record.groups = self.groups or None
