"""Lesson 06/07 checkers accept correct answers and name each known mistake."""

import math

import pytest
import torch

from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson06, lesson07

# Correct solutions written independently of the references (what a learner would write).


def learner_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


def learner_split_heads(x, heads):
    B, L, C = x.shape
    return x.reshape(B, L, heads, C // heads).permute(0, 2, 1, 3)


def learner_timestep_embedding(t, dim):
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def learner_level_shapes(block_out_channels, height, width):
    shapes = []
    for channels in block_out_channels:
        shapes.append((channels, height, width))
        height, width = height // 2, width // 2
    return shapes


def learner_skip_count(levels, layers_per_block):
    count = 1  # conv_in
    for level in range(levels):
        count += layers_per_block
        if level < levels - 1:
            count += 1  # downsampler
    return count


@pytest.mark.parametrize(
    "check, solution",
    [
        (lesson06.check_attention, learner_attention),
        (lesson06.check_attention, lesson06.reference_attention),
        (lesson06.check_split_heads, learner_split_heads),
        (lesson07.check_timestep_embedding, learner_timestep_embedding),
        (lesson07.check_level_shapes, learner_level_shapes),
        (lesson07.check_skip_count, learner_skip_count),
    ],
)
def test_correct_solutions_pass(check, solution, capsys):
    assert check(solution) is True
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "check, mistakes",
    [
        (lesson06.check_attention, lesson06.ATTENTION_MISTAKES),
        (lesson06.check_split_heads, lesson06.SPLIT_MISTAKES),
        (lesson07.check_timestep_embedding, lesson07.EMBEDDING_MISTAKES),
        (lesson07.check_level_shapes, lesson07.LEVEL_MISTAKES),
        (lesson07.check_skip_count, lesson07.SKIP_MISTAKES),
    ],
)
def test_each_known_mistake_is_named(check, mistakes):
    for mistake in mistakes:
        with pytest.raises(ExerciseError) as info:
            check(mistake.fn)
        assert str(info.value).endswith(mistake.message), f"{mistake.fn.__name__} gave: {info.value}"


def test_known_mistakes_really_differ_from_the_references():
    """Each wrong variant gives different numbers on the first case, so no mistake hides behind another."""
    for cases, reference, mistakes in [
        (lesson06.ATTENTION_CASES, lesson06.reference_attention, lesson06.ATTENTION_MISTAKES),
        (lesson07.EMBEDDING_CASES, lesson07.reference_timestep_embedding, lesson07.EMBEDDING_MISTAKES),
    ]:
        outputs = [reference(*cases[0].args)] + [m.fn(*cases[0].args) for m in mistakes]
        for i in range(len(outputs)):
            for j in range(i + 1, len(outputs)):
                assert outputs[i].shape != outputs[j].shape or not torch.allclose(outputs[i], outputs[j], atol=1e-4)


def test_unknown_wrong_answers_get_a_generic_message():
    with pytest.raises(ExerciseError, match="wrong values"):
        lesson06.check_attention(lambda q, k, v: learner_attention(q, k, v) + 0.1)
    with pytest.raises(ExerciseError, match="returned None"):
        lesson07.check_timestep_embedding(lambda t, dim: None)
    with pytest.raises(ExerciseError, match="shape"):
        lesson06.check_split_heads(lambda x, heads: x)
    with pytest.raises(ExerciseError, match="returned 7"):
        lesson07.check_skip_count(lambda levels, layers: 7)


def test_learner_sdpa_passes_and_not_implemented_is_reported():
    assert lesson06.check_attention(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)) is True

    def unfinished(q, k, v):
        raise NotImplementedError

    assert lesson06.check_attention(unfinished) is False  # a blank is reported, not raised
