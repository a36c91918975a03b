r"""OpenVLA (``openvla/openvla-7b`` and its fine-tunes) on the prunable executor.

Sequence of one step (one camera, causal attention)::

    position 0          BOS
    1 .. P              the camera's P = 256 fused DINOv2 + SigLIP patch tokens      (camera span, prunable)
    P + 1 .. N - 1      "In: What action should the robot take to {instruction}?\nOut:" + '▁'
                        (the instruction's tokens are the layout's text span)

The last prompt token (``'▁'``) emits the first action token, so it is the layout's action span (the query row of
FastV's 'last' and of VLA-Pruner's action score). Then ``D`` (7) action tokens are generated greedily, each a
single-token decoder step against the K/V cache of the **pruned** prefill (positions continue at N, N + 1, ...;
visual tokens pruned before layer l stay absent from layer l's cache). The generated tokens' attention at the
layers a method asked 'action' rows for is averaged with the prefill's last row before the method's ``end_step``
(VLA-Pruner scores OpenVLA's visual tokens by the generated action tokens' attention).

De-tokenisation: ``bin = V - token - 1`` clipped to the ``n_bins - 1`` bin centres of [-1, 1], then un-normalised
with the dataset's q01/q99 (``mask`` False dimensions stay as they are).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from specprune_ros.adapters import actions as action_ops
from specprune_ros.adapters.base import DeferredEndStep, PrismaticAdapter, resolve_device, resolve_dtype
from specprune_ros.core.executor import DecoderCache
from specprune_ros.core.flops import layer_flops
from specprune_ros.core.step_types import PruningMethod, StepContext, StepRecord
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.policy.backend import EncodedStep, ModelOutput, camera_frames
from specprune_ros.policy.interface import Observation


class OpenVLAAdapter(PrismaticAdapter):
    kind = 'openvla'

    @classmethod
    def load(cls, directory: str | Path, device: str = 'auto', dtype: str | torch.dtype = 'auto',
             unnorm_key: Optional[str] = None, attn_implementation: str = 'sdpa',
             center_crop: Optional[bool] = None, **kwargs) -> 'OpenVLAAdapter':
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        checkpoint, model, tokenizer = cls.load_parts(directory, 'openvla', dev, dt, attn_implementation, center_crop)
        return cls(checkpoint, model, tokenizer, dev, dt, unnorm_key=unnorm_key, num_images=1, **kwargs)

    # -- sequence ----------------------------------------------------------------------------------------------

    def layout(self, num_ids: int, instruction: tuple[int, int]) -> TokenLayout:
        p = self.patches_per_image
        n = num_ids + p
        text = (instruction[0] + p, instruction[1] + p) if instruction[1] > instruction[0] else (0, 0)
        return TokenLayout(num_tokens=n, camera_spans=((1, 1 + p),), grid_shape=(self.grid, self.grid),
                           text_span=text, action_span=(n - 1, n), causal=True)

    def sequence(self, images: Sequence[np.ndarray], instruction: str
                 ) -> tuple[torch.Tensor, TokenLayout, list[np.ndarray]]:
        frames = self.prepare_frames(images)
        prompt = self.encode_prompt(instruction)
        text = self.embed_ids(prompt.ids)
        embeddings = torch.cat([text[:, :1], self.visual_tokens(frames), text[:, 1:]], dim=1)
        return embeddings, self.layout(len(prompt.ids), prompt.instruction), frames

    def detokenize(self, token_ids: Sequence[int]) -> np.ndarray:
        """Generated action token ids -> normalised actions (1, D)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        return action_ops.tokens_to_normalized(ids, self.checkpoint.action_vocab_size,
                                               self.checkpoint.n_action_bins)[None]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.lm_head(hidden)

    def _embed_device_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (1, t) already on the device -> embeddings (1, t, d)."""
        return self.model.embed_tokens(ids)

    # -- the pruned path ---------------------------------------------------------------------------------------

    def encode(self, observation: Observation) -> EncodedStep:
        frames = camera_frames(observation, self.camera_names)       # any size: the transform resizes
        return self.encoded(*self.sequence(frames, observation.instruction))

    def run(self, step: EncodedStep, method: Optional[PruningMethod], context: StepContext) -> ModelOutput:
        """Pruned prefill through the executor, then greedy decoding of the action tokens against its cache."""
        layout = step.layout
        wrapper = DeferredEndStep(method) if method is not None else None
        result = self.runner(step.embeddings, layout, wrapper, context, return_cache=True)
        record = result.record
        started = time.perf_counter()
        requested = wrapper.plan.attention if wrapper is not None and wrapper.plan is not None else []
        action_requests = [r for r in requested if r.rows == 'action']
        layers = sorted({r.layer for r in action_requests})
        first = self._logits(result.hidden[:, -1]).argmax(-1).reshape(1)
        cache: DecoderCache = result.cache
        # on the device until the last token (one read back per step; graphed with cuda_graph_layers)
        ids, decoded = self.runner.decode_greedy(first, self.action_dim - 1, cache, self._embed_device_ids,
                                                 self._logits, layers)
        tokens = [int(token) for token in ids.tolist()]
        decode_seconds = time.perf_counter() - started
        self._merge_action_attention(record, action_requests, decoded)
        self._account_decode(record, layout, decoded, decode_seconds)
        if wrapper is not None:
            record.selection_seconds += wrapper.finish()
        info = {'action_token_ids': tokens, 'decode_seconds': decode_seconds,
                'tokens_outside_action_range': int(sum(not self._is_action_token(t) for t in tokens))}
        record.info.update({'decode_seconds': decode_seconds})
        return ModelOutput(normalized=self.detokenize(tokens), result=result, info=info)

    def _is_action_token(self, token: int) -> bool:
        vocab = self.checkpoint.action_vocab_size
        return vocab - self.checkpoint.n_action_bins <= token < vocab

    @staticmethod
    def _merge_action_attention(record: StepRecord, requests, decoded) -> None:
        """Average the generated tokens' attention (over the prefill's keys) into the 'action' summaries."""
        for request in requests:
            entry = record.attention.get(request.layer, {}).get(request.key)
            if entry is None:
                continue
            keys, weights = entry
            total = weights.clone().float()
            for step in decoded:
                total += step.attention[request.layer][1][:len(keys)].float()
            record.attention[request.layer][request.key] = (keys, (total / (1 + len(decoded))).to(weights.dtype))
        if requests:
            record.info['action_rows'] = f'last prompt token + {len(decoded)} generated action tokens'

    def _account_decode(self, record: StepRecord, layout: TokenLayout, decoded, seconds: float) -> None:
        """Add the decode steps to the record's FLOPs and model time (the prefill figures stay in ``info``)."""
        shape = self.runner.flops_shape
        pruned = sum(layer_flops(1, k, *shape) for step in decoded for k in step.key_counts)
        full = sum(layer_flops(1, layout.num_tokens + i + 1, *shape)
                   for i in range(len(decoded)) for _ in range(self.runner.num_layers))
        record.add_stage('prefill', 'decode', pruned, full, seconds)

    # -- the adapter's own unpruned forward (transformers, KV cache) -------------------------------------------

    @torch.inference_mode()
    def reference_step(self, images: Sequence[np.ndarray], instruction: str) -> tuple[np.ndarray, list[int], list]:
        """Unpruned greedy generation with transformers' own LlamaForCausalLM and KV cache (as ``predict_action``).

        Returns (normalised actions (1, D), token ids, per-token logits).
        """
        embeddings, _, _ = self.sequence(images, instruction)
        lm = self.model.language_model
        out = lm(inputs_embeds=embeddings, use_cache=True)
        logits = [out.logits[0, -1].float()]
        tokens = [int(logits[-1].argmax())]
        past = out.past_key_values
        for _ in range(1, self.action_dim):
            out = lm(inputs_embeds=self.embed_ids(tokens[-1:]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].float())
            tokens.append(int(logits[-1].argmax()))
        return self.detokenize(tokens), tokens, logits
