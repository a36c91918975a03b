"""Run LeRobot's own pi0 / pi0.5 on a tiny checkpoint of this package (helper of test_backends_pi0_lerobot.py).

Runs in a separate environment with LeRobot installed (``lerobot[pi]``, its own torch and transformers); it imports
nothing of specprune_ros. Usage: ``python lerobot_pi0_parity.py CHECKPOINT_DIR INPUTS.npz OUTPUT.npz``.

LeRobot builds pi0 from the Gemma variant names at the published sizes; the tiny checkpoint's sizes (its
``specprune_architecture`` entry, which LeRobot's config parser does not know) are patched into LeRobot's variant
table, into the PaliGemma vision config and into the vocabulary size before the model is built. The checkpoint is
copied without that entry (and, if this LeRobot's SigLIP has transformers 5's flat parameter names, with its
``vision_tower.vision_model.`` keys renamed). The camera frames go through LeRobot's image pre-processing
(resize with pad, [-1, 1]); the prompt ids padded to ``tokenizer_max_length`` with their mask, the normalised padded
state and the noise (prepared by this package) go straight to ``sample_actions``; the weights LeRobot loaded are
checked against the file.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def main(checkpoint: Path, inputs: Path, output: Path) -> None:
    config = json.loads((checkpoint / 'config.json').read_text())
    sizes = config.pop('specprune_architecture')
    vocab = int(sizes['vocab_size'])
    policy_type = config['type']
    if policy_type == 'pi05':
        from lerobot.policies.pi05 import modeling_pi05 as modeling
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy as Policy
    else:
        from lerobot.policies.pi0 import modeling_pi0 as modeling
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy as Policy
    from lerobot.configs.policies import PreTrainedConfig

    shapes = {'gemma_2b': sizes['vlm'], 'gemma_300m': sizes['expert']}

    def get_gemma_config(variant):
        s = shapes[variant]
        return modeling.GemmaConfig(width=s['width'], depth=s['depth'], mlp_dim=s['mlp_dim'],
                                    num_heads=s['num_heads'], num_kv_heads=s['num_kv_heads'], head_dim=s['head_dim'])

    modeling.get_gemma_config = get_gemma_config
    vision = sizes['vision']
    base_vlm, base_expert = modeling.PaliGemmaForConditionalGenerationWithPiGemma, modeling.PiGemmaForCausalLM

    class TinyPaliGemma(base_vlm):
        def __init__(self, config):
            v = config.vision_config
            v.hidden_size, v.intermediate_size = vision['width'], vision['mlp_dim']
            v.num_hidden_layers, v.num_attention_heads = vision['depth'], vision['num_heads']
            v.patch_size, v.projection_dim = vision['patch_size'], sizes['vlm']['width']
            config.text_config.vocab_size = vocab
            config._vocab_size = vocab
            config.image_token_index = vocab - 1
            super().__init__(config)

    class TinyExpert(base_expert):
        def __init__(self, config, **kwargs):
            config.vocab_size = vocab
            super().__init__(config, **kwargs)

    modeling.PaliGemmaForConditionalGenerationWithPiGemma = TinyPaliGemma
    modeling.PiGemmaForCausalLM = TinyExpert

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        for item in checkpoint.iterdir():
            if item.name not in ('config.json', 'model.safetensors'):
                shutil.copy(item, copy / item.name)
        (copy / 'config.json').write_text(json.dumps(config))
        state = load_file(str(checkpoint / 'model.safetensors'))
        cfg = PreTrainedConfig.from_pretrained(str(copy))
        probe = Policy(cfg)
        flat = not any('vision_tower.vision_model.' in k for k in probe.state_dict())
        if flat:
            state = {k.replace('vision_tower.vision_model.', 'vision_tower.'): v for k, v in state.items()}
        save_file(state, str(copy / 'model.safetensors'))
        policy = Policy.from_pretrained(str(copy), config=cfg, strict=True)
    policy.eval()
    loaded = policy.state_dict()
    for key, tensor in state.items():
        name = key if key in loaded else None
        if name is None:
            raise SystemExit(f'LeRobot has no parameter {key}')
        if not torch.equal(loaded[name].float(), tensor.float()):
            raise SystemExit(f'LeRobot did not load {key} from the file')

    data = np.load(inputs)
    frames = data['frames']         # (cams, H, W, 3) uint8 of the first cams cameras; LeRobot masks the others out
    batch = {key: torch.from_numpy(frames[c]).permute(2, 0, 1)[None].float() / 255.0
             for c, key in enumerate(list(policy.config.image_features)[:len(frames)])}
    images, masks = policy._preprocess_images(batch)
    tokens = torch.from_numpy(data['tokens'])[None].long()
    token_mask = torch.from_numpy(data['token_mask'])[None].bool()
    noise = torch.from_numpy(data['noise']).float()
    model = policy.model
    with torch.no_grad():
        if policy_type == 'pi05':
            actions = model.sample_actions(images, masks, tokens, token_mask, noise=noise)
        else:
            state_in = torch.from_numpy(data['state'])[None].float()
            actions = model.sample_actions(images, masks, tokens, token_mask, state_in, noise=noise)
    import lerobot
    import transformers
    np.savez(output, actions=actions[0].float().numpy(), lerobot=lerobot.__version__,
             transformers=transformers.__version__, torch=torch.__version__, flat_vision_names=flat)


if __name__ == '__main__':
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
