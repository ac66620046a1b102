"""A synthetic stream-moderation data set: the paper's "in-game vs real violence" problem in miniature.

Every frame shows a red splat. Whether it is "real" (label `violent`) or a stylised in-game
effect (`non_violent`) shows only in subtle, overlapping cues: a real splat is more jagged,
throws droplets and is a darker red; a game splat is smooth and bright. `cue_strength` sets how
far apart the two classes' cue distributions are (0: identical, 1: barely overlapping), so the
image alone never gives a perfect answer at the default strength. Decoy splats, always drawn
from the game distribution, sit in other quadrants: a model has to find the one that matters.

The caption is stream metadata (category, title, device, report history) plus a `focus`
field naming the quadrant of the splat that decides the label. With probability
`caption_info` a caption is drawn from its label's pools (and its focus is right); otherwise
from neutral pools with a random focus. So captions correlate with the label and point at the
region to look at, which is what the guidance network is meant to learn from.

A green "LIVE" badge near the top edge is a spurious cue: its correlation with the label is
`spurious_train` in the train split and `spurious_test` in the test split. Everything that
matters stays inside the area the train crops (scale >= 0.6) and the eval centre crop keep.

Everything is a function of (seed, sample index): any size, any number of worker processes,
the same bytes. Nothing is downloaded; images are drawn with PIL and numpy.

`posterior` is the generator's own answer, derived from this code: the probability that a frame is
`violent` given what it shows, whose Bayes rule is the best accuracy any image-only model can reach on a
set (mgn/eval/ceiling.py). With `ground_truth` each sample's json also carries every splat's cue and that
posterior, for the comparison runner's positive controls; nothing else about the sample changes.
"""
from __future__ import annotations

import colorsys
import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

LABELS = ("non_violent", "violent")  # class index = position; 1 is the class to moderate
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# A second task on the same kind of frames, for pretraining a stand-in image encoder: which kind of scene
# and where the (first) splat is. It shares no label with the moderation task.
SCENE_QUADRANT_LABELS = tuple(f"{scene}_{q}" for scene in ("game", "camera") for q in QUADRANTS)
# ... or which kind of scene alone: a pretraining task that teaches nothing about where the splat is.
SCENE_LABELS = ("game", "camera")
TARGETS = {"violence": LABELS, "scene_quadrant": SCENE_QUADRANT_LABELS, "scene": SCENE_LABELS}
# a splat's cue ~ N(0.5 -/+ CUE_SPREAD * cue_strength, CUE_SD), clipped to [0, 1]
CUE_SPREAD, CUE_SD = 0.4, 0.16

# Caption pools. "neutral" fields carry no label information.
CATEGORY = {0: ["Shooter", "Battle Royale", "Horror Games", "Fighting Games", "Tactical FPS"],
            1: ["IRL", "Just Chatting", "Travel & Outdoors", "Street Cam", "News"],
            "neutral": ["Variety", "Music", "Sports", "Art", "Cooking"]}
TITLE = {0: ["ranked grind all night", "headshots only challenge", "boss fight tonight",
             "new season new map", "zombie mode with friends"],
         1: ["things got heated outside", "caught this on the street", "fight outside the bar",
             "security stepped in", "crowd got out of hand"],
         "neutral": ["chill stream", "come hang out", "road to 1k followers", "late night vibes",
                     "sunday stream"]}
DEVICE = {0: ["PC capture", "console capture", "capture card"],
          1: ["phone camera", "body cam", "handheld camera"],
          "neutral": ["webcam", "tablet", "laptop"]}
HISTORY = {0: ["0 prior reports", "partner channel", "verified streamer"],
           1: ["3 prior reports", "flagged last week", "2 strikes this month"],
           "neutral": ["new account", "1 prior report", "no history"]}


