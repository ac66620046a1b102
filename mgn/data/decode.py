"""What a sample becomes: image bytes -> an RGB crop, captions -> tokens, samples -> a batch, a batch -> model
inputs.

Workers decode each image to RGB (a JPEG at a reduced scale when that still leaves the crop enough
pixels), crop it (train: a random resized crop and flip from the generator the reader seeds per sample;
eval: a centre crop), and collate the crops as uint8 into shared memory, captions as token ids of a fixed
length (padded from the ids the shard writer stored, mgn/data/tokens.py, or tokenized here where it stored
none). What the main process hands on is the batch form (`data.batch_form`, mgn/devices.py): `float`,
normalised float32 NCHW made with numpy; or `uint8`, the NHWC pixels as the workers made them (pinned by the
loader's pin thread for a GPU). `ModelInputs` is the one way from either form to the model's inputs on the
rank's device: training, evaluation, the attention picture and the benchmarks all go through it, so a GPU
run's batch path is the one CI runs (uint8 on the CPU). Apart from the reader (mgn/data/loader.py, which
decides which samples and in what order) so that the cost and the output of a sample can be read, tested and
timed on their own (benchmarks/loader_throughput.py).
"""
from __future__ import annotations

import json
import math
import random
from typing import TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from mgn import devices
from mgn.data import tokens
from mgn.config import GROUND_TRUTH_FIELDS
from mgn.io.images import DEFAULT_MAX_PIXELS, cap_caption, open_capped, to_rgb
from mgn.io.sample_fields import IMAGE_FIELDS, SampleFields, last_extension

TRAIN_SCALE, TRAIN_RATIO = (0.6, 1.0), (3 / 4, 4 / 3)
EVAL_CROP_PCT = 0.875  # timm's default for MobileOne: resize to size/0.875, centre-crop size


class Batch(TypedDict, total=False):
    """What a loader yields, by key: the names every module that touches a batch shares."""
    image: torch.Tensor  # [B, 3, H, W] float32, normalised (batch form float); or [B, H, W, 3] uint8 (uint8)
    label: torch.Tensor  # [B] int64 class indices
    key: list[str]  # the samples' keys (webdataset __key__)
    caption: list[str]  # the raw captions (objectives that read them): for the attention picture
    input_ids: torch.Tensor  # [B, seq_len] int64 tokens, padded and cut to model.seq_len
    attention_mask: torch.Tensor  # [B, seq_len] int64, 1 on real tokens
    # [B, H, g, g] bf16: the captions' precomputed blocks instead of tokens (text_blocks)
    text_block: torch.Tensor
    # [B, 4] the deciding splat's reach and body in the crop (positive controls, synthetic data only)
    cue_box: np.ndarray
    splat_box: np.ndarray
    caption_label: np.ndarray  # [B] what an informative caption says the label is (oracle_caption)
    posterior: np.ndarray  # [B] the generator's P(violent | image) (positive controls, synthetic data only)


