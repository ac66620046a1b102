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

Names are written once, in mgn/config.py OBJECTIVES (with the help line and the batch fields each reads),
which must stay importable without torch (`train.py --help`). Each class here registers under one of those
names with `@objective(name)`; a name declared nowhere, registered twice, or declared without a class fails at
import. The positive controls (oracle_attention, oracle_caption) and the de-biasing bound (oracle_teacher)
read the synthetic generator's per-sample ground truth, which the loader carries in training batches
(mgn/data/decode.py); they exist to show that the comparison can detect a transfer of privileged information
when one surely happens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mgn.config import OBJECTIVES, Config
from mgn.model.networks import GuidancePath, ImageClassifier


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


REGISTRY: dict[str, type[Objective]] = {}


def objective(name: str):
    """Class decorator: the class trains the objective `name` declared in mgn/config.py OBJECTIVES."""
    def register(cls: type[Objective]) -> type[Objective]:
        if name not in OBJECTIVES:
            raise ValueError(f"objective {name!r} ({cls.__name__}) is not declared in mgn/config.py "
                             "OBJECTIVES")
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice ({REGISTRY[name].__name__}, "
                             f"{cls.__name__})")
        cls.name, cls.uses_captions = name, "captions" in OBJECTIVES[name].reads
        REGISTRY[name] = cls
        return cls
    return register


@objective("baseline")
class Objective(nn.Module):
    """Image-only fine-tuning: cross-entropy on the student's logits. The base of every objective."""

    name: str
    uses_captions: bool

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


@objective("guided")
class Guided(Objective):
    """The paper's MGN (section II): the classifier learns from the caption-re-weighted image embedding.

    loss = CE(guided logits) + student_weight * CE(student logits on the plain embedding), one shared head.
    The second term keeps the head valid for the un-re-weighted features it sees at inference
    (student_weight 0 is the paper's loss exactly). `caption_dropout` empties a share of the training
    captions, so the guided path cannot always lean on the text.
    """

    separate_teacher_head = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.guide = GuidancePath(cfg.model, self.student.num_features,
                                  separate_head=self.separate_teacher_head)
        self.caption_dropout = cfg.objective.caption_dropout

    def guided(self, embedding: torch.Tensor, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, text_block: torch.Tensor | None = None):
        """The guided path on a batch's captions: as tokens, or as their precomputed blocks (`text_block`,
        mgn/train/text_blocks.py). Every forward and predict passes its `**caption` on to here."""
        if self.training and self.caption_dropout > 0:
            # an empty caption: every text position is zeroed, and so is its block
            keep = torch.rand(len(embedding), device=embedding.device) >= self.caption_dropout
            if text_block is not None:
                text_block = text_block * keep[:, None, None, None].to(text_block.dtype)
            else:
                attention_mask = attention_mask * keep[:, None]
        return self.guide(embedding, self.student.head, input_ids=input_ids, attention_mask=attention_mask,
                          text_block=text_block)

    def forward(self, image, label, **caption) -> StepOutput:
        embedding = self.student.encoder(image)
        teacher = self.guided(embedding, **caption).logits
        guided_ce = self.cross_entropy(teacher, label)
        terms = {"guided_ce": guided_ce}
        loss = guided_ce
        weight = self.cfg.objective.student_weight
        if weight > 0:
            terms["student_ce"] = self.cross_entropy(self.student.head(embedding), label)
            loss = loss + weight * terms["student_ce"]
        return StepOutput(loss=loss, logits=teacher, terms=terms)

    @torch.no_grad()
    def predict(self, image, **caption) -> Prediction:
        return self.predict_captions(image, [caption])[0]

    @torch.no_grad()
    def predict_captions(self, image, captions: list[dict]) -> list[Prediction]:
        """One prediction per caption set for the same images, the image encoded once: the caption-reliance
        check reads each image under three captions, and the encoder is most of the cost."""
        embedding = self.student.encoder(image)
        student = self.student.head(embedding)
        outs = [self.guided(embedding, **caption) for caption in captions]
        return [Prediction(student=student, teacher=out.logits, attention=out.attention) for out in outs]


