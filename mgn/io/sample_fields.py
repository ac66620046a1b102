"""Where a sample keeps its label and its caption, as the shard set's `dataset_card.json` says.

This project's own shards keep the label's index in `cls` and the caption in `txt`. Shards from other tools
keep them where those tools put them: webdataset's `ShardWriter` writes whatever fields its user gave (often
`cls` and `txt`), img2dataset writes `txt` and a `json` of the row's metadata, where a label is one field.
`python -m mgn.shards --index` records the choice in the card (`fields`), and every reader of samples (the
loader's decoder, the caption blocks, the caption report, evaluation's checks) takes the label and caption
through `SampleFields`, so that shards are trained on as they were written.

Member names: webdataset's reader makes the key everything up to the first dot of a file name, so the member
`a.b.jpg` of the key `a.b` arrives as field `b.jpg`. A field is therefore found by its name or, failing that,
by its last extension (`member`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

IMAGE_FIELDS = {"jpg", "jpeg", "png", "webp"}  # the members a sample's image may be in


class SampleFieldError(ValueError):
    """A sample whose label or caption is missing or unusable (the reader skips and counts it)."""


def member(sample: dict, name: str):
    """The value of member `name` (an extension like `jpg`): the field of that name, else the one field whose
    last extension it is (a key with dots); None if there is none."""
    if name in sample:
        return sample[name]
    found = [value for field, value in sample.items()
             if not field.startswith("__") and last_extension(field) == name]
    return found[0] if len(found) == 1 else None


def last_extension(field: str) -> str:
    return field.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class SampleFields:
    """The label names (their order fixes the class indices) and where a sample keeps its label and caption:
    `cls` / `txt`, or `json:FIELD`, a field of the sample's `json` member."""
    labels: tuple[str, ...] = ()
    label_from: str = "cls"
    caption_from: str = "txt"

    def __post_init__(self):
        for flag, value, plain in (("--label-from", self.label_from, "cls"),
                                   ("--caption-from", self.caption_from, "txt")):
            if value != plain and not (value.startswith("json:") and len(value) > len("json:")):
                raise ValueError(f"{flag} {value!r}: expected {plain} or json:FIELD (a field of each "
                                 "sample's .json member)")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels {list(self.labels)} name a label twice")

    @classmethod
    def from_card(cls, card: dict | None) -> "SampleFields":
        """The fields a dataset card records; a card without them (this project's writer's) means cls, txt."""
        card = card or {}
        fields = card.get("fields") or {}
        return cls(tuple(str(x) for x in card.get("labels", ())), fields.get("label", "cls"),
                   fields.get("caption", "txt"))

    def to_card(self) -> dict:
        return {"label": self.label_from, "caption": self.caption_from}

    @property
    def members(self) -> set[str]:
        """The extensions a reader of labels and captions needs from each sample."""
        return {source.split(":", 1)[0] for source in (self.label_from, self.caption_from)}

    @property
    def label_member(self) -> str:
        return self.label_from.split(":", 1)[0]

    def label(self, sample: dict) -> int:
        """The class index: an integer (or its text) below len(labels), or a label's name; true/false: 1/0."""
        value = self._value(sample, self.label_from, "label")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace").strip()
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, str) and value in self.labels:
            return self.labels.index(value)
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise SampleFieldError(f"label {value!r} from {self.label_from} is not one of the labels "
                                   f"{list(self.labels)} nor a class index") from None
        if index < 0 or (self.labels and index >= len(self.labels)):
            raise SampleFieldError(f"label {index} from {self.label_from} is not a class index of the labels "
                                   f"{list(self.labels)}")
        return index

    def caption(self, sample: dict) -> bytes:
        """The caption as UTF-8 bytes, as a `txt` member holds it."""
        value = self._value(sample, self.caption_from, "caption")
        if isinstance(value, bytes):
            return value
        if not isinstance(value, str):
            raise SampleFieldError(f"caption from {self.caption_from} is a {type(value).__name__}, not text")
        return value.encode("utf-8")

    def _value(self, sample: dict, source: str, what: str):
        name, _, field = source.partition(":")
        raw = member(sample, name)
        if raw is None:
            raise SampleFieldError(f"no {what}: missing {name}")
        if not field:
            return raw
        try:
            meta = json.loads(raw)
        except ValueError as error:
            raise SampleFieldError(f"no {what}: its json does not parse ({error})") from None
        if not isinstance(meta, dict) or meta.get(field) is None:
            raise SampleFieldError(f"no {what}: its json has no {field!r}")
        return meta[field]