def image_normalisation(model_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the image encoder's inputs are normalised with, per RGB channel: `model.image_mean/std`
    when set (a run fills them in at its start, so its config and students carry them), else the image model's
    timm pretrained config's, else ImageNet's. The loader normalises with them and pictures undo them."""
    if model_cfg.image_mean and model_cfg.image_std:
        return tuple(map(float, model_cfg.image_mean.split(","))), tuple(map(float,
                                                                             model_cfg.image_std.split(",")))
    import timm  # its table of pretrained configs, read once per loader

    pretrained = timm.get_pretrained_cfg(model_cfg.image_model)
    if pretrained is None:
        return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    return tuple(pretrained.mean), tuple(pretrained.std)


class ModelInputs:
    """A loader's batch -> the objective's keyword arguments on the rank's device, whichever form the batch
    has.

    uint8 NHWC pixels are copied (without blocking, from pinned memory on a GPU) and normalised on the device;
    float NCHW ones are copied as they are. Same arithmetic as the main process's numpy path
    (`Decoder.normalise`): x * 1/(255 std) - mean/std in float32. Images come out in the model's layout
    (mgn.devices.memory_format); fp32, which autocast casts inside. Captions go as tokens or as precomputed
    blocks; the positive controls' ground truth as it came. `display` turns either form back into pixels for
    the attention picture."""

    def __init__(self, mean, std, device: torch.device, captions: bool = False):
        self.mean, self.std, self.device, self.captions = tuple(mean), tuple(std), device, captions
        std = torch.as_tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(device)
        self.shift = (-torch.as_tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1) / std).to(device)
        self.layout = devices.memory_format(device)

    def __call__(self, batch: "Batch") -> dict:
        inputs = {"image": self.image(batch["image"])}
        # precomputed (data.text_blocks): no tokens, no text encoder
        if self.captions and "text_block" in batch:
            inputs["text_block"] = batch["text_block"].to(self.device, non_blocking=True)
        elif self.captions:
            inputs["input_ids"] = batch["input_ids"].to(self.device, non_blocking=True)
            inputs["attention_mask"] = batch["attention_mask"].to(self.device, non_blocking=True)
        # the positive controls' per-sample ground truth (training batches only)
        for name in GROUND_TRUTH_FIELDS:
            if name in batch:
                inputs[name] = torch.as_tensor(batch[name]).to(self.device, non_blocking=True)
        return inputs

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised float32 on the device, from a batch's image in either form."""
        if pixels.dtype == torch.uint8:  # NHWC: the permuted view is channels-last already
            image = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            return image.mul_(self.scale).add_(self.shift).contiguous(memory_format=self.layout)
        return pixels.to(self.device, torch.float32, non_blocking=True).contiguous(memory_format=self.layout)

    def display(self, pixels: torch.Tensor, limit: int) -> np.ndarray:
        """[N, H, W, 3] in [0, 1], the first `limit` images of a batch's image in either form, to draw."""
        pixels = pixels[:limit].detach().cpu()
        if pixels.dtype == torch.uint8:
            return (pixels.float() / 255.0).numpy()
        rgb = pixels.float() * torch.tensor(self.std).view(1, 3, 1, 1) + torch.tensor(self.mean).view(1, 3, 1,
                                                                                                      1)
        return rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy()


class BadSample(Exception):
    """A sample that cannot become an input (missing field, bad label or caption, undecodable image)."""


class Decoder:
    """Bytes -> RGB crops -> uint8 batches with tokens (workers) -> normalised float batches (main
    process)."""

    def __init__(self, image_size: int, mean, std, tokenizer_name: str | None, seq_len: int, *, train: bool,
                 seed: str = "", max_pixels: int = DEFAULT_MAX_PIXELS, max_caption_bytes: int = 4096,
                 batch_form: str = "float", pin: bool = False, ground_truth: tuple[str, ...] = (),
                 text_blocks=None, fields: SampleFields = SampleFields()):
        self.size, self.train, self.seed = image_size, train, seed
        self.fields = fields  # where samples keep label and caption (the shard set's card says)
        self.batch_form, self.pin = batch_form, pin  # pin: text blocks made in page-locked memory (a GPU run)
        self.ground_truth = ground_truth  # per-sample fields from a synthetic sample's json (mgn.config)
        # a mgn.data.block_files.TextBlockReader: precomputed captions, no tokenizing
        self.text_blocks = text_blocks
        self.max_pixels, self.max_caption_bytes = max_pixels, max_caption_bytes
        self.tokenizer_name, self.seq_len = tokenizer_name, seq_len
        # the shard field with this tokenizer's stored ids (mgn/data/tokens.py); None: tokenize every caption
        self.ids_field = tokens.field_name(tokenizer_name) if tokenizer_name is not None else None
        if self.ids_field is not None:
            self.pad_id = tokens.load_tokenizer(tokenizer_name).pad_token_id
            self.id_bound = tokens.id_bound(tokenizer_name)
        std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) / std

    def reads(self, field: str) -> bool:
        """Whether decoding reads a sample's member `field` (its extension): the loader passes over the others
        unread, before its shuffle buffer."""
        return (last_extension(field) in IMAGE_FIELDS | self.fields.members or field == self.ids_field
                or (field == "json" and bool(self.ground_truth)))

    @property
    def reads_captions(self) -> bool:
        return self.tokenizer_name is not None or self.text_blocks is not None

    def decode(self, sample: dict, rng: random.Random | None = None) -> tuple:
        """(key, crop, caption, label, extras): `extras` holds what the decoder was asked for beyond them, by
        name: the caption's stored token ids (`ids`: None where they are absent or unusable), ground-truth
        fields, the precomputed text block."""
        field = next((f for f in sample if last_extension(f) in IMAGE_FIELDS and f[:2] != "__"), None)
        if field is None:
            raise BadSample("missing image (jpg/png/webp)")
        try:
            label = self.fields.label(sample)
            # a reader of images only (a baseline, the deployed student) needs no caption
            caption_bytes = self.fields.caption(sample) if self.reads_captions else b""
            caption = cap_caption(caption_bytes, self.max_caption_bytes)  # before tokenizing: bounded cost
        except ValueError as exc:  # SampleFieldError, bad UTF-8
            raise BadSample(str(exc)) from None
        try:
            image = self.load_rgb(sample[field])
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken data
            raise BadSample(f"undecodable image: {exc}") from None
        geometry = self.geometry(*image.size, rng)
        extras = self.read_ground_truth(sample, geometry, image.size[0], label) if self.ground_truth else {}
        if self.text_blocks is not None:  # named here, read in the main process (TextBlockReader says why)
            extras["text_block"] = (sample["__url__"], sample["__index__"], sample["__key__"])
        if self.ids_field is not None:  # None where the caption must be tokenized
            extras["ids"] = tokens.stored_ids(sample.get(self.ids_field), caption_bytes, seq_len=self.seq_len,
                                              max_caption_bytes=self.max_caption_bytes,
                                              id_bound=self.id_bound)
            if extras["ids"] is not None and tokens.spot_checked(sample["__key__"], sample.get("__index__",
                                                                                               0)):
                tokens.check_ids(self.tokenizer_name, caption, extras["ids"], shard=sample.get("__url__",
                                                                                               "?"),
                                 key=sample["__key__"])
        return sample["__key__"], self.transform(image, rng, geometry), caption, label, extras

    def load_rgb(self, data: bytes) -> Image.Image:
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; keep enough pixels for the crop. Past the pixel cap
        # (read from the header) anything that cannot be decoded reduced is a bad sample, not a memory spike.
        need = math.ceil(self.size * (1.5 if self.train else 1 / EVAL_CROP_PCT))
        # RGB always: the normalisation constants are RGB
        return to_rgb(open_capped(data, self.max_pixels, need, reduce=True), upright=False)

    def transform(self, image: Image.Image, rng: random.Random | None,
                  geometry: tuple | None = None) -> np.ndarray:
        """Crop and resize in one PIL call; train: random resized crop + flip, eval: centre crop."""
        box, flip = geometry or self.geometry(*image.size, rng)
        out = np.asarray(image.resize((self.size, self.size), Image.BILINEAR, box=box))
        return out[:, ::-1] if flip else out

    def geometry(self, w: int, h: int, rng: random.Random | None) -> tuple[tuple[float, ...], bool]:
        """The crop box and whether to flip: train draws the box, then the flip, from the sample's
        generator."""
        if not self.train:
            return _centre_crop(w, h), False
        box = _random_crop(w, h, rng)
        return box, rng.random() < 0.5

    def read_ground_truth(self, sample: dict, geometry: tuple, width: int, label: int) -> dict:
        """The fields of `ground_truth` from the sample's json: the boxes (`cue_box`: the deciding splat's
        reach; `splat_box`: its body) as seen in this crop (box_in_crop), `posterior` as written,
        `caption_label` the true label where the caption is informative and the stored `label` elsewhere. Only
        synthetic shards written with the generator's ground_truth option have them."""
        try:
            meta = json.loads(sample["json"])
            out = {}
            for box in ("cue_box", "splat_box"):
                if box in self.ground_truth:
                    scale = width / meta["frame_size"]  # a JPEG may decode at a reduced scale
                    out[box] = box_in_crop([v * scale for v in meta[box]], *geometry)
            if "posterior" in self.ground_truth:
                out["posterior"] = float(meta["posterior"])
            if "caption_label" in self.ground_truth:
                out["caption_label"] = float(meta["true_label"] if meta["caption_informative"] else label)
        except (KeyError, ValueError, TypeError) as exc:
            raise BadSample(f"no ground truth ({exc!r}): {', '.join(self.ground_truth)} come from synthetic "
                            "shards written with the generator's ground_truth option") from None
        return out

    def collate(self, items: list, stats: dict, index: tuple[int, int]) -> dict:
        """Pixels stay uint8 (a quarter of float32) and are written straight into shared memory.

        Handing a batch from a worker to the main process costs about as much as decoding it
        when it is float32 (four times uint8's bytes through the pipe), so the main process normalises
        (`normalise`). Labels and tokens stay numpy:
        pickled through the pipe they cost less than a shared segment each.
        """
        shape = (len(items), self.size, self.size, 3)
        pixels = _empty_shared(shape) if get_worker_info() is not None else torch.empty(shape,
                                                                                        dtype=torch.uint8)
        np.stack([item[1] for item in items], out=pixels.numpy())
        batch = {"image": pixels, "_stats": stats, "_index": index,
                 "label": np.array([item[3] for item in items], dtype=np.int64),
                 "key": [item[0] for item in items]}
        for name in self.ground_truth:  # numpy, like the labels; ModelInputs moves them
            batch[name] = np.array([item[4][name] for item in items], dtype=np.float32)
        if self.text_blocks is not None:
            batch["text_block_refs"] = [item[4]["text_block"] for item in items]
        if self.tokenizer_name is not None:
            batch["caption"] = [item[2] for item in items]  # for the attention picture
            batch["input_ids"], batch["attention_mask"] = self.caption_tokens(items)
        return batch

    def caption_tokens(self, items: list) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) of the items' captions: padded from their stored ids where `decode`
        found usable ones, the others tokenized here (in one call)."""
        if self.ids_field is None:
            return tokens.tokenize(self.tokenizer_name, self.seq_len, [item[2] for item in items])
        stored = [item[4].get("ids") for item in items]
        input_ids, mask = tokens.pad(stored, self.seq_len, self.pad_id)
        missing = [row for row, ids in enumerate(stored) if ids is None]
        if missing:
            input_ids[missing], mask[missing] = tokens.tokenize(self.tokenizer_name, self.seq_len,
                                                                [items[row][2] for row in missing])
        return input_ids, mask

    def normalise(self, batch: dict) -> Batch:
        """Main process: the batch in its form (`float`: uint8 NHWC -> normalised float32 NCHW; `uint8`: the
        pixels as they are, pinned by the loader's pin thread where batches are pinned), numpy -> LongTensor,
        text blocks gathered from their files.

        numpy, not torch: it is single-threaded, while torch's intra-op threads on a busy CPU
        were measured to wait ~20 ms per batch for a free core (0.3 ms single-threaded at 96 px).
        """
        if self.batch_form == "float":
            pixels = batch["image"].numpy().transpose(0, 3, 1, 2)
            image = np.empty(pixels.shape, dtype=np.float32)
            np.multiply(pixels, self.scale, out=image)
            np.add(image, self.shift, out=image)
            batch["image"] = torch.from_numpy(image)
        for name in ("label", "input_ids", "attention_mask"):
            if name in batch:
                batch[name] = torch.from_numpy(batch[name])
        if "text_block_refs" in batch:
            batch["text_block"] = self.text_blocks.batch(batch.pop("text_block_refs"), pin=self.pin)
        return batch


def _empty_shared(shape) -> torch.Tensor:
    """What torch's default_collate does in workers: the batch is born shared, no copy on hand-over."""
    elem = torch.empty(0, dtype=torch.uint8)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


def _random_crop(w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop parameters, drawn from our own seeded generator."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*TRAIN_SCALE)
        ratio = math.exp(rng.uniform(math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1])))
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if cw <= w and ch <= h:
            x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return x, y, x + cw, y + ch
    return _centre_crop(w, h, 1.0)


def box_in_crop(box, crop, flip: bool) -> list[float]:
    """A box (x0, y0, x1, y1, image pixels) as the crop shows it: shares of the crop's side, clipped to [0,
    1], mirrored when the crop is flipped. A box the crop cut away has zero width or height."""
    cx0, cy0, cx1, cy1 = crop
    x0, x1 = (min(max((v - cx0) / (cx1 - cx0), 0.0), 1.0) for v in (box[0], box[2]))
    y0, y1 = (min(max((v - cy0) / (cy1 - cy0), 0.0), 1.0) for v in (box[1], box[3]))
    return [1 - x1, y0, 1 - x0, y1] if flip else [x0, y0, x1, y1]


def _centre_crop(w: int, h: int, crop_pct: float = EVAL_CROP_PCT) -> tuple[float, float, float, float]:
    side = min(w, h) * crop_pct
    x, y = (w - side) / 2, (h - side) / 2
    return x, y, x + side, y + side
