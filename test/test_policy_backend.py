"""The model-backend contract.

A new VLA plugs in by writing a backend (encode + head), and ``PrunablePolicy`` gives it the step context, step counter,
timing, info, resets and pruning.
"""
import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from specprune_ros.core.executor import PrunableDecoderRunner, RunResult
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.policy.backend import EncodedStep, ModelBackend, camera_frames
from specprune_ros.policy.errors import ObservationError
from specprune_ros.policy.interface import ActionSpec, Observation
from specprune_ros.policy.prunable_policy import PrunablePolicy
from specprune_ros.pruning import build_method

SIZE, PATCH, WIDTH = 16, 4, 32
GRID = SIZE // PATCH


class ToyBackend(ModelBackend):
    """A minimal VLA: one camera's 4 x 4 pixel patches, two instruction tokens and one action query, bidirectional."""

    name = 'toy'

    def __init__(self) -> None:
        torch.manual_seed(0)
        llama = LlamaConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1, max_position_embeddings=64)
        decoder = LlamaModel(llama)
        decoder.embed_tokens = None
        self.runner = PrunableDecoderRunner(decoder.eval())
        self.patches = torch.nn.Linear(3 * PATCH * PATCH, WIDTH)
        self.words = torch.nn.Embedding(8, WIDTH)
        self.query = torch.nn.Parameter(torch.randn(1, WIDTH))
        self.readout = torch.nn.Linear(WIDTH, 7)
        self.camera_names = ('front',)
        self.image_size = (SIZE, SIZE)
        self.proprio_dim = 0
        self.patch_size = PATCH
        self.action_spec = ActionSpec(chunk_size=1)
        self.resets = 0

    def encode(self, observation: Observation) -> EncodedStep:
        frames = camera_frames(observation, self.camera_names, self.image_size)
        pixels = torch.from_numpy(frames[0]).float().view(GRID, PATCH, GRID, PATCH, 3).permute(0, 2, 1, 3, 4)
        visual = self.patches(pixels.reshape(GRID * GRID, -1) / 255.0)
        words = self.words(torch.tensor([len(observation.instruction) % 8, 1]))
        embeddings = torch.cat([visual, words, self.query]).unsqueeze(0)
        layout = TokenLayout(num_tokens=GRID * GRID + 3, camera_spans=((0, GRID * GRID),), grid_shape=(GRID, GRID),
                             text_span=(16, 18), action_span=(18, 19))
        return EncodedStep(embeddings=embeddings, layout=layout, frames=frames, info={'words': 2})

    def head(self, step: EncodedStep, result: RunResult) -> np.ndarray:
        state = result.select(torch.arange(*step.layout.action_span))
        return torch.tanh(self.readout(state[0])).numpy()

    def reset(self) -> None:
        self.resets += 1


class Recording:
    """A real pruning method that also keeps every step context it was given."""

    def __init__(self, method) -> None:
        self.method = method
        self.name = method.name
        self.contexts = []

    def reset(self) -> None:
        self.method.reset()

    def begin_step(self, context):
        self.contexts.append(dataclasses.replace(context))
        return self.method.begin_step(context)

    def after_layer(self, view):
        return self.method.after_layer(view)

    def end_step(self, record) -> None:
        self.method.end_step(record)


def observation(step: int) -> Observation:
    image = np.random.default_rng(step).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    return Observation(images={'front': image}, instruction='push the cube', executed_actions=np.full((1, 7), step))


def test_a_backend_gets_the_step_context_counter_info_and_resets_from_the_policy():
    backend = ToyBackend()
    method = Recording(build_method('fastv', {'keep_ratio': 0.25, 'prune_layer': 2}))
    policy = PrunablePolicy(backend, method)
    assert (policy.camera_names, policy.image_size, policy.action_spec.chunk_size) == (('front',), (16, 16), 1)
    outputs = [policy.predict(observation(step)) for step in range(2)]
    policy.reset()
    outputs.append(policy.predict(observation(2)))
    assert [c.step_index for c in method.contexts] == [0, 1, 0] and backend.resets == 1
    first = method.contexts[0]
    assert first.num_layers == 3 and first.patch_size == PATCH and first.instruction == 'push the cube'
    assert np.array_equal(first.images[0], observation(0).images['front'])
    assert first.visual_embeddings.shape == (16, WIDTH) and first.executed_actions[0, 0] == 0
    for step, out in zip((0, 1, 0), outputs):
        assert out.actions.shape == (1, 7) and out.actions.dtype == np.float32 and out.latency_s > 0
        assert out.info['step_index'] == step and out.info['method'] == 'fastv' and out.info['model'] == 'toy'
        assert out.info['words'] == 2 and np.array_equal(out.info['normalized_actions'], out.actions)
        assert out.record.visual_kept_per_layer == [16, 16, 4]            # FastV keeps 25% from layer 2 on
        assert out.record.info['method'] == 'fastv'


def test_the_policy_prunes_what_the_method_plans_and_refuses_bad_observations():
    backend = ToyBackend()
    keep = torch.tensor([0, 5, 10, 15])
    pruned = PrunablePolicy(backend, FixedKeepSchedule(keep_before=keep)).predict(observation(0))
    full = PrunablePolicy(backend).predict(observation(0))
    assert pruned.record.kept_per_layer[0][:4].tolist() == keep.tolist()
    assert full.record.visual_kept_per_layer == [16, 16, 16] and full.info['method'] == 'none'
    assert not np.array_equal(pruned.actions, full.actions)
    with pytest.raises(ObservationError, match="camera 'front' missing"):
        PrunablePolicy(backend).predict(Observation(images={}, instruction='push the cube'))
    with pytest.raises(ObservationError, match='expected'):
        PrunablePolicy(backend).predict(Observation(images={'front': np.zeros((8, 8, 3), np.uint8)}, instruction=''))
