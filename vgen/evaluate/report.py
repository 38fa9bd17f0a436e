"""report.html: one self-contained page (images inline as PNG data URIs, plots as inline SVG, no
scripts, no network) that shows what evaluation.yaml holds: the metric table, the judge's verdicts
on sample grids per relation, the memorisation check's closest pairs, the training loss curve and,
when several checkpoints were evaluated, the metrics against the step."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vgen.atomic import atomic_write_text
from vgen.evaluate.evaluation import REPORT_FILE, ImageSet

GRID_PER_RELATION = 16  # images shown per relation (the first prompts' first seeds)
SHOWN = 96  # px each image is drawn at (nearest-neighbour upscaling keeps the pixels honest)

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
.caveats{color:#8a5a00}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.unavail{color:#a60}
.grid{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:%dpx;font-size:11px;line-height:1.2}
figure img{width:%dpx;height:%dpx;image-rendering:pixelated;border:3px solid #ccc;box-sizing:border-box}
figure.ok img{border-color:#2a2}figure.bad img{border-color:#d33}
figure.ok .mark{color:#2a2}figure.bad .mark{color:#d33}
code{background:#f5f5f5;padding:0 3px}
""" % (SHOWN, SHOWN, SHOWN)


def _png_uri(pixels: torch.Tensor) -> str:
    """uint8 [3, H, W] -> data:image/png;base64,..."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _sampler_words(model: dict, settings: dict) -> str:
    """`sampler euler, 20 steps, guidance 3.0`, naming only what the family's sampler takes."""
    words = [f"sampler {settings['sampler']}"] if settings.get("sampler") is not None else []
    words += [f"{settings['steps']} steps"] if settings.get("steps") is not None else []
    words += [f"guidance {settings['guidance']}"] if settings.get("guidance") is not None else []
    return ", ".join(words) or f"one {model.get('kind', 'network')} call per image"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "–" if value is None else str(value)


