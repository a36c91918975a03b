"""OpenVLA-OFT adapter on a tiny random checkpoint: executor vs its own forward, every method, actions."""
import numpy as np
import pytest
import torch

from specprune_ros.adapters import actions as action_ops
from specprune_ros.adapters import load_adapter, load_adapter_policy
from specprune_ros.adapters.tiny import write_tiny_checkpoint
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.token_layout import TokenRole
from specprune_ros.policy.interface import Observation
from specprune_ros.policy.errors import ObservationError
from specprune_ros.pruning import build_method
from specprune_ros.pruning.registry import available_methods

INSTRUCTION = 'pick up the black bowl and place it on the plate'
CAMERAS = ('agentview', 'wrist')


@pytest.fixture(scope='module')
def directory(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('oft'), 'openvla-oft', seed=1)


@pytest.fixture(scope='module')
def adapter(directory):
    return load_adapter(directory, device='cpu', dtype='float32')


def images(step: int = 0, size: int = 128) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for cam in range(2):
        image = rng.integers(40, 200, size=(size, size, 3), dtype=np.uint8)
        image[8 + 5 * step:36 + 5 * step, 16 + 30 * cam:44 + 30 * cam] = (30, 220, 30)
        out.append(image)
    return out


def proprio(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.5, size=8)


def test_sequence_layout_matches_oft(adapter):
    prompt = adapter.encode_prompt(INSTRUCTION)
    embeddings, layout, frames = adapter.sequence(images(), INSTRUCTION, proprio())
    p, k = adapter.patches_per_image, adapter.num_action_tokens
    q, t = 2 * p + 1, len(prompt.ids) - 1                        # OFT's NUM_PATCHES (+ proprio), NUM_PROMPT_TOKENS
    assert k == 56 and layout.num_tokens == 1 + q + t + k + 1 == embeddings.shape[1]
    assert layout.camera_spans == ((1, 1 + p), (1 + p, 1 + 2 * p)) and not layout.causal
    assert layout.proprio_span == (2 * p + 1, 2 * p + 2)
    assert layout.action_span == (q + t, q + t + k)               # the last prompt token + 55 placeholders
    assert layout.text_span == (prompt.instruction[0] + q, prompt.instruction[1] + q)
    roles = layout.roles()
    assert roles[q + t] == TokenRole.ACTION and roles[-1] == TokenRole.OTHER and roles[-2] == TokenRole.OTHER
    text = adapter.embed_ids(prompt.ids)
    assert torch.equal(embeddings[:, q + 1:q + t + 1], text[:, 1:])             # prompt after the proprio token
    assert not embeddings[:, q + t + 1:q + t + 1 + k].any()                     # zeroed action placeholders
    assert torch.equal(embeddings[:, -1], adapter.embed_ids([2])[:, 0])         # '</s>' stop token
    assert [f.shape for f in frames] == [(112, 112, 3)] * 2                      # resized (and centre-cropped)


def test_keep_all_executor_equals_the_adapters_own_forward(adapter):
    expected = adapter.reference_step(images(), INSTRUCTION, proprio())
    out = adapter.step(images(), INSTRUCTION, proprio(), method=build_method('none'))
    assert out.normalized.shape == (8, 7)
    np.testing.assert_allclose(out.normalized, expected, atol=1e-5)
    assert out.result.record.flops == out.result.record.flops_full
    # the action head sees the same hidden rows the transformers path gives
    with torch.no_grad():
        embeddings, layout, _ = adapter.sequence(images(), INSTRUCTION, proprio())
        n = layout.num_tokens
        reference = adapter.model.decoder(inputs_embeds=embeddings,
                                          attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool)).last_hidden_state
        ours = adapter.runner(embeddings, layout).hidden
    assert (ours - reference).abs().max().item() < 1e-5


def test_pruning_changes_the_pass_and_keeps_non_visual_tokens(adapter):
    keep = torch.cat([torch.arange(1, 65, 4), torch.arange(65, 129, 2)])
    out = adapter.step(images(), INSTRUCTION, proprio(), method=FixedKeepSchedule(keep_before=keep))
    record = out.result.record
    assert record.visual_kept_per_layer == [len(keep)] * 4
    assert torch.isin(torch.arange(129, out.layout.num_tokens), out.result.kept).all()
    assert record.flops < 0.7 * record.flops_full
    assert np.abs(out.normalized - adapter.reference_step(images(), INSTRUCTION, proprio())).max() > 1e-4


