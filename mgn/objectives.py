"""Training objectives: one class per way of training the image-only student, one factory from the config.

An objective is the module DeepSpeed trains. It owns the student (`self.student`: MobileOne + head, the
deployed model) and, when it reads captions, the guidance path (`self.guide`: text encoder, fusion,
attention, maybe a teacher head). It says

    uses_captions      whether batches must carry tokenized captions
    forward(...)       the training loss for a batch, its named terms, and the logits it trains (for accuracy)
    predict(...)       what evaluation scores: the student's logits (always) and the guided teacher's

so the train loop, evaluation and the step benchmark hold no branches on the variant. Every objective
builds the student first, from the same random state: with the same seed, all of them start from the
same image encoder and head (the comparison runner pairs its arms on this; tests/test_objectives.py).
The variants and their sources are described in mgn/DESIGN.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mgn.config import OBJECTIVES, Config
from mgn.model import GuidancePath, ImageClassifier


@dataclass
class StepOutput:
    loss: torch.Tensor  # what backward() is called on
    logits: torch.Tensor  # the logits this objective trains on the labels (training accuracy)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts of the loss, for the log


@dataclass
class Prediction:
    student: torch.Tensor  # image-only logits: the deployed model
    teacher: torch.Tensor | None = None  # guided logits (image + caption)
    attention: torch.Tensor | None = None  # [B, h, w] cross-modality map


class Objective(nn.Module):
    """Image-only fine-tuning: cross-entropy on the student's logits. The base of every objective."""

    name = "baseline"
    uses_captions = False

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.smoothing = cfg.train.label_smoothing
        self.student = ImageClassifier(cfg.model)  # first: same init for every objective of a seed

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.smoothing)

    def forward(self, image: torch.Tensor, label: torch.Tensor, **captions) -> StepOutput:
        logits = self.student(image)
        loss = self.cross_entropy(logits, label)
        return StepOutput(loss=loss, logits=logits, terms={"student_ce": loss})

    @torch.no_grad()
    def predict(self, image: torch.Tensor, **captions) -> Prediction:
        return Prediction(student=self.student(image))


