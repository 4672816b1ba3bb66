"""`kvslim report SOURCE CONVERTED --data ...`: what a conversion did to the model, layer by layer.

Both models read the same token windows. Per decoder layer it measures how far the converted
model's hidden states have moved from the source's (linear CKA and mean per-token cosine) and the
relative error of the attention block's output (end to end: the converted layer sees the converted
model's own inputs, so errors from earlier layers are included). Plus perplexity on those windows and
KV bytes per token. Writes report.json, report.png and a self-contained report.html.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..convert.adapters import attention_module_names
from ..convert.errors import ConversionError
from .perplexity import EVAL_TOKENS, EVAL_WINDOW


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two (tokens, features) matrices (Kornblith et al. 2019); 1 = same up to rotation/scale."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm.clamp(min=1e-30))


class _Recorder:
    """Collects each layer's attention output for one forward pass."""

    def __init__(self, model):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(i))
                        for i, name in enumerate(attention_module_names(model))]

    def _hook(self, index: int):
        def hook(module, args, out):
            self.outputs[index] = (out[0] if isinstance(out, tuple) else out).detach().float()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def compare(source_model, converted_model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """Per-layer similarity of `converted_model` to `source_model` on token `windows` (n, T)."""
    n_layers = len(attention_module_names(source_model))
    if len(attention_module_names(converted_model)) != n_layers:
        raise ConversionError("The two models have different numbers of layers; compare a model with its own conversion.")
    rec_s, rec_c = _Recorder(source_model), _Recorder(converted_model)
    hs_s, hs_c = [[] for _ in range(n_layers + 1)], [[] for _ in range(n_layers + 1)]
    err_num, err_den = torch.zeros(n_layers, dtype=torch.float64), torch.zeros(n_layers, dtype=torch.float64)
    nll = {"source": 0.0, "converted": 0.0}
    count = agree = 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="report", unit="batch", disable=not progress):
            out_s = source_model(input_ids=batch, output_hidden_states=True, use_cache=False)
            out_c = converted_model(input_ids=batch, output_hidden_states=True, use_cache=False)
            for i in range(n_layers + 1):
                hs_s[i].append(out_s.hidden_states[i].flatten(0, 1).float())
                hs_c[i].append(out_c.hidden_states[i].flatten(0, 1).float())
            for i in range(n_layers):
                a, b = rec_s.outputs[i], rec_c.outputs[i]
                err_num[i] += (b - a).double().pow(2).sum()
                err_den[i] += a.double().pow(2).sum()
            target = batch[:, 1:]
            for key, out in (("source", out_s), ("converted", out_c)):
                lp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, target[..., None])
                nll[key] -= float(lp.sum())
            agree += int((out_s.logits[:, :-1].argmax(-1) == out_c.logits[:, :-1].argmax(-1)).sum())
            count += target.numel()
    finally:
        rec_s.close()
        rec_c.close()
    layers = []
    for i in range(1, n_layers + 1):  # hidden_states[i] is the output of layer i-1
        x, y = torch.cat(hs_s[i]), torch.cat(hs_c[i])
        cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
        layers.append({"layer": i - 1, "cka": linear_cka(x, y), "cosine_mean": float(cos.mean()),
                       "cosine_min": float(cos.min()),
                       "attention_relative_error": float((err_num[i - 1] / err_den[i - 1].clamp(min=1e-30)).sqrt())})
    return {"layers": layers, "tokens_scored": count, "top1_agreement": agree / max(count, 1),
            "perplexity": {k: math.exp(v / max(count, 1)) for k, v in nll.items()}}


