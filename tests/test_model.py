"""The guidance network follows paper section II; the student is the baseline architecture."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mgn.config import PACKAGED_MINILM, Config, ModelConfig, ObjectiveConfig, validate
from mgn.model.networks import ImageClassifier, PoolAttention, TokenAttention
from mgn.model.objectives import Guided, build_objective


def tiny(text_model: str, **overrides) -> ModelConfig:
    base = dict(image_model="mobileone_s0", image_size=64, text_model=text_model, seq_len=16, fusion_dim=64,
                attention_heads=4)
    base.update(overrides)
    return ModelConfig(**base)


def guided(model: ModelConfig, name: str = "guided", **objective) -> Guided:
    """The paper's objective (or another guided one) around a model config."""
    return build_objective(Config(model=model, objective=ObjectiveConfig(name=name, **objective)))


def captions(batch: int, seq_len: int, vocab: int = 50):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[:, seq_len // 2:] = 0  # half of each caption is padding
    return ids, mask


@pytest.mark.parametrize("seq_len,hidden_fixture", [(121, "bert768"), (64, "minilm")])
def test_shapes_paper_and_minilm(request, seq_len, hidden_fixture):
    text_model = request.getfixturevalue("bert768") if hidden_fixture == "bert768" else PACKAGED_MINILM
    cfg = tiny(text_model, seq_len=seq_len, image_size=224, fusion_dim=1024, attention_heads=8)
    model = guided(cfg)
    side = int(seq_len ** 0.5)
    expected_hidden = 768 if hidden_fixture == "bert768" else 384
    ids, mask = captions(2, seq_len)
    block = model.guide.text(ids, mask)
    assert block.shape == (2, expected_hidden, side, side)
    out = model.predict(torch.randn(2, 3, 224, 224), input_ids=ids, attention_mask=mask)
    assert out.teacher.shape == out.student.shape == (2, 2)
    assert out.attention.shape == (2, 7, 7)  # MobileOne at 224 px: a 7x7 grid
    assert model.guide.fusion.layers[-1].num_features == 1024


def test_text_block_is_the_token_sequence_reshaped(bert768):
    text = guided(tiny(bert768, seq_len=121)).eval().guide.text
    ids, mask = captions(1, 121)
    tokens = text.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]  # [L, H]
    block = text(ids, mask)[0]  # [H, 11, 11]
    # token t sits at row t // 11, column t % 11; padding tokens are zeroed
    assert torch.allclose(block[:, 0, 0], tokens[0])
    assert torch.allclose(block[:, 5, 3], tokens[5 * 11 + 3] * mask[0, 58])
    assert torch.count_nonzero(block[:, 10, 10]) == 0  # the last token is padding here


def test_non_square_seq_len_is_rejected():
    cfg = Config()
    cfg.model.seq_len = 120
    with pytest.raises(ValueError, match=r"model.seq_len=120 is not a perfect square"):
        validate(cfg)


def _one_hot_fusion(position: int, dim: int = 8, side: int = 3) -> torch.Tensor:
    fusion = torch.zeros(1, dim, side, side)
    fusion.view(1, dim, -1)[0, :, position] = 5.0
    return fusion


@pytest.mark.parametrize("position", [0, 4, 8])  # 8: the last cell, the one the authors' code dropped
def test_pool_attention_map_sums_to_one_and_points_at_the_salient_cell(position):
    attention = PoolAttention(dim=8, heads=2, grid=9)
    with torch.no_grad():
        attention.position.zero_()
        for layer in (attention.query, attention.key):
            layer.weight.copy_(torch.eye(8))
            layer.bias.zero_()
    values = torch.randn(1, 4, 3, 3)
    attended, spatial = attention(_one_hot_fusion(position), values)
    assert torch.allclose(spatial.sum(dim=(1, 2)), torch.ones(1))
    assert spatial.flatten().argmax().item() == position
    # pooling the re-weighted embedding is the map-weighted sum of the original embedding
    expected = (values * spatial.unsqueeze(1)).sum(dim=(2, 3))
    assert torch.allclose(attended.mean(dim=(2, 3)), expected, atol=1e-6)


@pytest.mark.parametrize("position", [0, 8])
def test_token_attention_rows_sum_to_one_and_mix_image_values(position):
    attention = TokenAttention(dim=8, heads=2)
    with torch.no_grad():
        attention.attn.in_proj_weight.copy_(torch.cat([torch.eye(8)] * 3))
        attention.attn.in_proj_bias.zero_()
    values = torch.randn(1, 4, 3, 3)
    attended, spatial = attention(_one_hot_fusion(position), values)
    assert torch.allclose(spatial.sum(), torch.tensor(1.0))
    assert spatial.flatten().argmax().item() == position
    assert attended.shape == values.shape
    assert torch.allclose(attended.mean(dim=(2, 3)), (values * spatial.unsqueeze(1)).sum(dim=(2, 3)),
                          atol=1e-6)