@objective("distill")
class Distill(Guided):
    """Generalized distillation (Lopez-Paz, Bottou, Schoelkopf, Vapnik, ICLR 2016), trained online.

    The teacher (guided path, its own head) sees the caption and learns from the labels on the image
    embedding with its gradient stopped, so the text reaches the encoder only through the teacher's
    softened predictions: student loss = (1 - w) CE(labels) + w T^2 KL(teacher_T || student_T).
    """

    separate_teacher_head = True

    def forward(self, image, label, **caption) -> StepOutput:
        o = self.cfg.objective
        embedding = self.student.encoder(image)
        teacher = self.guided(embedding.detach(), **caption).logits
        student = self.student.head(embedding)
        teacher_ce = self.cross_entropy(teacher, label)
        student_ce = self.cross_entropy(student, label)
        soft = F.kl_div(F.log_softmax(student.float() / o.temperature, dim=-1),
                        F.log_softmax(teacher.detach().float() / o.temperature, dim=-1),
                        reduction="batchmean", log_target=True) * o.temperature ** 2
        loss = teacher_ce + (1 - o.distill_weight) * student_ce + o.distill_weight * soft
        return StepOutput(loss=loss, logits=student,
                          terms={"teacher_ce": teacher_ce, "student_ce": student_ce, "distill_kl": soft})


@objective("tram")
class Tram(Guided):
    """TRAM, "Transfer and Marginalize" (Collier et al., arXiv 2202.09244).

    The image encoder learns only through the guided (privileged) path and its own head; the deployed
    head is trained on the same features with their gradient stopped, so at test time it reads what the
    guided training put into the encoder, at the baseline's cost.
    """

    separate_teacher_head = True

    def forward(self, image, label, **caption) -> StepOutput:
        embedding = self.student.encoder(image)
        teacher = self.guided(embedding, **caption).logits
        student = self.student.head(embedding.detach())
        teacher_ce = self.cross_entropy(teacher, label)
        student_ce = self.cross_entropy(student, label)
        return StepOutput(loss=teacher_ce + student_ce, logits=student,
                          terms={"teacher_ce": teacher_ce, "student_ce": student_ce})


@objective("attention_transfer")
class AttentionTransfer(Guided):
    """Attention transfer (after Zagoruyko & Komodakis, ICLR 2017) from the text-derived map to the student.

    The guided path learns its map from the labels on the image embedding with its gradient stopped
    (fusion, attention and its own head only). The student learns from the labels plus a term pulling
    its parameter-free spatial map (channel mean of squared activations) towards the detached
    cross-modality map: the encoder learns where to look; nothing is added at inference.
    """

    separate_teacher_head = True

    def forward(self, image, label, **caption) -> StepOutput:
        embedding = self.student.encoder(image)
        out = self.guided(embedding.detach(), **caption)
        student = self.student.head(embedding)
        teacher_ce = self.cross_entropy(out.logits, label)
        student_ce = self.cross_entropy(student, label)
        transfer = map_distance(feature_map(embedding), out.attention.detach())
        loss = teacher_ce + student_ce + self.cfg.objective.attention_weight * transfer
        return StepOutput(loss=loss, logits=student,
                          terms={"teacher_ce": teacher_ce, "student_ce": student_ce,
                                 "attention_mse": transfer})


@objective("oracle_attention")
class OracleAttention(Objective):
    """Positive control: attention transfer from the true deciding region instead of the text-derived map.

    What a perfect reading of the caption's `focus` field could transfer: the most "where to look" can give.
    The term is attention_transfer's (the student's parameter-free map pulled towards a target map, both at
    unit L2 norm; weight attention_weight); the target is the share of each feature-map cell covered by the
    deciding splat's body (`splat_box`: centre +- its radius, which the loader carries through the sample's
    own crop and flip; the first bench used `cue_box`, twice as wide, half of whose mass fell on the badge's
    cells). A sample whose box the crop cut away adds no term.
    """

    def forward(self, image, label, splat_box) -> StepOutput:
        embedding = self.student.encoder(image)
        logits = self.student.head(embedding)
        student_ce = self.cross_entropy(logits, label)
        target = box_map(splat_box, *embedding.shape[-2:])
        covered = (target.flatten(1).sum(dim=1) > 0).float()
        transfer = (map_distances(feature_map(embedding),
                                  target) * covered).sum() / covered.sum().clamp(min=1)
        loss = student_ce + self.cfg.objective.attention_weight * transfer
        return StepOutput(loss=loss, logits=logits, terms={"student_ce": student_ce,
                                                           "attention_mse": transfer})


