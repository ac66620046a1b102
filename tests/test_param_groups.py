"""Each parameter gets the learning rate of the part it belongs to."""
import pytest

from mgn.config import preset_config
from mgn.model.objectives import build_objective
from mgn.train.engine import param_groups


@pytest.mark.parametrize("freeze_text", [False, True])
def test_text_image_and_head_parameters_land_in_their_own_groups(bert32, freeze_text):
    cfg = preset_config("tiny", {"model": {"text_model": bert32, "freeze_text": freeze_text},
                                 "train": {"lr_image": 1e-3, "lr_text": 1e-5, "lr_head": 2e-3}})
    model = build_objective(cfg)
    ids = {id(p): name for name, p in model.named_parameters()}
    part_of = {ids[id(p)]: group["name"].removesuffix("_no_decay") for group in param_groups(model, cfg)
               for p in group["params"]}
    lr_of = {group["name"]: group["lr"] for group in param_groups(model, cfg)}

    text = [n for n, p in model.named_parameters() if n.startswith("guide.text.")]
    assert any(".encoder." in n for n in text)  # a BERT's layers are named like the image encoder's
    if freeze_text:
        assert not set(text) & set(part_of)  # frozen: not handed to the optimizer at all
    else:
        assert {part_of[n] for n in text} == {"text"}
    assert {part_of[n] for n in part_of if n.startswith("student.encoder.")} == {"image"}
    heads = ("student.head.", "guide.fusion.", "guide.attention.")
    assert {part_of[n] for n in part_of if n.startswith(heads)} == {"head"}
    assert lr_of["text" if not freeze_text else "image"] == (1e-5 if not freeze_text else 1e-3)
    assert lr_of["head"] == 2e-3 and all(not g.endswith("_no_decay") or lr_of[g] == lr_of[g[:-9]]
                                         for g in lr_of)

    baseline = build_objective(preset_config("tiny", {"objective": {"name": "baseline"}}))
    assert {g["name"] for g in param_groups(baseline, cfg)} == {"image", "image_no_decay", "head",
                                                                "head_no_decay"}