@dataclass(frozen=True)
class SyntheticSpec:
    samples: int = 2400
    image_size: int = 96
    seed: int = 0
    cue_strength: float = 0.5  # 0: the image says nothing about the label; 1: nearly separable
    caption_info: float = 0.6  # share of captions drawn from their label's pools
    label_noise: float = 0.02  # share of stored labels flipped after rendering
    positive_fraction: float = 0.5  # class balance: share of `violent` frames
    spurious_train: float = 0.5  # badge-label correlation in train, in [-1, 1]
    spurious_test: float = 0.0  # ... and in test
    decoys: int = 1  # extra game-like splats per frame (0..3)
    test_fraction: float = 0.15  # the paper's 85/15 split
    # the stored label: violence (the task); scene_quadrant or scene (pretraining tasks)
    target: str = "violence"
    # Off by default (the json stays as it was): also write each sample's ground truth for the comparison
    # runner's ceiling and positive controls: every splat's cue (deciding first), the frame size and the Bayes
    # posterior.
    ground_truth: bool = False

    def validate(self) -> None:
        if self.samples < 1 or self.image_size < 32:
            raise ValueError(f"samples={self.samples} must be >= 1 and image_size={self.image_size} >= 32")
        for name in ("cue_strength", "caption_info", "label_noise", "positive_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("spurious_train", "spurious_test"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [-1, 1]")
        if not 0 <= self.decoys <= 3:
            raise ValueError(f"decoys={self.decoys} must be in 0..3 (one splat per quadrant)")
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r}: expected one of {list(TARGETS)}")

    @property
    def labels(self) -> tuple[str, ...]:
        return TARGETS[self.target]

    def to_dict(self) -> dict:
        raw = asdict(self)
        if not self.ground_truth:  # a default set's dataset_card.json stays as it always was
            del raw["ground_truth"]
        return raw


@dataclass
class SyntheticSample:
    key: str
    split: str
    label: int  # the stored (possibly noisy) label
    caption: str
    jpeg: bytes
    meta: dict  # ground truth: true label, cue boxes, badge, caption informativeness


def assign_splits(spec: SyntheticSpec) -> list[str]:
    """Exactly round(test_fraction * samples) test samples, chosen by a seeded permutation."""
    n_test = round(spec.test_fraction * spec.samples)
    order = np.random.default_rng([spec.seed, 2**31 - 1]).permutation(spec.samples)
    splits = ["train"] * spec.samples
    for i in order[:n_test]:
        splits[i] = "test"
    return splits


def render(spec: SyntheticSpec, item: tuple[int, str]) -> SyntheticSample:
    """Sample `index` of the data set; depends only on (spec, index, split)."""
    index, split = item
    rng = np.random.default_rng([spec.seed, index])
    label = int(rng.random() < spec.positive_fraction)

    quads = rng.permutation(4)[: 1 + spec.decoys]
    target = _cue_value(rng, label, spec.cue_strength)
    splats = [(int(quads[0]), target)] + [(int(q), _cue_value(rng, 0, spec.cue_strength)) for q in quads[1:]]
    corr = spec.spurious_train if split == "train" else spec.spurious_test
    badge = bool(rng.random() < 0.5 + 0.5 * corr * (1 if label else -1))
    scene = "camera" if rng.random() < 0.5 else "game"
    image, boxes, bodies = _draw_frame(rng, spec.image_size, scene, splats, badge)

    informative = bool(rng.random() < spec.caption_info)
    caption = _caption(rng, label, informative, QUADRANTS[splats[0][0]])
    flipped = bool(rng.random() < spec.label_noise)

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    meta = {"true_label": label, "label_flipped": flipped, "scene": scene, "badge": badge,
            "caption_informative": informative, "cue": target, "cue_quadrant": QUADRANTS[splats[0][0]],
            "cue_box": boxes[0], "decoy_boxes": boxes[1:]}
    # computed from what was drawn: no random draw added, the sample is otherwise unchanged
    if spec.ground_truth:
        cues = [cue for _, cue in splats]
        meta.update(cues=cues, frame_size=spec.image_size, posterior=splat_posterior(spec, cues),
                    splat_box=bodies[0])
    stored = {"violence": label ^ flipped, "scene_quadrant": 4 * (scene == "camera") + int(splats[0][0]),
              "scene": int(scene == "camera")}[spec.target]
    return SyntheticSample(f"syn{index:07d}", split, stored, caption, buf.getvalue(), meta)


def _cue_centre(label: int, strength: float) -> float:
    return 0.5 + (CUE_SPREAD * strength if label else -CUE_SPREAD * strength)


def _cue_value(rng: np.random.Generator, label: int, strength: float) -> float:
    """How "real" a splat looks, in [0, 1]; the classes' distributions overlap unless strength ~ 1."""
    return float(np.clip(rng.normal(_cue_centre(label, strength), CUE_SD), 0.0, 1.0))


# --- the generator's own answer: the best any image-only classifier can do
# ------------------------------------