class Guided(Objective):
    """The paper's MGN (section II): the classifier learns from the caption-re-weighted image embedding.

    loss = CE(guided logits) + student_weight * CE(student logits on the plain embedding), one shared head.
    The second term keeps the head valid for the un-re-weighted features it sees at inference
    (student_weight 0 is the paper's loss exactly). `caption_dropout` empties a share of the training
    captions, so the guided path cannot always lean on the text.
    """

    name = "guided"
    uses_captions = True
    separate_teacher_head = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.guide = GuidancePath(cfg.model, self.student.num_features, separate_head=self.separate_teacher_head)
        self.caption_dropout = cfg.objective.caption_dropout

    def guided(self, embedding: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if self.training and self.caption_dropout > 0:
            keep = torch.rand(len(input_ids), 1, device=attention_mask.device) >= self.caption_dropout
            attention_mask = attention_mask * keep  # an empty caption: every text position is zeroed
        return self.guide(embedding, input_ids, attention_mask, self.student.head)

    def forward(self, image, label, input_ids, attention_mask) -> StepOutput:
        embedding = self.student.encoder(image)
        teacher = self.guided(embedding, input_ids, attention_mask).logits
        guided_ce = self.cross_entropy(teacher, label)
        terms = {"guided_ce": guided_ce}
        loss = guided_ce
        weight = self.cfg.objective.student_weight
        if weight > 0:
            terms["student_ce"] = self.cross_entropy(self.student.head(embedding), label)
            loss = loss + weight * terms["student_ce"]
        return StepOutput(loss=loss, logits=teacher, terms=terms)

    @torch.no_grad()
    def predict(self, image, input_ids, attention_mask) -> Prediction:
        embedding = self.student.encoder(image)
        out = self.guided(embedding, input_ids, attention_mask)
        return Prediction(student=self.student.head(embedding), teacher=out.logits, attention=out.attention)


class Distill(Guided):
    """Generalized distillation (Lopez-Paz, Bottou, Schoelkopf, Vapnik, ICLR 2016), trained online.

    The teacher (guided path, its own head) sees the caption and learns from the labels on the image
    embedding with its gradient stopped, so the text reaches the encoder only through the teacher's
    softened predictions: student loss = (1 - w) CE(labels) + w T^2 KL(teacher_T || student_T).
    """

    name = "distill"
    separate_teacher_head = True

    def forward(self, image, label, input_ids, attention_mask) -> StepOutput:
        o = self.cfg.objective
        embedding = self.student.encoder(image)
        teacher = self.guided(embedding.detach(), input_ids, attention_mask).logits
        student = self.student.head(embedding)
        teacher_ce = self.cross_entropy(teacher, label)
        student_ce = self.cross_entropy(student, label)
        soft = F.kl_div(F.log_softmax(student.float() / o.temperature, dim=-1),
                        F.log_softmax(teacher.detach().float() / o.temperature, dim=-1),
                        reduction="batchmean", log_target=True) * o.temperature ** 2
        loss = teacher_ce + (1 - o.distill_weight) * student_ce + o.distill_weight * soft
        return StepOutput(loss=loss, logits=student,
                          terms={"teacher_ce": teacher_ce, "student_ce": student_ce, "distill_kl": soft})


class Tram(Guided):
    """TRAM, "Transfer and Marginalize" (Collier et al., arXiv 2202.09244).

    The image encoder learns only through the guided (privileged) path and its own head; the deployed
    head is trained on the same features with their gradient stopped, so at test time it reads what the
    guided training put into the encoder, at the baseline's cost.
    """

    name = "tram"
    separate_teacher_head = True

    def forward(self, image, label, input_ids, attention_mask) -> StepOutput:
        embedding = self.student.encoder(image)
        teacher = self.guided(embedding, input_ids, attention_mask).logits
        student = self.student.head(embedding.detach())
        teacher_ce = self.cross_entropy(teacher, label)
        student_ce = self.cross_entropy(student, label)
        return StepOutput(loss=teacher_ce + student_ce, logits=student,
                          terms={"teacher_ce": teacher_ce, "student_ce": student_ce})


class AttentionTransfer(Guided):
    """Attention transfer (after Zagoruyko & Komodakis, ICLR 2017) from the text-derived map to the student.

    The guided path learns its map from the labels on the image embedding with its gradient stopped
    (fusion, attention and its own head only). The student learns from the labels plus a term pulling
    its parameter-free spatial map (channel mean of squared activations) towards the detached
    cross-modality map: the encoder learns where to look; nothing is added at inference.
    """

    name = "attention_transfer"
    separate_teacher_head = True

    def forward(self, image, label, input_ids, attention_mask) -> StepOutput:
        embedding = self.student.encoder(image)
        out = self.guided(embedding.detach(), input_ids, attention_mask)
        student = self.student.head(embedding)
        teacher_ce = self.cross_entropy(out.logits, label)
        student_ce = self.cross_entropy(student, label)
        transfer = map_distance(feature_map(embedding), out.attention.detach())
        loss = teacher_ce + student_ce + self.cfg.objective.attention_weight * transfer
        return StepOutput(loss=loss, logits=student,
                          terms={"teacher_ce": teacher_ce, "student_ce": student_ce, "attention_mse": transfer})


def feature_map(embedding: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h, w]: where the features are strong (mean of squares over channels)."""
    return embedding.float().pow(2).mean(dim=1)


def map_distance(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance of the two maps after each is scaled to unit L2 norm (Zagoruyko & Komodakis)."""
    s = F.normalize(student.flatten(1), dim=1)
    t = F.normalize(target.float().flatten(1), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()


REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (Objective, Guided, Distill, Tram, AttentionTransfer)}
assert set(REGISTRY) == set(OBJECTIVES), "mgn.config.OBJECTIVES and the objective classes disagree"


def build_objective(cfg: Config) -> Objective:
    """The objective named by `objective.name`, with its student built first."""
    return REGISTRY[cfg.objective.name](cfg)
