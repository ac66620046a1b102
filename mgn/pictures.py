"""The cross-modality attention picture: per test sample, the image beside its map, with what the models said.

Each sample gets two panels: the input image with the attention grid drawn over it, and the map itself,
one cell per grid position. The map is shown as attention relative to uniform (map x number of cells) on a
fixed log scale from 1/4x to 4x shared by every panel and every evaluation, so a flat map is a flat neutral
grey and a real hot spot stands out; a purple-to-green colour map keeps clear of the red in the images.
Above the panels: the true label, the guided teacher's and the image-only student's predictions; below:
the caption, cut to fit.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

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


def samples_from_batch(images: torch.Tensor, attention: torch.Tensor, labels, teacher_logits, student_logits,
                       captions: list[str], mean, std, class_names: list[str], limit: int = 6) -> list[AttentionSample]:
    """Undo the normalisation and pair each image with its map, label, predictions and caption."""
    pixels = images[:limit].float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    def name(index: int) -> str:
        return class_names[index] if index < len(class_names) else f"class {index}"

    teacher, student = teacher_logits.argmax(-1).tolist(), student_logits.argmax(-1).tolist()
    return [AttentionSample(pixels[i], attention[i].float().cpu().numpy(), name(int(labels[i])), name(teacher[i]),
                            name(student[i]), captions[i] if i < len(captions) else "")
            for i in range(len(pixels))]


def attention_figure(samples: list[AttentionSample], title: str = "") -> np.ndarray:
    """An RGB picture [H, W, 3] uint8 of the samples, two panels each, three samples a row, with a colour bar."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.colors import Normalize  # noqa: PLC0415

    columns = min(3, len(samples))
    rows = math.ceil(len(samples) / columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(4.2 * columns, 2.6 * rows + 0.6), squeeze=False, dpi=110)
    norm = Normalize(-SCALE, SCALE)
    shown = None
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        sample_index, panel = divmod(index, 2)
        if sample_index >= len(samples):
            continue
        s = samples[sample_index]
        h, w = s.attention.shape
        relative = np.log2(np.clip(s.attention * h * w, 2 ** -SCALE, 2 ** SCALE))
        if panel == 0:
            ax.imshow(s.image)
            size = s.image.shape[0]
            for k in range(1, h):  # the grid the map lives on
                ax.axhline(k * size / h - 0.5, color="white", linewidth=0.8, alpha=0.8)
            for k in range(1, w):
                ax.axvline(k * size / w - 0.5, color="white", linewidth=0.8, alpha=0.8)
            wrong = "" if s.teacher == s.student == s.label else "  (!)"
            ax.set_title(f"label {s.label}\nteacher {s.teacher} | student {s.student}{wrong}", fontsize=7, loc="left")
            caption = s.caption if len(s.caption) <= 60 else s.caption[:57] + "..."
            ax.text(0, -0.03, caption, fontsize=6, va="top", transform=ax.transAxes)
        else:
            shown = ax.imshow(relative, cmap=COLOUR_MAP, norm=norm)
            for (r, c), value in np.ndenumerate(s.attention * h * w):
                ax.text(c, r, f"{value:.1f}x", ha="center", va="center", fontsize=7)
            ax.set_title("attention / uniform", fontsize=7)
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8, ticks=[-2, -1, 0, 1, 2])
        bar.ax.set_yticklabels(["1/4x", "1/2x", "uniform", "2x", "4x"], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    from PIL import Image  # noqa: PLC0415

    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
