"""The paper's other baseline: CLIP zero-shot classification (Fig. 2, Table I), on the same shards and
metrics.

    load_clip(name)          -> ZeroShotCLIP   a local folder or hub name; never downloads unless allowed
    ZeroShotCLIP.predict(x)  -> class probabilities: the image embedding against each class's prompt embedding
    clip_batches(clip, ...)  -> the project's test loader at CLIP's input size and normalisation

Each class has one or more prompts ("a screenshot of a video game", "a photo of real violence", ...; a JSON
file maps class names, in class-index order, to their prompts). A class's embedding is the mean of its
normalised prompt embeddings (CLIP's prompt ensembling); the predicted class is the one whose embedding is
closest to the image's by cosine similarity, and the softmax of CLIP's scaled similarities is the score that
AUROC, the PR curve and recall at a target precision are computed from, exactly as for the student.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mgn.config import DataConfig
from mgn.data.loader import eval_loader

# Binary moderation, class 0 = non_violent (in-game), class 1 = violent (real): the paper's task.
DEFAULT_PROMPTS = {
    "non_violent": ["a screenshot of a video game", "a video game scene with a special effect",
                    "a frame from a game stream", "a cartoon splash of red paint"],
    "violent": ["a photo of real violence", "a photo of a real fight", "a photo of real blood",
                "a phone video frame of a violent street scene"],
}
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ZeroShotCLIP(nn.Module):
    """CLIP's image tower against fixed class embeddings: what is timed and deployed in the CLIP baseline."""

    def __init__(self, model, class_embeddings: torch.Tensor, image_size: int, mean, std, name: str):
        super().__init__()
        self.vision, self.projection = model.vision_model, model.visual_projection
        self.register_buffer("classes", class_embeddings)  # [K, D], unit length
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.image_size, self.mean, self.std, self.name = image_size, tuple(mean), tuple(std), name

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.vision(pixel_values=pixels).pooler_output), dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits: CLIP's scaled cosine similarity of each image to each class."""
        return self.logit_scale * self.image_embedding(pixels) @ self.classes.T


def read_prompts(path: str | Path | None) -> dict[str, list[str]]:
    """{class name: [prompts]} in class-index order, from a JSON file, or the binary moderation defaults."""
    if path is None:
        return DEFAULT_PROMPTS
    prompts = json.loads(Path(path).read_text())
    if not isinstance(prompts, dict) or not all(isinstance(v, list) and v and all(isinstance(p,
                                                                                             str) for p in v)
                                                for v in prompts.values()) or len(prompts) < 2:
        raise ValueError(f"{path}: expected a JSON object mapping each class name, in class-index order, to "
                         "a "
                         f"non-empty list of prompts, for at least two classes")
    return prompts


def load_clip(name: str, prompts: dict[str, list[str]] | None = None, *, allow_download: bool = False
              ) -> ZeroShotCLIP:
    """A transformers CLIP model from a local folder (or the hub cache; the hub itself only if allowed)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(name, local_files_only=not allow_download).eval()
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=not allow_download)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"CLIP model {name!r} is not available locally ({type(error).__name__}). Nothing is downloaded "
            "by default: "
            f"fetch it once, e.g. `hf download openai/clip-vit-base-patch16 --local-dir models/clip-b16`, "
            f"and pass --clip models/clip-b16 (evaluate.py and benchmark.py also take "
            "--allow-download)") from error
    try:
        processor = CLIPImageProcessor.from_pretrained(name, local_files_only=not allow_download)
        size = processor.crop_size["height"] if isinstance(processor.crop_size,
                                                           dict) else int(processor.crop_size)
        mean, std = processor.image_mean, processor.image_std
    except (OSError, ValueError, KeyError):  # no preprocessor_config.json: CLIP's own defaults
        size, mean, std = model.config.vision_config.image_size, OPENAI_MEAN, OPENAI_STD
    prompts = prompts or DEFAULT_PROMPTS
    with torch.inference_mode():
        classes = []
        for texts in prompts.values():
            tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            text = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            embeddings = F.normalize(model.text_projection(text.pooler_output), dim=-1)
            classes.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return ZeroShotCLIP(model, torch.stack(classes), size, mean, std, name).eval()


def clip_batches(clip: ZeroShotCLIP, test_shards: str, *, batch_size: int = 64, num_workers: int = 2,
                 rank: int = 0, world_size: int = 1):
    """The project's test loader (mgn.data.loader.eval_loader) at CLIP's input size and normalisation."""
    return eval_loader(DataConfig(test_shards=test_shards, num_workers=num_workers),
                       image_size=clip.image_size,
                       mean=clip.mean, std=clip.std, tokenizer_name=None, seq_len=1, batch_size=batch_size,
                       rank=rank, world_size=world_size)
