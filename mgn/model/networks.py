"""The Multimodal Guidance Network's parts (arXiv 2309.03452, section II) and its image-only student.

    caption -> text encoder -> [B, L, H] -> block [B, H, sqrt L, sqrt L] -> resized to the image grid --+
    image -> MobileOne -> image embedding [B, C, h, w] ----------------------------------------------+-->
    concat concat -> 3 x (conv3x3 -> ReLU -> BatchNorm) -> fusion [B, D, h, w] -> self-attention -> map map
    applied to the ORIGINAL image embedding -> pooled -> head -> logits

The student is `ImageClassifier` (image encoder -> pool -> head); `GuidancePath` is everything the
guided training adds on top of the student's image embedding. How the two are trained together is an
objective's business (mgn/model/objectives.py), so the deployed model is the very module that was trained.
Design choices are explained in mgn/DESIGN.md.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from torch import nn

from mgn.config import ModelConfig, resolve_text_model
from mgn.model.weights import load_backbone_weights

log = logging.getLogger("mgn")


class ImageClassifier(nn.Module):
    """MobileOne feature map -> global average pool -> linear head. The baseline and the student."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = create_image_encoder(cfg)
        self.num_features = self.encoder.num_features
        self.head = ClassifierHead(self.num_features, cfg.num_classes, pool_type="avg",
                                   drop_rate=cfg.drop_rate)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(image))


def create_image_encoder(cfg: ModelConfig) -> nn.Module:
    """A timm backbone returning its last feature map [B, C, h, w]; downloads only if asked ('hub'). A local
    file is read by mgn/model/weights.py (safetensors, or a state dict read with weights_only=True)."""
    kwargs = dict(num_classes=0, global_pool="")
    if cfg.image_pretrained == "hub":
        return timm.create_model(cfg.image_model, pretrained=True, **kwargs)
    encoder = timm.create_model(cfg.image_model, pretrained=False, **kwargs)
    if cfg.image_pretrained:
        log.info("MGN: image encoder %s: %s", cfg.image_model,
                 load_backbone_weights(encoder, cfg.image_pretrained))
    return encoder


class TextBlockEncoder(nn.Module):
    """Token embeddings [B, L, H] as a spatial block [B, H, sqrt L, sqrt L] (paper II-A)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import AutoModel  # heavy import, guided mode only

        self.side = math.isqrt(cfg.seq_len)
        if self.side * self.side != cfg.seq_len:
            raise ValueError(f"model.seq_len={cfg.seq_len} is not a perfect square")
        self.model = AutoModel.from_pretrained(resolve_text_model(cfg.text_model))
        self.hidden_size = self.model.config.hidden_size
        self.frozen = cfg.freeze_text
        if self.frozen:
            self.model.requires_grad_(False)
        # A frozen encoder maps a caption to the same block every epoch: remember recent ones.
        self.cache_size = cfg.text_cache if self.frozen else 0
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def train(self, mode: bool = True) -> "TextBlockEncoder":
        # A frozen encoder stays in eval mode (no dropout), whatever the caller asks.
        return super().train(mode and not self.frozen)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.side * self.side:
            raise ValueError(f"got {input_ids.shape[1]} tokens per caption, "
                             f"expected seq_len={self.side ** 2}")
        if not self.cache_size:
            return self.encode(input_ids, attention_mask)
        keys = [row.tobytes() for row in torch.cat([input_ids, attention_mask], dim=1).cpu().numpy()]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            for i, block in zip(missing, self.encode(input_ids[missing], attention_mask[missing])):
                self.cache[keys[i]] = block.clone()  # not a view: evicting frees it
        blocks = torch.stack([self.cache[key] for key in keys])
        for key in keys:
            self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return blocks

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens = self.model(input_ids=input_ids,
                                attention_mask=self.prepared_mask(attention_mask)).last_hidden_state
        # Padding positions carry no caption content: zero them so the block depends on real tokens only.
        tokens = tokens * attention_mask.unsqueeze(-1).to(tokens.dtype)
        return tokens.transpose(1, 2).reshape(batch, self.hidden_size, self.side, self.side)


    def prepared_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask as SDPA attention takes it, [B, 1, L, L] booleans (keys each query may see), which
        transformers passes through as it is: given the 2-D mask it asks the host whether any caption is
        padded (`padding_mask.all()`), a wait for the GPU at every step. [CLS] stays visible to every query,
        so that an empty caption (caption dropout) attends somewhere; its block is zeroed in `encode` anyway.
        Real captions come out bitwise as with the 2-D mask (tests/test_model.py). Other attention kinds take
        the 2-D mask."""
        if self.model.config._attn_implementation != "sdpa":
            return attention_mask
        keys = attention_mask.bool()
        keys[:, 0] = True
        length = keys.shape[1]
        return keys[:, None, None, :].expand(-1, 1, length, length)


class Fusion(nn.Module):
    """Three conv3x3 layers, each followed by ReLU and BatchNorm (paper II-B)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        layers = []
        for i in range(3):
            layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                       nn.ReLU(inplace=True), nn.BatchNorm2d(out_channels)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TokenAttention(nn.Module):
    """The paper's reading: full self-attention over the h*w fusion tokens.

    Queries and keys come from the fusion; the resulting [N, N] map mixes the image tokens.
    Uniform attention turns every token into the spatial mean, so pooling it equals the student's pooling.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, fusion: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = fusion.shape
        tokens = fusion.flatten(2).transpose(1, 2)  # [B, N, D]
        _, weights = self.attn(tokens, tokens, tokens, need_weights=True, average_attn_weights=True)
        mixed = torch.bmm(weights, values.flatten(2).transpose(1, 2))  # [B, N, N] @ [B, N, C]
        spatial = weights.mean(dim=1).reshape(b, h, w)  # how much each position feeds the pooled output
        return mixed.transpose(1, 2).reshape(values.shape), spatial