def cue_likelihood_ratio(cue: float, strength: float) -> float:
    """r(c) = f_1(c) / f_0(c): how much likelier a splat of cue c is as a real splat than as a game splat.

    f_y is the density of clip(N(mu_y, CUE_SD^2), 0, 1) with mu_y = _cue_centre(y, strength): the normal
    density inside (0, 1), and point masses at the ends, P(N <= 0) at 0 and P(N >= 1) at 1 (np.clip puts them
    there).
    """
    mu0, mu1 = _cue_centre(0, strength), _cue_centre(1, strength)
    if cue <= 0.0:
        return math.erfc(mu1 / (CUE_SD * math.sqrt(2))) / math.erfc(mu0 / (CUE_SD * math.sqrt(2)))
    if cue >= 1.0:
        return (math.erfc((1 - mu1) / (CUE_SD * math.sqrt(2)))
                / math.erfc((1 - mu0) / (CUE_SD * math.sqrt(2))))
    return math.exp(((cue - mu0) ** 2 - (cue - mu1) ** 2) / (2 * CUE_SD ** 2))


def posterior(spec: SyntheticSpec, cues: list[float], *, badge: bool | None = None, correlation: float = 0.0,
              deciding_known: bool = False) -> float:
    """P(true label = violent | what the frame shows): the Bayes posterior of the generator itself.

    Derivation, from render():
      y ~ Bernoulli(pi), pi = positive_fraction. The k = 1 + decoys splats sit in k distinct quadrants drawn
      by a uniform permutation, independent of everything else; the first (deciding) splat's cue is c* ~ f_y,
      every decoy's cue ~ f_0 (cue_likelihood_ratio). The badge is drawn with P(badge | y) = 1/2 + rho (y -
      1/2), rho = the split's correlation (`correlation`). Scene, background, clutter and the splats' shapes
      and droplets are drawn from the cues and from randomness independent of y. So the frame depends on y
      only through (cues at their quadrants, badge), and no image-only classifier can beat the Bayes rule on
      these (data processing): its accuracy is the ceiling.
      Which occupied quadrant decides is uniform and independent of the cues, so
        P(c_1..c_k | y) = (1/k) sum_i f_y(c_i) prod_{j != i} f_0(c_j),
      and dividing by prod_j f_0(c_j) (the same under y = 0, where every splat is a game splat) the likelihood
      ratio is the mean of the splats' own ratios:
        LR = P(cues | 1) / P(cues | 0) = (1/k) sum_i r(c_i).
      With the deciding splat known (`deciding_known`: a perfect reading of the caption's focus; cues[0] is
      the deciding one) it is r(c*). The badge multiplies it by (1 + rho) / (1 - rho), or its inverse without
      a badge. Posterior odds = pi / (1 - pi) * LR * badge ratio.
    Label noise flips the stored label with probability eta independent of everything, so
      P(stored = violent | frame) = eta + (1 - 2 eta) p:
    for eta < 1/2 the same decision (p > 1/2) is best for stored and true labels alike.
    """
    ratios = [cue_likelihood_ratio(c, spec.cue_strength) for c in (cues[:1] if deciding_known else cues)]
    odds = spec.positive_fraction / (1 - spec.positive_fraction) if spec.positive_fraction < 1 else math.inf
    odds *= sum(ratios) / len(ratios)
    if badge is not None and correlation:
        if abs(correlation) >= 1:
            return float(badge == (correlation > 0))
        odds *= ((1 + correlation) / (1 - correlation)) ** (1 if badge else -1)
    return 1.0 if math.isinf(odds) else odds / (1 + odds)


def splat_posterior(spec: SyntheticSpec, cues: list[float]) -> float:
    """The posterior from the splats alone (the badge left out: it is the spurious cue, uncorrelated at
    test)."""
    return posterior(spec, cues)


def _caption(rng: np.random.Generator, label: int, informative: bool, quadrant: str) -> str:
    pool = label if informative else "neutral"
    focus = quadrant if informative else QUADRANTS[rng.integers(4)]
    fields = [("category", CATEGORY), ("title", TITLE), ("device", DEVICE), ("history", HISTORY)]
    parts = [f"{name}: {table[pool][rng.integers(len(table[pool]))]}" for name, table in fields]
    return " | ".join(parts + [f"focus: {focus}"])