def plot(result: dict, path: Path) -> None:
    # a Figure of its own renders without pyplot, so no global backend is chosen for the caller
    from matplotlib.figure import Figure

    layers = [r["layer"] for r in result["layers"]]
    fig = Figure(figsize=(14, 3.8))
    axes = fig.subplots(1, 3)
    axes[0].plot(layers, [r["cka"] for r in result["layers"]], marker="o", label="linear CKA")
    axes[0].plot(layers, [r["cosine_mean"] for r in result["layers"]], marker="s", label="mean token cosine")
    axes[0].set_title("hidden states vs source")
    axes[0].set_xlabel("layer")
    axes[0].set_ylim(min(0.0, *(r["cosine_mean"] for r in result["layers"])), 1.02)
    axes[0].legend()
    axes[1].bar(layers, [r["attention_relative_error"] for r in result["layers"]], color="tab:red")
    axes[1].set_title("attention output: relative error")
    axes[1].set_xlabel("layer")
    ppl, kv = result["perplexity"], result["kv_bytes_per_token"]
    names = ["source", "converted"]
    bars = axes[2].bar(names, [ppl[n] for n in names], color=["tab:green", "tab:blue"])
    for bar, n in zip(bars, names):
        axes[2].annotate(f"{ppl[n]:.2f}\nKV {kv[n]:,} B/token", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=8)
    axes[2].set_title("perplexity")
    axes[2].margins(y=0.25)
    fig.suptitle(f"{result['converted']} vs {result['source']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def html_page(result: dict, png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{r['layer']}</td><td>{r['cka']:.4f}</td><td>{r['cosine_mean']:.4f}</td><td>{r['cosine_min']:.4f}</td>"
        f"<td>{r['attention_relative_error']:.4f}</td></tr>" for r in result["layers"])
    ppl, kv = result["perplexity"], result["kv_bytes_per_token"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>kvslim report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}</style>
</head><body><h1>kvslim conversion report</h1>
<p>source <code>{e(result['source'])}</code><br>converted <code>{e(result['converted'])}</code><br>
data: {e(', '.join(result['data']))}; {result['windows']} windows of {result['window']} tokens ({result['tokens_scored']:,} tokens scored)</p>
<table><tr><th></th><th>perplexity</th><th>KV bytes/token</th></tr>
<tr><td>source</td><td>{ppl['source']:.3f}</td><td>{kv['source']:,}</td></tr>
<tr><td>converted</td><td>{ppl['converted']:.3f}</td><td>{kv['converted']:,}</td></tr></table>
<p>Top-1 next-token agreement with the source: {result['top1_agreement']:.2%}</p>
<img src="data:image/png;base64,{image}" style="width:100%">
<h2>Per layer</h2><table><tr><th>layer</th><th>linear CKA</th><th>mean cosine</th><th>min cosine</th>
<th>attention rel. error</th></tr>
{rows}</table></body></html>
"""


def report(source: str, converted: str, data: list[str], output: str | Path, window: int = EVAL_WINDOW,
           max_tokens: int = EVAL_TOKENS, batch_size: int = 4, progress: bool = True) -> dict:
    """Compare `converted` with `source` on `data`; write report.json/.png/.html into `output`."""
    from ..convert.text import read_texts
    from ..convert.writer import AtomicDirectory
    from .perplexity import bos_windows, load_causal_lm, tokenize_corpus
    from .summary import describe

    target = AtomicDirectory(output, overwrite=True, marker="report.json")  # replaces only an earlier report
    target.check()
    src_model, src_tok = load_causal_lm(source)
    conv_model, conv_tok = load_causal_lm(converted)
    if src_tok.get_vocab() != conv_tok.get_vocab():
        raise ConversionError("The two models use different tokenizers; a report compares a model with its own conversion.")
    texts = [t for spec in data for t in read_texts(spec, role="Report data")]
    ids = tokenize_corpus(texts, src_tok, max_tokens)
    windows = bos_windows(ids, window, src_tok.bos_token_id)
    result = {"source": source, "converted": converted, "data": list(data), "window": window, "windows": len(windows),
              **compare(src_model, conv_model, windows, batch_size, progress),
              "kv_bytes_per_token": {"source": describe(src_model.config).kv_bytes_per_token,
                                     "converted": describe(conv_model.config).kv_bytes_per_token}}
    with target as tmp:
        (tmp / "report.json").write_text(json.dumps(result, indent=2))
        plot(result, tmp / "report.png")
        (tmp / "report.html").write_text(html_page(result, tmp / "report.png"))
    return result