@objective("oracle_caption")
class OracleCaption(Objective):
    """Positive control: the student trained on what the captions' label information says.

    Where a caption is informative (drawn from its true label's pools) its label is the true one; elsewhere
    the stored, possibly flipped, one. No method that reads the captions can know more about the labels than
    that, so this bounds what the captions' label information can give (on `noisy-pi`, where 30% of the
    stored labels are flipped and informative captions follow the truth: the case privileged information is
    for).
    """

    def forward(self, image, label, caption_label) -> StepOutput:
        logits = self.student(image)
        caption_ce = self.cross_entropy(logits, caption_label.long())
        return StepOutput(loss=caption_ce, logits=logits, terms={"caption_ce": caption_ce})


@objective("oracle_teacher")
class OracleTeacher(Objective):
    """A de-biasing bound, not a reachable control: generalized distillation from the generator's posterior of
    the test distribution (the badge left out), which no teacher trained on image, caption and label can learn
    (its target is the training posterior, badge included).

    loss = (1 - w) CE(student, stored label) + w CE(student, [1 - p, p]), w = distill_weight, with p the Bayes
    posterior of the true label given the frame's splats (mgn/io/synthetic.py `posterior`; the spurious badge
    left out): the teacher every distillation arm would be if its teacher were perfect. Binary tasks only.
    """

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.model.num_classes != 2:
            raise ValueError("objective oracle_teacher: the generator's posterior is binary; "
                             "model.num_classes must be 2")

    def forward(self, image, label, posterior) -> StepOutput:
        logits = self.student(image)
        student_ce = self.cross_entropy(logits, label)
        p = posterior.float().clamp(0, 1)
        oracle_ce = F.cross_entropy(logits.float(), torch.stack([1 - p, p], dim=1))
        w = self.cfg.objective.distill_weight
        return StepOutput(loss=(1 - w) * student_ce + w * oracle_ce, logits=logits,
                          terms={"student_ce": student_ce, "oracle_ce": oracle_ce})


def feature_map(embedding: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h, w]: where the features are strong (mean of squares over channels)."""
    return embedding.float().pow(2).mean(dim=1)


def map_distances(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B]: squared distance of the two maps after each is scaled to unit L2 norm (Zagoruyko & Komodakis)."""
    s = F.normalize(student.flatten(1), dim=1)
    t = F.normalize(target.float().flatten(1), dim=1)
    return (s - t).pow(2).sum(dim=1)


def map_distance(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch mean of map_distances."""
    return map_distances(student, target).mean()


def box_map(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, 4] boxes (x0, y0, x1, y1 as shares of the image side, [0, 1]) -> [B, h, w]: the share of each cell
    of an h x w grid over the image that the box covers (0 outside it, 1 for a cell wholly inside)."""
    boxes = boxes.float()

    def cover(low: torch.Tensor, high: torch.Tensor, n: int) -> torch.Tensor:  # [B, n]
        edges = torch.arange(n + 1, dtype=torch.float32, device=boxes.device) / n
        overlap = torch.minimum(high[:, None], edges[None, 1:]) - torch.maximum(low[:, None], edges[None,
                                                                                                    :-1])
        return overlap.clamp(min=0) * n

    return cover(boxes[:, 1], boxes[:, 3], h)[:, :, None] * cover(boxes[:, 0], boxes[:, 2], w)[:, None, :]


_missing = sorted(set(OBJECTIVES) - set(REGISTRY))
if _missing:
    raise ImportError(f"mgn/config.py OBJECTIVES declares {_missing}, but no class in "
                      "mgn/model/objectives.py registers them")


def build_objective(cfg: Config) -> Objective:
    """The objective named by `objective.name`, with its student built first."""
    return REGISTRY[cfg.objective.name](cfg)
