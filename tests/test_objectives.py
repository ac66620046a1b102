"""Training objectives: each trains, each sends gradients where its source says and nowhere else,
every one deploys the baseline's exact student, and a seed gives every one the same starting student."""
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mgn.config import OBJECTIVES, preset_config
from mgn.model.export import fuse_student
from mgn.model.objectives import REGISTRY, box_map, build_objective, feature_map, map_distance
from mgn.model.objectives import objective as register
from tests.conftest import calibrate_batchnorm

LABELS = torch.tensor([0, 1, 1, 0])


def objective(name: str, **objective_overrides):
    cfg = preset_config("tiny", {"objective": {"name": name, **objective_overrides}})
    torch.manual_seed(0)
    return build_objective(cfg)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(4, 3, 64, 64, generator=g), "label": LABELS,
            "input_ids": torch.randint(1000, 5000, (4, 16), generator=g),
            "attention_mask": torch.ones(4, 16, dtype=torch.long)}


# the controls' ground truth: the deciding splat's body in the crop, the Bayes posterior, the caption's label
GROUND_TRUTH = {"splat_box": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.6, 0.4, 0.9],
                                           [0.6, 0.0, 0.9, 0.3]]),
                "posterior": torch.tensor([0.1, 0.9, 0.7, 0.4]),
                "caption_label": torch.tensor([1.0, 0.0, 1.0, 1.0])}


def step_inputs(model) -> dict:
    """The batch fields this objective reads (mgn/config.py OBJECTIVES), as the trainer passes them."""
    reads = OBJECTIVES[model.name].reads
    inputs = batch()
    if "captions" not in reads:
        del inputs["input_ids"], inputs["attention_mask"]
    return {**inputs, **{k: v for k, v in GROUND_TRUTH.items() if k in reads}}