@pytest.mark.parametrize('name', available_methods())
def test_every_pruning_method_runs(directory, name):
    policy = load_adapter_policy(directory, method=name, device='cpu', dtype='float32')
    assert policy.camera_names == CAMERAS and policy.proprio_dim == 8 and policy.image_size == (112, 112)
    rng = np.random.default_rng(2)
    for step in range(4):
        obs = Observation(images=dict(zip(CAMERAS, images(step))), instruction=INSTRUCTION, proprio=proprio(step),
                          executed_actions=rng.normal(scale=0.05, size=(2, 7)))
        out = policy.predict(obs)
        assert out.actions.shape == (8, 7) and np.isfinite(out.actions).all()
    record = out.record
    assert record.info['method'] == name
    if name in ('random', 'divprune', 'fastv', 'vla_pruner', 'specprune'):
        assert record.flops < record.flops_full
    if name == 'vla_cache':
        assert record.reused is not None


def test_unnormalisation_proprio_and_gripper_on_known_values():
    stats = {'q01': [-2.0, 0.0], 'q99': [2.0, 1.0], 'mask': [True, False]}
    np.testing.assert_allclose(action_ops.unnormalize(np.array([0.5, 0.7]), stats, eps=1e-8), [1.0 + 2e-8 * 0.75, 0.7])
    proprio_stats = {'q01': [0.0, -1.0, 5.0], 'q99': [2.0, 1.0, 5.0]}
    np.testing.assert_allclose(action_ops.normalize_proprio(np.array([1.0, 3.0, 5.0]), proprio_stats),
                               [0.0, 1.0, -1.0], atol=1e-7)                 # clipped; a zero range maps to -1
    chunk = np.array([[0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.9], [0.0] * 6 + [0.2]])
    assert action_ops.libero_gripper(chunk)[:, -1].tolist() == [-1.0, 1.0]    # 1 = open -> -1 (LIBERO open)


def test_policy_actions_are_unnormalised_with_the_oft_epsilon(directory):
    policy = load_adapter_policy(directory, method='none', device='cpu', dtype='float32')
    out = policy.predict(Observation(images=dict(zip(CAMERAS, images())), instruction=INSTRUCTION, proprio=proprio()))
    stats = policy.backend.action_stats
    expected = action_ops.unnormalize(out.info['normalized_actions'], stats, eps=1e-8)
    np.testing.assert_allclose(out.actions, expected, rtol=1e-6)
    assert policy.action_spec.chunk_size == 8 and policy.action_spec.action_dim == 7


def test_bad_observations_are_refused(directory):
    policy = load_adapter_policy(directory, method='none', device='cpu', dtype='float32')
    good = dict(zip(CAMERAS, images()))
    with pytest.raises(ObservationError, match='wrist'):
        policy.predict(Observation(images={'agentview': good['agentview']}, instruction='x', proprio=proprio()))
    with pytest.raises(ObservationError, match='proprio'):
        policy.predict(Observation(images=good, instruction='x', proprio=None))
    with pytest.raises(ObservationError, match='8 finite values'):
        policy.predict(Observation(images=good, instruction='x', proprio=np.array([1.0, np.nan] * 4)))


def test_bfloat16_path_runs_and_stays_close(directory, adapter):
    bf16 = load_adapter(directory, device='cpu', dtype='bfloat16')
    assert bf16.model.projector.fc1.weight.dtype == torch.bfloat16
    fp32 = adapter.step(images(), INSTRUCTION, proprio()).normalized
    half = bf16.step(images(), INSTRUCTION, proprio(), method=build_method('fastv')).normalized
    assert half.shape == (8, 7) and np.isfinite(half).all()
    keep_all = bf16.step(images(), INSTRUCTION, proprio()).normalized
    assert np.abs(keep_all - fp32).max() < 0.25 * max(1.0, np.abs(fp32).max())