class PoolAttention(nn.Module):
    """The authors' released code, corrected: a mean-token query attends over the spatial keys.

    Their code keeps `attn[:, 0, :-1]`, which drops the last position and keeps the mean token's own
    weight, shifting the map by one. Here keys are the spatial tokens only, so the map has exactly
    h*w entries aligned with the grid and sums to 1. Values are scaled by N so a uniform map is identity.
    """

    def __init__(self, dim: int, heads: int, grid: int):
        super().__init__()
        self.heads = heads
        self.position = nn.Parameter(torch.randn(grid + 1, dim) / dim ** 0.5)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)

    def forward(self, fusion: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, d, h, w = fusion.shape
        n = h * w
        if n + 1 != self.position.shape[0]:
            raise ValueError(f"attention was built for a {self.position.shape[0] - 1}-cell grid, got {h}x{w}")
        tokens = fusion.flatten(2).transpose(1, 2)  # [B, N, D]
        query = self.query(tokens.mean(dim=1, keepdim=True) + self.position[:1])  # [B, 1, D]
        keys = self.key(tokens + self.position[1:])
        q = query.reshape(b, 1, self.heads, -1).transpose(1, 2)  # [B, heads, 1, D/heads]
        k = keys.reshape(b, n, self.heads, -1).transpose(1, 2)  # [B, heads, N, D/heads]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)  # [B, heads, 1, N]
        spatial = scores.softmax(dim=-1).mean(dim=1).reshape(b, h, w)  # sums to 1 over the grid
        return values * spatial.unsqueeze(1) * n, spatial


@dataclass
class GuidedOutput:
    logits: torch.Tensor  # guided (teacher) logits
    attention: torch.Tensor  # [B, h, w] spatial attention map, sums to 1


class GuidancePath(nn.Module):
    """Everything MGN adds for training: text encoder, fusion, cross-modality attention, optional teacher
    head.

    It takes the image embedding from the student's encoder and returns the guided (teacher) logits.
    The classifier is the student's own head (`student_head`, the paper) unless this path has a head
    of its own: always with `attend_to=fusion` (the fusion has other channels), or when an objective
    asks for a separate teacher head so the deployed head learns from image-only features alone.
    """

    def __init__(self, cfg: ModelConfig, image_channels: int, *, separate_head: bool = False):
        super().__init__()
        self.cfg = cfg
        self.text = TextBlockEncoder(cfg)
        self.grid = grid_size(cfg)
        self.fusion = Fusion(image_channels + self.text.hidden_size, cfg.fusion_dim)
        if cfg.attention == "token":
            self.attention = TokenAttention(cfg.fusion_dim, cfg.attention_heads)
        else:
            self.attention = PoolAttention(cfg.fusion_dim, cfg.attention_heads, self.grid[0] * self.grid[1])
        head_channels = cfg.fusion_dim if cfg.attend_to == "fusion" else image_channels
        self.teacher_head = (ClassifierHead(head_channels, cfg.num_classes, pool_type="avg")
                             if cfg.attend_to == "fusion" or separate_head else None)

    def forward(self, image_embedding: torch.Tensor, student_head: nn.Module, *,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                text_block: torch.Tensor | None = None) -> GuidedOutput:
        """Captions as tokens, or as blocks already encoded and pooled to the grid
        (mgn/train/text_blocks.py)."""
        if text_block is None:
            text_block = self.text(input_ids, attention_mask)  # [B, H, s, s]
        # Bring the text block onto the image grid (11x11 -> 7x7 for S4 at 224 px): the map must live
        # on the image embedding's own grid so it re-weights the original, unresized embedding.
        text_block = F.adaptive_avg_pool2d(text_block, image_embedding.shape[-2:])
        # in the image embedding's layout (channels-last on a GPU): a mixed `cat` would come out NCHW and take
        # the fusion's convolutions with it
        text_block = text_block.to(image_embedding.dtype).contiguous(memory_format=layout_of(image_embedding))
        fusion = self.fusion(torch.cat([image_embedding, text_block], dim=1))
        values = fusion if self.cfg.attend_to == "fusion" else image_embedding
        attended, spatial = self.attention(fusion, values)
        head = self.teacher_head if self.teacher_head is not None else student_head
        return GuidedOutput(logits=head(attended), attention=spatial)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels-last when `x` is laid out so (and not also plain contiguous, as a 1 x 1 map is), else NCHW."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def grid_size(cfg: ModelConfig) -> tuple[int, int]:
    """(h, w) of the image embedding: the backbone's last feature map at `model.image_size` (MobileOne and
    most timm backbones downsample by 32: 7 x 7 at 224 px), found by a forward pass on the meta device, which
    allocates no memory and computes nothing."""
    return _feature_grid(cfg.image_model, cfg.image_size)


@functools.lru_cache(maxsize=None)
def _feature_grid(image_model: str, image_size: int) -> tuple[int, int]:
    with torch.device("meta"):
        encoder = timm.create_model(image_model, pretrained=False, num_classes=0, global_pool="").eval()
        shape = encoder(torch.empty(1, 3, image_size, image_size)).shape
    return int(shape[-2]), int(shape[-1])