def grads_of(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` received a non-zero gradient."""
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def backward_term(model, term: str) -> None:
    model.zero_grad(set_to_none=True)
    model.train()
    model(**step_inputs(model)).terms[term].backward()


def test_the_registry_is_the_configs_list_of_objectives_and_refuses_a_name_declared_nowhere_or_twice():
    assert set(REGISTRY) == set(OBJECTIVES)
    with pytest.raises(ValueError, match="'typo'.*not declared in mgn/config.py OBJECTIVES"):
        register("typo")(type("Typo", (), {}))
    with pytest.raises(ValueError, match="'tram' is registered twice"):
        register("tram")(type("Tram2", (), {}))
    assert [n for n, info in OBJECTIVES.items() if info.control] == ["oracle_attention", "oracle_caption",
                                                                     "oracle_teacher"]
    assert [n for n, info in OBJECTIVES.items() if info.control and not info.reachable] == ["oracle_teacher"]
    assert not any(REGISTRY[n].uses_captions for n in ("baseline", "oracle_attention", "oracle_caption",
                                                       "oracle_teacher"))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_trains_a_step_and_moves_the_student(name):
    model = objective(name).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    out = model(**step_inputs(model))
    assert torch.isfinite(out.loss) and out.logits.shape == (4, 2)
    assert out.terms and all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()
    optimizer.step()
    after = model.student.state_dict()
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    prediction = model.eval().predict(**{k: v for k, v in step_inputs(model).items()
                                         if k != "label" and k not in GROUND_TRUTH})
    assert prediction.student.shape == (4, 2)
    assert (prediction.teacher is not None) == model.uses_captions


def test_guided_loss_is_the_papers_plus_the_weighted_student_term():
    model = objective("guided", student_weight=0.5).eval()  # eval: BatchNorm deterministic across two calls
    inputs = batch()
    out = model(**inputs)
    pred = model.predict(**{k: v for k, v in inputs.items() if k != "label"})
    smoothing = model.smoothing
    expected = (F.cross_entropy(pred.teacher, LABELS, label_smoothing=smoothing)
                + 0.5 * F.cross_entropy(pred.student, LABELS, label_smoothing=smoothing))
    torch.testing.assert_close(out.loss, expected)
    assert set(objective("guided", student_weight=0.0)(**inputs).terms) == {"guided_ce"}


def test_baseline_trains_only_the_student():
    model = objective("baseline")
    backward_term(model, "student_ce")
    assert grads_of(model.student.encoder) and grads_of(model.student.head)
    assert not hasattr(model, "guide")


def test_distillation_teacher_logits_are_detached_and_the_text_reaches_the_encoder_only_through_them():
    model = objective("distill")
    backward_term(model, "distill_kl")
    assert grads_of(model.student.encoder) and grads_of(model.student.head)
    assert not grads_of(model.guide)  # the soft targets are detached
    backward_term(model, "teacher_ce")
    assert grads_of(model.guide.teacher_head) and grads_of(model.guide.fusion)
    assert not grads_of(model.student)  # the teacher reads a detached image embedding


def test_tram_head_gets_no_gradient_into_the_encoder_and_the_encoder_learns_through_the_guided_head():
    model = objective("tram")
    backward_term(model, "student_ce")
    assert grads_of(model.student.head) and not grads_of(model.student.encoder)
    backward_term(model, "teacher_ce")
    assert grads_of(model.student.encoder) and grads_of(model.guide.teacher_head)
    assert not grads_of(model.student.head)  # the deployed head never sees the privileged path


def test_attention_transfer_moves_the_encoder_towards_the_detached_map():
    model = objective("attention_transfer")
    backward_term(model, "attention_mse")
    assert grads_of(model.student.encoder) and not grads_of(model.guide)
    assert not grads_of(model.student.head)
    backward_term(model, "teacher_ce")
    assert grads_of(model.guide.attention) and not grads_of(model.student)


def test_map_distance_is_zero_for_proportional_maps_and_largest_for_disjoint_ones():
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert map_distance(3 * a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert map_distance(a, torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])).item() == pytest.approx(2.0)
    embedding = torch.zeros(1, 4, 2, 2)
    embedding[0, :, 1, 0] = 2.0
    assert feature_map(embedding)[0].flatten().argmax().item() == 2


def test_oracle_attention_targets_are_the_share_of_each_cell_the_true_box_covers():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5],  # the top-left quadrant exactly
                          [0.25, 0.5, 0.75, 1.0],  # straddles the two bottom cells, half of each
                          [0.0, 0.0, 0.0, 1.0]])  # cut away by the crop: zero width
    maps = box_map(boxes, 2, 2)
    torch.testing.assert_close(maps[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(maps[1], torch.tensor([[0.0, 0.0], [0.5, 0.5]]))
    assert maps[2].sum() == 0
    torch.testing.assert_close(box_map(boxes[:1], 4, 4)[0, :2, :2], torch.ones(2, 2))  # any grid


def test_oracle_attention_pulls_the_encoder_towards_the_box_and_skips_a_box_the_crop_cut_away():
    model = objective("oracle_attention")
    backward_term(model, "attention_mse")
    assert grads_of(model.student.encoder) and not grads_of(model.student.head)
    inputs = step_inputs(model)
    inputs["splat_box"] = torch.zeros(4, 4)  # every box cut away: no term, no gradient from it
    model.zero_grad(set_to_none=True)
    term = model(**inputs).terms["attention_mse"]
    assert term.item() == 0.0


def test_oracle_caption_learns_the_label_the_caption_gives_not_the_stored_one():
    model = objective("oracle_caption")
    inputs = step_inputs(model)
    out = model(**inputs)
    expected = model.cross_entropy(out.logits, inputs["caption_label"].long())  # the arms' own CE
    torch.testing.assert_close(out.loss, expected)
    assert not torch.equal(inputs["caption_label"].long(), inputs["label"])  # the stored label plays no part


def test_oracle_teacher_is_labels_and_the_generators_posterior_as_soft_targets():
    model = objective("oracle_teacher", distill_weight=0.25).eval()
    inputs = step_inputs(model)
    out = model(**inputs)
    logits = model.student(inputs["image"])
    p = inputs["posterior"]
    soft = -(torch.stack([1 - p, p], 1) * logits.log_softmax(-1)).sum(1).mean()
    expected = 0.75 * F.cross_entropy(logits, LABELS, label_smoothing=model.smoothing) + 0.25 * soft
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="num_classes must be 2"):
        build_objective(preset_config("tiny", {"objective": {"name": "oracle_teacher"},
                                               "model": {"num_classes": 3}}))


def test_caption_dropout_one_means_the_guided_path_sees_empty_captions_in_training():
    model = objective("guided", caption_dropout=1.0)
    calibrate_batchnorm(model.student, image_size=64)
    inputs = batch()
    model.train()  # the fusion's BatchNorm normalises each call by its own batch: the calls are comparable
    with torch.no_grad():
        embedding = model.student.encoder.eval()(inputs["image"])
        dropped = model.guided(embedding, inputs["input_ids"], inputs["attention_mask"]).logits
        model.caption_dropout = 0.0
        given = model.guided(embedding, inputs["input_ids"], inputs["attention_mask"]).logits
        empty = model.guided(embedding, inputs["input_ids"],
                             torch.zeros_like(inputs["attention_mask"])).logits
    assert not torch.allclose(given, empty, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(dropped, empty)


def _student_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.student.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_one_seed_gives_every_objective_the_same_starting_student():
    """The comparison runner's pairing: same seed -> same image encoder and head, whatever the objective."""
    hashes = {name: _student_hash(objective(name)) for name in OBJECTIVES}
    assert len(set(hashes.values())) == 1, hashes
    torch.manual_seed(1)
    other = build_objective(preset_config("tiny", {"objective": {"name": "baseline"}}))
    assert _student_hash(other) != hashes["baseline"]


def test_every_objective_deploys_the_baselines_exact_architecture_and_flops():
    def flops(module):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(torch.randn(1, 3, 64, 64))
        return counter.get_total_flops()

    reference = fuse_student(objective("baseline").student)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for name in OBJECTIVES:
        fused = fuse_student(objective(name).student)
        assert {k: tuple(v.shape) for k, v in fused.state_dict().items()} == shapes, name
        assert flops(fused) == flops(reference) > 0, name