def test_uniform_attention_reduces_to_the_student():
    """With no text signal (uniform map) the guided logits equal the student's: one head serves both."""
    values = torch.randn(2, 4, 3, 3)
    uniform = torch.full((2, 3, 3), 1 / 9)
    reweighted = values * uniform.unsqueeze(1) * 9
    assert torch.allclose(reweighted.mean(dim=(2, 3)), values.mean(dim=(2, 3)), atol=1e-6)


@pytest.mark.parametrize("attention", ["token", "pool"])
def test_gradients_reach_the_image_encoder_through_the_guided_path(attention):
    model = guided(tiny(PACKAGED_MINILM, attention=attention), student_weight=0.0).train()
    ids, mask = captions(4, 16)
    out = model(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1]), input_ids=ids, attention_mask=mask)
    assert set(out.terms) == {"guided_ce"}  # guided logits only: no student loss term
    out.loss.backward()
    encoder_grads = [p.grad for p in model.student.encoder.parameters() if p.grad is not None]
    assert encoder_grads and any(g.abs().sum() > 0 for g in encoder_grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.guide.fusion.parameters())


def test_frozen_text_encoder_gets_no_gradients_and_stays_in_eval():
    model = guided(tiny(PACKAGED_MINILM, freeze_text=True)).train()
    assert not model.guide.text.model.training
    ids, mask = captions(4, 16)
    model(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1]), input_ids=ids,
          attention_mask=mask).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.guide.text.parameters())


def test_unfrozen_text_encoder_is_trained():
    model = guided(tiny(PACKAGED_MINILM, freeze_text=False)).train()
    assert model.guide.text.model.training
    ids, mask = captions(4, 16)
    model(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1]), input_ids=ids,
          attention_mask=mask).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.guide.text.parameters())


def test_attend_to_fusion_ablation_uses_its_own_head():
    model = guided(tiny(PACKAGED_MINILM, attend_to="fusion")).train()
    ids, mask = captions(4, 16)
    model.guided(model.student.encoder(torch.randn(4, 3, 64, 64)), ids, mask).logits.sum().backward()
    assert model.guide.teacher_head is not None
    assert all(p.grad is None for p in model.student.head.parameters())  # student head: student loss only
    assert any(p.grad is not None for p in model.guide.teacher_head.parameters())


def test_attend_to_fusion_without_student_loss_is_rejected():
    cfg = Config()
    cfg.model.attend_to, cfg.objective.student_weight = "fusion", 0.0
    with pytest.raises(ValueError, match="student_weight"):
        validate(cfg)


def test_baseline_and_student_have_identical_parameters_and_flops():
    model = guided(tiny(PACKAGED_MINILM, num_classes=3))
    baseline = build_objective(Config(model=tiny(PACKAGED_MINILM, num_classes=3),
                                      objective=ObjectiveConfig(name="baseline"))).student
    assert isinstance(baseline, ImageClassifier) and isinstance(model.student, ImageClassifier)
    student = model.student

    def count(model):
        return sum(p.numel() for p in model.parameters())

    def flops(model):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(torch.randn(1, 3, 64, 64))
        return counter.get_total_flops()

    assert count(student) == count(baseline) > 0
    assert flops(student) == flops(baseline) > 0
    assert count(model) > count(student)  # the guidance parts exist only at training time


def test_frozen_text_cache_returns_the_same_blocks_without_re_encoding():
    cached = guided(tiny(PACKAGED_MINILM, text_cache=3)).guide.text
    calls = []
    cached.model.register_forward_hook(lambda module, args, output: calls.append(len(args) or 1))
    ids, mask = captions(2, 16)
    first = cached(ids, mask)
    second = cached(ids, mask)
    assert len(calls) == 1  # the second batch came from the cache
    assert torch.equal(first, second) and torch.allclose(first, cached.encode(ids, mask), atol=1e-6)
    more_ids, more_mask = captions(4, 16, vocab=80)
    cached(more_ids, more_mask)
    assert len(cached.cache) == 3  # bounded: least recently used captions evicted


def test_unfrozen_text_is_never_cached():
    text = guided(tiny(PACKAGED_MINILM, freeze_text=False, text_cache=100)).guide.text
    text(*captions(2, 16))
    assert text.cache_size == 0 and len(text.cache) == 0


def test_the_text_encoders_prepared_mask_changes_nothing_but_the_wait():
    # transformers reads a 2-D mask's values on the host (a GPU sync every step); the prepared 4-D mask gives
    # the same encodings, and an empty caption (caption dropout) stays finite and zero.
    from mgn.config import preset_config
    from mgn.model.networks import TextBlockEncoder

    encoder = TextBlockEncoder(preset_config("tiny").model).eval()
    ids = torch.randint(1000, 2000, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 10:] = 0
    mask[2] = 0
    with torch.no_grad():
        plain = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        prepared = encoder.model(input_ids=ids, attention_mask=encoder.prepared_mask(mask)).last_hidden_state
        blocks = encoder.encode(ids, mask)
    assert torch.equal(plain[:2], prepared[:2])
    assert torch.isfinite(blocks).all() and not blocks[2].any()
