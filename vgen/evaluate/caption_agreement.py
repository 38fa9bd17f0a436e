"""Caption agreement: a captioner (kind: captioner, `vgen evaluate --captioner RUN`) reads each
generated image, and its caption is compared with the prompt the image was drawn from.

A check of generation by a model of another kind than the generator's text encoder: an image
agrees when the caption the captioner writes for it is the prompt (exact match) or, on emoji
scenes, says the same scene another way (vgen.understand.caption_metrics). How far the captioner
itself can be trusted is its score on real scenes (`vgen caption DATASET --run RUN`), reported
beside it in bench/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable

METRIC = "caption-agreement"
EXAMPLES = 12  # (prompt, caption) pairs kept for the report


def caption_agreement_metrics(images, options, log: Callable[[str], None]) -> dict[str, dict]:
    """{METRIC: result} for an ImageSet, or {METRIC: unavailable} without a captioner."""
    from vgen.errors import VgenError
    from vgen.understand.caption_metrics import caption_scores
    from vgen.understand.captioning import RunCaptioner

    if METRIC not in options.metrics:
        return {}
    if not options.captioner:
        return {METRIC: {"unavailable": "no captioner: pass --captioner RUN (a run of configs/captioner-tiny-cpu.yaml)"}}
    try:
        captioner = RunCaptioner(options.captioner, device=options.device)
    except VgenError as e:
        return {METRIC: {"unavailable": str(e)}}
    log(f"caption agreement: {len(images.images)} images of set {images.name} captioned by {options.captioner}")
    captions = []
    for start in range(0, len(images.images), 256):
        chunk = images.images[start:start + 256]
        captions += captioner(chunk, list(range(start, start + len(chunk))))
    scores = caption_scores(captions, [[p] for p in images.prompts])
    value = {k: scores[k] for k in ("exact_match", "same_scene") if k in scores}
    return {METRIC: {
        "metric": "caption_agreement", "value": value, "n": scores["n"], **scores,
        "extractor_id": f"captioner:{captioner.run_dir}@{captioner.loaded.step}",
        "weights_sha256": captioner.loaded.sha256, "set": images.name, "decoder": captioner.settings.decoder,
        "reference": "each image's own prompt",
        "examples": [{"file": f, "prompt": p, "caption": c}
                     for f, p, c in list(zip(images.files, images.prompts, captions))[:EXAMPLES]],
    }}