def _draw_frame(rng, size: int, scene: str, splats, badge: bool):
    """Draw at twice the size and box-filter down, so shapes are anti-aliased like real frames."""
    w = 2 * size
    image = Image.fromarray(_background(rng, w, scene))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 6)):
        _clutter(rng, draw, w)
    boxes, bodies = [], []
    for quadrant, cue in splats:
        reach, body = _splat(rng, draw, w, quadrant, cue)
        boxes.append([round(v / 2) for v in reach])
        bodies.append([round(v / 2) for v in body])
    if badge:  # inside the area that train crops (scale >= 0.6) and the eval centre crop keep
        x0, y0 = int(w * 0.42), int(w * 0.12)
        draw.rectangle([x0, y0, x0 + int(w * 0.16), y0 + int(w * 0.08)], fill=(40, 210, 90))
        draw.rectangle([x0 + int(w * 0.03), y0 + int(w * 0.03), x0 + int(w * 0.13), y0 + int(w * 0.05)],
                       fill=(255, 255, 255))
    image = image.resize((size, size), Image.BOX)
    if scene == "camera":  # sensor noise: real footage is never perfectly flat
        arr = np.asarray(image, dtype=np.int16) + rng.normal(0, 4, (size, size, 3)).astype(np.int16)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return image, boxes, bodies


def _background(rng, w: int, scene: str) -> np.ndarray:
    top, bottom = _muted(rng), _muted(rng)
    if scene == "camera":  # smooth lighting gradient
        t = np.linspace(0.0, 1.0, w)[:, None, None]
        return np.broadcast_to(top * (1 - t) + bottom * t, (w, w, 3)).astype(np.uint8)
    arr = np.empty((w, w, 3), np.uint8)  # flat game geometry: floor, wall and a few blocks
    horizon = int(w * rng.uniform(0.4, 0.7))
    arr[:horizon], arr[horizon:] = top, bottom
    for _ in range(rng.integers(2, 5)):
        x, y = rng.integers(0, w, 2)
        arr[y : y + rng.integers(w // 8, w // 3), x : x + rng.integers(w // 8, w // 3)] = _muted(rng)
    return arr


def _muted(rng) -> np.ndarray:
    """A colour far from red, so only the splats are red."""
    hue = rng.uniform(0.12, 0.88)
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.15, 0.6), rng.uniform(0.3, 0.85))
    return np.array([r, g, b]) * 255


def _clutter(rng, draw: ImageDraw.ImageDraw, w: int) -> None:
    x, y = rng.integers(0, w, 2)
    dx, dy = rng.integers(w // 16, w // 5, 2)
    colour = tuple(int(c) for c in _muted(rng))
    if rng.random() < 0.5:
        draw.ellipse([x, y, x + dx, y + dy], fill=colour)
    else:
        draw.rectangle([x, y, x + dx, y + dy], fill=colour)


def _splat(rng, draw: ImageDraw.ImageDraw, w: int, quadrant: int, cue: float) -> tuple[list[int], list[int]]:
    """A red blob whose jaggedness, droplets and darkness all grow with `cue`; returns its reach (twice its
    radius: the droplets too, `cue_box`) and its body (its radius: `splat_box`), as clipped boxes."""
    cx = w * (0.3 + 0.4 * (quadrant % 2) + rng.uniform(-0.05, 0.05))
    cy = w * (0.3 + 0.4 * (quadrant // 2) + rng.uniform(-0.05, 0.05))
    radius = w * rng.uniform(0.11, 0.15)
    n = 72
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = 1 + 0.12 * rng.normal() * np.cos(2 * theta + rng.uniform(0, 6.3))  # shape variety for both
    for k in range(5, 10):  # mid-frequency ragged edge
        r += cue * 0.06 * rng.normal() * np.cos(k * theta + rng.uniform(0, 6.3))
    r += cue * 0.8 * rng.random(n) ** 4  # occasional sharp spikes
    r = radius * np.clip(r, 0.4, None)
    points = list(zip(cx + r * np.cos(theta), cy + r * np.sin(theta)))
    red = (int(250 - 170 * cue + rng.integers(-12, 13)), int(40 - 30 * cue + rng.integers(0, 10)),
           int(40 - 25 * cue + rng.integers(0, 10)))
    draw.polygon(points, fill=red)
    for _ in range(rng.poisson(8 * cue**2)):  # droplets thrown around a real splat
        angle, dist = rng.uniform(0, 2 * math.pi), radius * rng.uniform(1.25, 1.9)
        dr = radius * rng.uniform(0.06, 0.14)
        x, y = cx + dist * math.cos(angle), cy + dist * math.sin(angle)
        draw.ellipse([x - dr, y - dr, x + dr, y + dr], fill=red)
    return tuple([int(max(cx - extent, 0)), int(max(cy - extent, 0)), int(min(cx + extent, w)),
                   int(min(cy + extent, w))] for extent in (2.0 * radius, radius))
