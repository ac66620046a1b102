"""The cross-modality attention picture: per test sample, the image beside its map, with what the models said.

Each sample gets two panels: the input image with the attention grid drawn over it, and the map itself,
one cell per grid position. The map is shown as attention relative to uniform (map x number of cells) on a
fixed log scale from 1/4x to 4x shared by every panel and every evaluation, so a flat map is a flat neutral
grey and a real hot spot stands out; a purple-to-green colour map keeps clear of the red in the images.
Above each pair: the true label, and the guided teacher's and the image-only student's predictions, each
marked right or WRONG; below: the caption (three lines at most). Cell values are written in white on the dark
ends of the scale so that they stay readable.
"""
from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOUR_MAP = "PRGn"  # purple (less than uniform) - white - green (more): no red
SCALE = 2.0  # log2 range: 1/4x to 4x of uniform


@dataclass
class AttentionSample:
    image: np.ndarray  # [H, W, 3] in [0, 1]
    attention: np.ndarray  # [h, w], sums to 1
    label: str
    teacher: str
    student: str
    caption: str


def samples_from_batch(pixels: np.ndarray, attention: torch.Tensor, labels, teacher_logits, student_logits,
                       captions: list[str], class_names: list[str]) -> list[AttentionSample]:
    """Pair each image ([N, H, W, 3] in [0, 1]: mgn.data.decode.ModelInputs.display, whatever the batch's
    form) with its map, label, predictions and caption."""

    def name(index: int) -> str:
        return class_names[index] if index < len(class_names) else f"class {index}"

    teacher, student = teacher_logits.argmax(-1).tolist(), student_logits.argmax(-1).tolist()
    return [AttentionSample(pixels[i], attention[i].float().cpu().numpy(), name(int(labels[i])),
                            name(teacher[i]),
                            name(student[i]), captions[i] if i < len(captions) else "")
            for i in range(len(pixels))]


def attention_figure(samples: list[AttentionSample], title: str = "") -> np.ndarray:
    """An RGB picture [H, W, 3] uint8 of the samples, three a row, each with its own header, and a colour
    bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    columns = min(3, len(samples))
    rows = math.ceil(len(samples) / columns)
    fig = plt.figure(figsize=(3.9 * columns + 0.8, 2.5 * rows + (0.3 if title else 0)), dpi=110,
                     layout="constrained")
    grid, legend = fig.subfigures(1, 2, width_ratios=[3.9 * columns, 0.8])
    norm = Normalize(-SCALE, SCALE)
    shown = None
    for s, panel in zip(samples, grid.subfigures(rows, columns, squeeze=False).flat):
        image_ax, map_ax = panel.subplots(1, 2)
        _draw_image(image_ax, s)
        shown = _draw_map(map_ax, s, norm)
        panel.suptitle(f"label {s.label}\n{_verdict('teacher', s.teacher, s.label)}   "
                       f"{_verdict('student', s.student, s.label)}", fontsize=7, x=0.02, ha="left")
        panel.supxlabel("\n".join(textwrap.wrap(s.caption, 62, max_lines=3, placeholder=" ...")), fontsize=6,
                        x=0.02, ha="left")
    bar = legend.colorbar(shown, cax=legend.add_axes((0.15, 0.15, 0.18, 0.65)), ticks=[-2, -1, 0, 1, 2])
    bar.ax.set_yticklabels(["1/4x", "1/2x", "uniform", "2x", "4x"], fontsize=7)
    bar.ax.set_title("attention\n/ uniform", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def save_picture(picture: np.ndarray, path: Path) -> None:
    """An [H, W, 3] uint8 picture as a PNG file, its folder made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def _verdict(role: str, predicted: str, label: str) -> str:
    return f"{role}: {predicted} ({'right' if predicted == label else 'WRONG'})"


def _draw_image(ax, s: AttentionSample) -> None:
    """The input image with the grid the map lives on drawn over it."""
    ax.set_axis_off()
    ax.imshow(s.image)
    h, w = s.attention.shape
    size = s.image.shape[0]
    for k in range(1, h):
        ax.axhline(k * size / h - 0.5, color="white", linewidth=0.8, alpha=0.8)
    for k in range(1, w):
        ax.axvline(k * size / w - 0.5, color="white", linewidth=0.8, alpha=0.8)


def _draw_map(ax, s: AttentionSample, norm):
    """The map relative to uniform, one cell per grid position, its value written in a colour that reads."""
    ax.set_axis_off()
    h, w = s.attention.shape
    relative = s.attention * h * w
    shown = ax.imshow(np.log2(np.clip(relative, 2 ** -SCALE, 2 ** SCALE)), cmap=COLOUR_MAP, norm=norm)
    for (r, c), value in np.ndenumerate(relative):
        dark = abs(math.log2(max(value, 1e-6))) > SCALE / 2
        ax.text(c, r, f"{value:.1f}x", ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
    return shown