def _fmt2(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else _fmt(value)


# --- plots -------------------------------------------------------------------------------------------

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg_plot(series: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
             width: int = 560, height: int = 260, log_y: bool = False,
             y_range: tuple[float, float] | None = None) -> str:
    """A line plot of named (x, y) series as an inline SVG element, the legend to its right."""
    import math

    points = [(x, y) for values in series.values() for x, y in values if y is not None]
    if log_y:
        points = [(x, y) for x, y in points if y > 0]
    if not points:
        return ""
    fy = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = y_range or (min(fy(p[1]) for p in points), max(fy(p[1]) for p in points))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9 + abs(y0) * 0.1 + 1e-3)
    left, right, top, bottom = 60, 190, 24, 36
    w, h = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * w

    def sy(y):
        return top + h - (fy(y) - y0) / (y1 - y0) * h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
           f'<text x="{left}" y="14" font-weight="bold">{_e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>']
    for k in range(5):  # y ticks
        value = y0 + (y1 - y0) * k / 4
        label = 10 ** value if log_y else value
        y = top + h - h * k / 4
        out.append(f'<line x1="{left - 4}" x2="{left}" y1="{y:.1f}" y2="{y:.1f}" stroke="#999"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label:.3g}</text>')
    for k in range(5):  # x ticks
        value = x0 + (x1 - x0) * k / 4
        x = left + w * k / 4
        out.append(f'<text x="{x:.1f}" y="{top + h + 14}" text-anchor="middle">{value:.0f}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle">{_e(xlabel)}</text>'
               f'<text x="12" y="{top + h / 2}" transform="rotate(-90 12 {top + h / 2})" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        kept = [(x, y) for x, y in values if y is not None and (not log_y or y > 0)]
        if not kept:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in kept)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if len(kept) <= 20:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in kept]
        out.append(f'<text x="{left + w + 12}" y="{top + 10 + 16 * i}" fill="{colour}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by an interrupted run
    return rows


def loss_plot(run_dir: Path | None) -> str:
    if run_dir is None:
        return ""
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    series = {"train loss": [(r["step"], r["loss"]) for r in rows if "loss" in r],
              "val loss (EMA, fixed noise)": [(r["step"], r["val_loss_ema"]) for r in rows if "val_loss_ema" in r]}
    return svg_plot({k: v for k, v in series.items() if v}, "training loss", "step", "loss", log_y=True)


def by_step_plot(by_step: list[dict]) -> str:
    if len(by_step) < 2:
        return ""
    keys = (("single_object", "single object"), ("two_object", "two objects, training pairs"),
            ("two_object_held_out", "two objects, held-out pairs"), ("order", "order right"))
    series = {label: [(r["step"], (r["compositional"] or {}).get(key)) for r in by_step] for key, label in keys}
    plots = [svg_plot(series, "compositional accuracy by checkpoint", "step", "accuracy", y_range=(0.0, 1.0))]
    scores = [(r["step"], r["clip_score"]) for r in by_step if r.get("clip_score") is not None]
    if scores:
        plots.append(svg_plot({"CLIP score (benchmark set)": scores}, "CLIP score by checkpoint", "step", "score"))
    return "".join(plots)


# --- sections ----------------------------------------------------------------------------------------

_NAMES = {"fid": "FID (Inception)", "kid": "KID (Inception)", "precision-recall": "precision / recall (k=3)",
          "fd-clip": "FD (CLIP)", "kid-clip": "KID (CLIP)", "clip-score": "CLIP score",
          "compositional": "compositional accuracy", "memorization": "memorisation (share of near-copies)"}


def metric_table(metrics: dict[str, dict]) -> str:
    rows = ["<tr><th>metric</th><th>value</th><th>N</th><th>extractor</th><th>weights sha256</th>"
            "<th>reference</th></tr>"]
    for name, r in metrics.items():
        if "unavailable" in r:
            rows.append(f"<tr><td>{_e(_NAMES.get(name, name))}</td><td colspan=5 class=unavail>unavailable: "
                        f"{_e(r['unavailable'])}</td></tr>")
            continue
        n = r.get("n_generated", r.get("n"))
        ref = r.get("reference")
        if isinstance(ref, dict):
            ref = f"{ref.get('split')} split of {Path(str(ref.get('dataset'))).name} (N={ref.get('n')})"
        sha = r.get("weights_sha256")
        value = _fmt(r["value"])
        if name == "kid" or name == "kid-clip":
            value += f" ± {r['std']:.2g}"
        if name == "memorization":
            value += f" (real val images: {_fmt(r['baseline']['value'])})"
        rows.append(f"<tr><td>{_e(_NAMES.get(name, name))}</td><td class=num>{_e(value)}</td><td class=num>{_e(n)}</td>"
                    f"<td><code>{_e(r.get('extractor_id'))}</code></td><td><code>{_e(sha[:16] + '…' if sha else '–')}"
                    f"</code></td><td>{_e(ref)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def compositional_section(result: dict | None) -> str:
    if not result or "unavailable" in result:
        return ""
    cal = result["judge"].get("calibration") or {}
    real = cal.get("by_relation") or {}
    rows = ["<tr><th>relation</th><th>training pairs</th><th>held-out pairs</th><th>order right</th>"
            "<th>judge on real Noto scenes</th></tr>"]
    for relation, acc in result["by_relation"].items():
        held = result["held_out_by_relation"].get(relation)
        order = result["order_by_relation"].get(relation)
        rows.append(f"<tr><td>{_e(relation)}</td><td class=num>{_rate(acc, seen=result, relation=relation)}</td>"
                    f"<td class=num>{_rate(held)}</td><td class=num>{_rate(order)}</td>"
                    f"<td class=num>{_fmt2(real.get(relation))}</td></tr>")
    summary = (f"<p>Single objects <b>{_fmt(result['value']['single_object'])}</b>, two objects over training "
               f"pairs <b>{_fmt(result['value']['two_object'])}</b>, over held-out pairs (never seen together) "
               f"<b>{_fmt(result['value']['two_object_held_out'])}</b>; N = {result['n']}.</p>")
    trust = ""
    if cal and "unavailable" not in cal:
        trust = (f"<p class=muted>How far to trust the judge (<code>{_e(result['judge']['id'])}</code>, trained on "
                 f"Twemoji only, never on the dataset's art): on {cal.get('scenes')} real Noto scenes it accepts "
                 f"{_fmt(cal.get('scene_accuracy'))} (pairs {_fmt(cal.get('two_object'))}); an object counts as "
                 f"present when it is among the judge's {result['judge']['presence_top_k']} likeliest of 36 "
                 f"(the right object: {_fmt(cal.get('crop_present'))} of real crops; a random wrong one: "
                 f"{_fmt(cal.get('crop_wrong_object_present'))}); prompts with a wrong object rejected "
                 f"{_fmt(cal.get('wrong_object_prompt_rejected'))}, with the order swapped "
                 f"{_fmt(cal.get('swapped_prompt_rejected'))}. Read a model's accuracy against the last column.</p>")
    return summary + "<table>" + "".join(rows) + "</table>" + trust


def _rate(acc: dict | None, seen: dict | None = None, relation: str | None = None) -> str:
    if not acc:
        return "–"
    if seen is not None and relation in seen["held_out_by_relation"]:
        held = seen["held_out_by_relation"][relation]
        correct, n = acc["correct"] - held["correct"], acc["n"] - held["n"]
        return f"{correct / n:.2f} ({correct}/{n})" if n else "–"
    return f"{acc['accuracy']:.2f} ({acc['correct']}/{acc['n']})"


def _figure(pixels: torch.Tensor, prompt: str, verdict: dict | None) -> str:
    cls, mark = "", ""
    if verdict is not None:
        ok = verdict["correct"]
        cls = " class=ok" if ok else " class=bad"
        seen = " / ".join(verdict["predicted"])
        mark = f'<br><span class=mark>{"✓" if ok else "✗"}</span> <span class=muted>judge sees: {_e(seen)}</span>'
    return (f'<figure{cls}><img src="{_png_uri(pixels)}" alt="{_e(prompt)}">'
            f'<figcaption>{_e(prompt)}{mark}</figcaption></figure>')


def grids_section(images: ImageSet | None, verdicts: list[dict]) -> str:
    if images is None:
        return ""
    by_file = {v["file"]: v for v in verdicts if v.get("set") == images.name}
    if not by_file:  # no judge: the first images with their prompts
        figures = [_figure(images.images[i], images.prompts[i], None) for i in range(min(48, len(images.files)))]
        return f'<div class=grid>{"".join(figures)}</div>'
    out = []
    from vgen.data import emoji_scenes as es

    for relation in es.RELATIONS:
        for held in (False, True):
            rows = [i for i, f in enumerate(images.files)
                    if f in by_file and by_file[f]["relation"] == relation and by_file[f]["held_out"] == held]
            if not rows:
                continue
            shown = rows[:GRID_PER_RELATION]
            correct = sum(by_file[images.files[i]]["correct"] for i in rows)
            label = "held-out pairs" if held else ("training pairs" if relation in es.PAIR_RELATIONS else "")
            out.append(f"<h3>{_e(relation)} {_e(label)} <span class=muted>({correct}/{len(rows)} judged right)"
                       "</span></h3><div class=grid>")
            out += [_figure(images.images[i], images.prompts[i], by_file[images.files[i]]) for i in shown]
            out.append("</div>")
    return "".join(out)


def memorization_section(result: dict | None, images: ImageSet | None) -> str:
    if not result or "unavailable" in result or images is None:
        return ""
    from vgen.data.dataset import ImageCaptionDataset

    try:
        train = ImageCaptionDataset(result["reference"]["dataset"], "train")
    except Exception:  # noqa: BLE001 - the dataset moved since: the numbers still stand
        return ""
    pairs = []
    index = {f: i for i, f in enumerate(images.files)}
    for pair in result["closest"][:8]:
        generated = images.images[index[pair["generated_file"]]]
        pairs.append('<div style="display:inline-block;margin:0 12px 8px 0">'
                     + _figure(generated, f"generated, ratio {pair['ratio']:.2f}", None)
                     + _figure(train.image(pair["train"]), f"nearest training image #{pair['train_id']}", None)
                     + "</div>")
    base = result["baseline"]
    return (f"<p>Share of generated images closer to one training image than {result['threshold_ratio']} x that "
            f"image's distance to its own nearest neighbour: <b>{_fmt(result['value'])}</b> (real val images: "
            f"{_fmt(base['value'])}; median ratio {_fmt(result['ratio']['median'])} vs "
            f"{_fmt(base['ratio']['median'])}). The closest pairs:</p>"
            f'<div class=grid style="gap:0">{"".join(pairs)}</div>')


def caption_agreement_section(result: dict) -> str:
    """What the captioner wrote for some of the images, beside their prompts."""
    rows = ["<tr><th>image</th><th>prompt</th><th>the captioner's caption</th></tr>"]
    for example in result.get("examples") or []:
        rows.append(f"<tr><td><code>{_e(example['file'])}</code></td><td>{_e(example['prompt'])}</td>"
                    f"<td>{_e(example['caption'])}</td></tr>")
    return (f"<p>The captioner <code>{_e(result.get('extractor_id'))}</code> read the {_e(result.get('n'))} images of "
            f"set {_e(result.get('set'))}: its caption is the prompt in {_fmt2(result.get('exact_match'))} of them "
            f"and says the same scene in {_fmt2(result.get('same_scene'))}.</p><table>{''.join(rows)}</table>")


def render_report(manifest: dict, sets: dict[str, ImageSet], verdicts: list[dict], run_dir: Path | None) -> str:
    metrics = manifest.get("metrics") or {}
    judged = sets.get("benchmark") or next(iter(sets.values()), None)
    distribution = sets.get("fid") or judged
    model = (manifest.get("generation") or {}).get("model") or {}
    settings = (manifest.get("generation") or {}).get("settings") or {}
    head = (f"<p>Run <code>{_e(manifest.get('run'))}</code>, checkpoint step {_e(manifest.get('checkpoint_step'))}, "
            f"model <code>{_e(str(model.get('sha256', ''))[:16])}</code>; dataset "
            f"<code>{_e(manifest['dataset']['path'])}</code> (sha256 {_e(manifest['dataset']['sha256'][:12])}…); "
            f"{_e(_sampler_words(model, settings))}, {_e((manifest.get('generation') or {}).get('precision'))}. "
            f"Written {_e(manifest.get('created'))} by vgen {_e(manifest.get('vgen_version'))}: "
            f"<code>{_e(manifest.get('command'))}</code></p>")
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8><title>vgen evaluation</title>",
             f"<style>{_CSS}</style></head><body><h1>vgen evaluation</h1>", head,
             "<h2>Metrics</h2>", metric_table(metrics)]
    if manifest.get("caveats"):
        parts.append("<ul class=caveats>" + "".join(f"<li>Caveat: {_e(note)}</li>" for note in manifest["caveats"])
                     + "</ul>")
    if "compositional" in metrics:
        parts += ["<h2>Compositional accuracy</h2>", compositional_section(metrics["compositional"])]
    agreement = metrics.get("caption-agreement") or {}
    if agreement and "unavailable" not in agreement:
        parts += ["<h2>Caption agreement</h2>", caption_agreement_section(agreement)]
    plots = by_step_plot(manifest.get("by_step") or []) + loss_plot(run_dir)
    if plots:
        parts += ["<h2>Training</h2>", plots]
    if judged is not None:
        parts += [f"<h2>Samples ({_e(judged.name)} set)</h2>",
                  "<p class=muted>Green: the judge found every object where the prompt puts it; red: it did not.</p>",
                  grids_section(judged, verdicts)]
    if "memorization" in metrics and "unavailable" not in metrics["memorization"]:
        parts += ["<h2>Memorisation</h2>", memorization_section(metrics["memorization"], distribution)]
    parts.append("</body></html>\n")
    return "".join(parts)


GRID_FILE = "benchmark-grid.png"
_VERDICT_RGB = {True: (34, 170, 34), False: (221, 51, 51)}


def benchmark_grid(images: ImageSet, verdicts: list[dict], columns: int = 8):
    """A PNG contact sheet: one row per relation (training pairs, then held-out pairs), each image
    framed green or red by the judge's verdict; None without verdicts."""
    from vgen.data import emoji_scenes as es
    from vgen.grid import make_grid

    by_file = {v["file"]: v for v in verdicts if v.get("set") == images.name}
    if not by_file:
        return None
    tiles, labels = [], []
    for held in (False, True):
        for relation in es.RELATIONS:
            rows = [i for i, f in enumerate(images.files)
                    if f in by_file and by_file[f]["relation"] == relation and by_file[f]["held_out"] == held]
            if not rows:
                continue
            row = []
            for i in rows[:columns]:
                colour = torch.tensor(_VERDICT_RGB[bool(by_file[images.files[i]]["correct"])], dtype=torch.uint8)
                framed = colour.view(3, 1, 1).expand(3, images.images.shape[2] + 2, images.images.shape[3] + 2).clone()
                framed[:, 1:-1, 1:-1] = images.images[i]
                row.append(framed)
            row += [torch.full_like(row[0], 255)] * (columns - len(row))
            tiles += row
            kind = " (held-out pairs)" if held else (" (training pairs)" if relation in es.PAIR_RELATIONS else "")
            shown = list(dict.fromkeys(images.prompts[i] for i in rows[:columns]))  # distinct, in order
            labels.append(f"{relation}{kind}: " + " | ".join(shown))
    return make_grid(torch.stack(tiles), columns=columns, row_labels=labels)


def write_report(folder: Path, manifest: dict, sets: dict[str, ImageSet], verdicts: list[dict],
                 run_dir: Path | None) -> Path:
    path = Path(folder) / REPORT_FILE
    atomic_write_text(path, render_report(manifest, sets, verdicts, run_dir))
    judged = sets.get("benchmark") or next(iter(sets.values()), None)
    grid = benchmark_grid(judged, verdicts) if judged is not None else None
    if grid is not None:
        grid.save(Path(folder) / GRID_FILE, format="PNG")
    return path
