"""OpenVLA adapter on a tiny random checkpoint: executor vs its own forward, every method, action decoding."""
import numpy as np
import pytest
import torch

from specprune_ros.adapters import actions as action_ops
from specprune_ros.adapters import load_adapter, load_adapter_policy
from specprune_ros.adapters.tiny import write_tiny_checkpoint
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.token_layout import TokenRole
from specprune_ros.policy.interface import Observation
from specprune_ros.pruning import build_method
from specprune_ros.pruning.registry import available_methods

INSTRUCTION = 'Put the cream cheese in the bowl'


@pytest.fixture(scope='module')
def directory(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('openvla'), 'openvla', seed=5)


@pytest.fixture(scope='module')
def adapter(directory):
    return load_adapter(directory, device='cpu', dtype='float32')


def openvla_action_tokens(actions: np.ndarray, vocab_size: int, n_bins: int) -> np.ndarray:
    """The action tokenizer of OpenVLA (normalised actions -> token ids), the inverse the detokeniser must match."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    return vocab_size - np.digitize(np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0), edges)


def frames(step: int = 0, size: int = 112) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, size=(size, size, 3), dtype=np.uint8)
    image[10 + 4 * step:40 + 4 * step, 20:50] = (250, 30, 30)          # a block that moves down each step
    return [image]


def test_prompt_layout(adapter):
    prompt = adapter.encode_prompt(INSTRUCTION)
    tokens = adapter.tokenizer.convert_ids_to_tokens(prompt.ids)
    assert prompt.ids[0] == adapter.bos_id and prompt.ids[-1] == adapter.empty_id and tokens[-1] == '\u2581'
    words = adapter.tokenizer.decode(prompt.ids[slice(*prompt.instruction)]).strip()
    assert words == INSTRUCTION.lower()                                # the instruction, lower-cased, exactly
    embeddings, layout, _ = adapter.sequence(frames(), INSTRUCTION)
    p = adapter.patches_per_image
    assert layout.num_tokens == len(prompt.ids) + p == embeddings.shape[1]
    assert layout.camera_spans == ((1, 1 + p),) and layout.grid_shape == (8, 8) and layout.causal
    assert layout.text_span == (prompt.instruction[0] + p, prompt.instruction[1] + p)
    assert layout.action_span == (layout.num_tokens - 1, layout.num_tokens)
    roles = layout.roles()
    assert roles[0] == TokenRole.OTHER and roles[-1] == TokenRole.ACTION
    # BOS embedding, then patches, then the prompt after BOS
    text = adapter.embed_ids(prompt.ids)
    assert torch.equal(embeddings[:, 0], text[:, 0]) and torch.equal(embeddings[:, 1 + p:], text[:, 1:])


def test_keep_all_executor_equals_the_adapters_own_forward(adapter):
    expected, tokens, logits = adapter.reference_step(frames(), INSTRUCTION)
    out = adapter.step(frames(), INSTRUCTION, method=build_method('none'))
    assert out.info['action_token_ids'] == tokens
    np.testing.assert_array_equal(out.normalized, expected)
    # the logits of every generated token agree with transformers' KV-cached generation
    lm_head = adapter.model.language_model.lm_head
    with torch.no_grad():
        embeddings, layout, _ = adapter.sequence(frames(), INSTRUCTION)
        result = adapter.runner(embeddings, layout, return_cache=True)
        ours = [lm_head(result.hidden[0, -1])]
        for i, token in enumerate(tokens[:-1]):
            step = adapter.runner.decode(adapter.embed_ids([token]), [layout.num_tokens + i], result.cache)
            ours.append(lm_head(step.hidden[0, -1]))
    assert max((a - b).abs().max().item() for a, b in zip(ours, logits)) < 1e-4
    record = out.result.record
    assert record.flops == pytest.approx(record.flops_full)
    assert record.info['decode_flops'] > 0


def test_pruned_prefill_then_decode_matches_one_pass_over_the_generated_sequence(adapter):
    """KV cache after a pruned prefill.

    Decoding token by token == re-running the whole sequence with the generated tokens appended and the same visual
    tokens dropped.
    """
    keep = torch.arange(1, 65, 3)
    out = adapter.step(frames(), INSTRUCTION, method=FixedKeepSchedule(keep_before=keep))
    tokens = out.info['action_token_ids']
    lm_head = adapter.model.language_model.lm_head
    with torch.no_grad():
        embeddings, layout, _ = adapter.sequence(frames(), INSTRUCTION)
        prefill = adapter.runner(embeddings, layout, FixedKeepSchedule(keep_before=keep), return_cache=True)
        decoded = [lm_head(prefill.hidden[0, -1])]
        for i, token in enumerate(tokens[:-1]):
            step = adapter.runner.decode(adapter.embed_ids([token]), [layout.num_tokens + i], prefill.cache)
            decoded.append(lm_head(step.hidden[0, -1]))
        longer = torch.cat([embeddings, adapter.embed_ids(tokens[:-1])], dim=1)
        n = longer.shape[1]
        extended = type(layout)(num_tokens=n, camera_spans=layout.camera_spans, grid_shape=layout.grid_shape,
                                text_span=layout.text_span, action_span=(layout.num_tokens - 1, n), causal=True)
        full = adapter.runner(longer, extended, FixedKeepSchedule(keep_before=keep))
        logits = lm_head(full.hidden[0, -len(tokens):])
    assert torch.allclose(torch.stack(decoded), logits, atol=1e-4)
    assert logits.argmax(-1).tolist() == tokens
    assert out.result.record.visual_kept_per_layer == [len(keep)] * 4
    assert out.result.record.flops < out.result.record.flops_full
    # pruning really changes the computation
    assert not torch.allclose(torch.stack(decoded), torch.stack(adapter.reference_step(frames(), INSTRUCTION)[2]))


@pytest.mark.parametrize('name', available_methods())
def test_every_pruning_method_runs(directory, name):
    policy = load_adapter_policy(directory, method=name, device='cpu', dtype='float32')
    assert policy.camera_names == ('agentview',) and policy.proprio_dim == 0
    rng = np.random.default_rng(1)
    for step in range(4):                     # VLA-Pruner warms up for 3 steps, VLA-Cache needs a previous frame
        obs = Observation(images={'agentview': frames(step)[0]}, instruction=INSTRUCTION,
                          executed_actions=rng.normal(scale=0.05, size=(2, 7)))
        out = policy.predict(obs)
        assert out.actions.shape == (1, 7) and np.isfinite(out.actions).all()
        tokens = out.info['action_token_ids']
        assert len(tokens) == 7 and all(0 <= t < 448 for t in tokens)
    record = out.record
    assert record.info['method'] == name and record.flops <= record.flops_full * (1 + 1e-9)
    if name in ('random', 'divprune', 'fastv', 'vla_pruner', 'specprune'):
        assert min(record.visual_kept_per_layer) < 64
    if name == 'vla_pruner':
        assert record.info['action_rows'] == 'last prompt token + 6 generated action tokens'
        keys, weights = next(iter(v for layer in record.attention.values() for k, v in layer.items()
                                  if k == 'vlap_action'))
        # mean attention of the 7 action queries over the prefill's keys (the rest went to generated tokens)
        assert 0.5 < weights.sum().item() <= 1.0 + 1e-5 and len(keys) == len(weights)


def test_detokenisation_and_unnormalisation_on_known_values():
    vocab, bins = 32000, 256
    centers = action_ops.bin_centers(bins)
    assert len(centers) == 255
    assert centers[0] == pytest.approx(-1 + 1 / 255) and centers[-1] == pytest.approx(1 - 1 / 255)
    tokens = np.array([31999, 31744, 31745, 31872, 100, 32010])
    np.testing.assert_allclose(action_ops.tokens_to_normalized(tokens, vocab, bins),
                               [centers[0], centers[254], centers[254], centers[127], centers[254], centers[0]])
    # the action tokenizer round trip lands in the right bin
    values = np.array([-0.999, -0.5, 0.0, 0.3, 0.999])
    decoded = action_ops.tokens_to_normalized(openvla_action_tokens(values, vocab, bins), vocab, bins)
    assert np.all(np.abs(decoded - values) <= 1 / 255 + 1e-12)
    stats = {'q01': [-1.0, 0.0, 2.0], 'q99': [1.0, 4.0, 4.0], 'mask': [True, True, False]}
    np.testing.assert_allclose(action_ops.unnormalize(np.array([[0.5, -1.0, 0.25]]), stats),
                               [[0.5, 0.0, 0.25]])
    np.testing.assert_allclose(action_ops.unnormalize(np.array([1.0, 1.0, 1.0]), stats), [1.0, 4.0, 1.0])
    bounds = {'min': [0.0], 'max': [10.0]}
    assert action_ops.unnormalize(np.array([0.0]), bounds, 'bounds')[0] == pytest.approx(5.0)


def test_policy_output_is_unnormalised_with_the_checkpoint_statistics(directory):
    policy = load_adapter_policy(directory, method='none', device='cpu', dtype='float32', gripper='libero')
    out = policy.predict(Observation(images={'agentview': frames()[0]}, instruction=INSTRUCTION))
    stats = policy.backend.action_stats
    normalized = out.info['normalized_actions']
    expected = action_ops.unnormalize(normalized, stats)
    np.testing.assert_allclose(out.actions[0, :6], expected[0, :6], rtol=1e-6)
    assert out.actions[0, 6] == -np.sign(2 * normalized[0, 6] - 1)        # LIBERO gripper convention
    assert out.info['unnorm_key'] == 'tiny_libero_spatial_no_noops'
    assert policy.action_spec.chunk_size == 1 and policy.action_spec.action_dim == 7
