"""The compositional-accuracy judge of the emoji-scenes benchmark (../shared/emoji-scenes.md).

A prompt such as "a cat above a dog" names objects and the boxes they belong in (the spec's TOP and
BOTTOM boxes). The judge crops each box of an image and asks a small object classifier (36 classes)
what is there. Verdicts per image:

- `correct`: every named object is present in the box the prompt gives it ("and": either way round;
  "two cats": a cat in both boxes; "a cat": the centre box), and for left/right/above/below the pair
  is the right way round (`order_correct`). "Present" is a presence test in the manner of GenEval's
  detector threshold (Ghosh et al. 2023): the object is among the classifier's PRESENCE_TOP_K most
  likely of the 36 for that box. A test on the top guess alone would mostly measure the art-style gap
  between the classifier's training images and the dataset's (below); calibration reports how often
  the test accepts the right object in real scenes and how often it accepts a wrong one.
- `order_correct` (left/right/above/below): of the two named objects, is each more likely in the box
  the prompt gives it than in the other one. This relative reading asks only which way round the
  pair is, so it stays reliable for objects the classifier cannot name outright.
- `predicted`: each box's most likely object, for people to read.

The classifier never saw the training images, nor any Noto artwork: it is trained on Twemoji
(`emoji-datasource-twitter`, CC BY 4.0, vgen.evaluate.twemoji), the 36 objects' own emoji plus a few
other Twemoji drawings of the same kinds of object (twemoji.VARIANTS), composed into scenes with the
spec's geometry (a little wider), and augmented towards "another artist": each flat colour region
repainted a little (sometimes in another colour), shading, small rotations and stretches, then hue,
tone, saturation, blur, noise and flips. It is then calibrated on fresh Noto scenes (the dataset's
style; seed 1000003, the dataset's default is 0), and the numbers are stored with it (`calibration`
in judge.yaml), because they say how far to trust it (bench/RESULTS.md, "Judge", has the figures).
Twemoji and Noto draw about ten objects differently enough (rabbit, frog, penguin, strawberry, pizza,
horse, cow, cat, snail, turtle) that even real images of them often fail: read a model's accuracy
next to the judge's accuracy on real scenes (`accepted` in the calibration), and per object (`crop_accuracy_by_object`).

Every image is read at 32 px (the demo model's resolution; other sizes are resized with antialiasing
first), boxes are scaled from the spec's 64 px coordinates, and each crop (box plus a 1 px margin) is
resized to 16x16. Training is deterministic on a given machine (fixed seeds, one thread; bf16 where
the CPU has it natively); the weights (safetensors) and
`judge.yaml` (Twemoji version, settings, calibration) are cached under a key of this package's source,
the settings and the Twemoji files, so evaluation trains the judge once.
"""

from __future__ import annotations

from vgen.evaluate.judge.cache import JUDGE_VERSION, cache_key, default_cache_dir, judge_images, load_judge
from vgen.evaluate.judge.calibration import CALIBRATION_SEED, calibrate
from vgen.evaluate.judge.geometry import crop_boxes, to_judge_resolution
from vgen.evaluate.judge.settings import CROP, MARGIN, NOUNS, RESOLUTION, JudgeSettings
from vgen.evaluate.judge.verdicts import ORDERED_RELATIONS, PRESENCE_TOP_K, Judge, Verdict, compositional_accuracy

__all__ = ["CALIBRATION_SEED", "CROP", "JUDGE_VERSION", "MARGIN", "NOUNS", "ORDERED_RELATIONS", "PRESENCE_TOP_K",
           "RESOLUTION", "Judge", "JudgeSettings", "Verdict", "cache_key", "calibrate", "compositional_accuracy",
           "crop_boxes", "default_cache_dir", "judge_images", "load_judge", "to_judge_resolution"]

# The package, one job a module: settings (what it reads, how it trains), geometry (crops of the
# spec's boxes), network (the classifier), synthesis (Twemoji training scenes), training,
# verdicts (reading images against prompts; accuracies), calibration (on real Noto scenes),
# cache (train once, then load).
