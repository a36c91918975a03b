"""Published-shape builds (random weights in memory) and the deployment-latency harness (schema, same inputs)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specprune_ros.adapters.openvla import OpenVLAAdapter
from specprune_ros.adapters.openvla_oft import OpenVLAOFTAdapter
from specprune_ros.adapters.published_shapes import IN_MEMORY, PublishedShape, build_published
from specprune_ros.pruning import build_method

from benchmark_scripts import load_benchmark_script

INSTRUCTION = 'put the blue cube on the red plate'


def _harness():
    return load_benchmark_script('deployment_latency')


def _frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(200, 240, 3), dtype=np.uint8) for _ in range(count)]


def test_published_dimensions_are_the_7b_models():
    shape = PublishedShape(kind='openvla-oft')
    config = shape.text_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.vocab_size) == (4096, 32, 32, 11008, 32064)
    assert shape.images == 2 and PublishedShape(kind='openvla').images == 1
    assert shape.vision_overrides() == [{}, {}]
    narrow = PublishedShape(kind='openvla-oft', width=512, vision_scale=0.125)
    assert (narrow.num_heads, narrow.mlp, narrow.text_config().num_hidden_layers) == (4, 1376, 32)
    assert narrow.vision_overrides() == [{'embed_dim': 128, 'num_heads': 2}, {'embed_dim': 144, 'num_heads': 2}]
    with pytest.raises(ValueError):
        PublishedShape(kind='pi0')


def test_oft_at_a_tiny_width_has_the_published_layout():
    torch.manual_seed(0)
    adapter = build_published('openvla-oft', width=64, layers=32, vision_scale=1 / 64, proprio_dim=8)
    assert isinstance(adapter, OpenVLAOFTAdapter)
    assert adapter.checkpoint.directory == IN_MEMORY and adapter.checkpoint.weight_map == {}
    dino, siglip = adapter.checkpoint.vision_specs
    assert (dino.depth, dino.patch_size, dino.img_size, dino.reg_tokens) == (24, 14, 224, 4)
    assert (siglip.depth, siglip.patch_size, siglip.img_size, siglip.class_token) == (27, 14, 224, False)
    assert adapter.runner.num_layers == 32 and adapter.runner.hidden_size == 64
    assert adapter.patches_per_image == 256 and adapter.grid == 16 and adapter.num_images == 2
    assert adapter.num_action_tokens == 56 and adapter.chunk_size == 8 and adapter.action_dim == 7
    head = adapter.action_head.model
    assert head.fc1.in_features == 7 * 64 and head.fc2.out_features == 7 and len(head.mlp_resnet_blocks) == 2
    assert adapter.model.projector.fused and adapter.model.projector.fc3.out_features == 64
    proprio = np.linspace(-0.5, 0.5, 8)
    out = adapter.step(_frames(2), INSTRUCTION, proprio=proprio)
    layout = out.layout
    assert layout.num_visual == 512 and layout.camera_spans == ((1, 257), (257, 513))
    assert layout.proprio_span == (513, 514) and layout.action_span[1] - layout.action_span[0] == 56
    assert not layout.causal
    prompt = adapter.encode_prompt(INSTRUCTION).ids
    assert len(prompt) == 23           # Llama-2's count for this prompt: BOS, 21 pieces, the empty token
    assert layout.num_tokens == 1 + 512 + 1 + (len(prompt) - 1) + 56 + 1
    assert out.normalized.shape == (8, 7) and np.isfinite(out.normalized).all()
    # the executor and transformers' own forward agree on these random weights
    reference = adapter.reference_step(_frames(2), INSTRUCTION, proprio)
    np.testing.assert_allclose(out.normalized, reference, atol=2e-4)
    pruned = adapter.step(_frames(2), INSTRUCTION, proprio=proprio, method=build_method('random', {'keep_ratio': 0.25}))
    assert pruned.result.record.visual_kept_per_layer == [128] * 32


def test_openvla_at_a_tiny_width_has_the_published_layout():
    adapter = build_published('openvla', width=64, layers=32, vision_scale=1 / 64)
    assert isinstance(adapter, OpenVLAAdapter)
    assert adapter.num_images == 1 and adapter.patches_per_image == 256 and adapter.runner.num_layers == 32
    assert adapter.checkpoint.action_vocab_size == 32000
    out = adapter.step(_frames(1), INSTRUCTION)
    assert out.layout.num_visual == 256 and out.layout.causal and out.layout.camera_spans == ((1, 257),)
    assert len(out.info['action_token_ids']) == 7 and out.normalized.shape == (1, 7)
    _, tokens, _ = adapter.reference_step(_frames(1), INSTRUCTION)
    assert tokens == out.info['action_token_ids']


REQUIRED = ('shape', 'device', 'method', 'label', 'speedup', 'speedup_ci95', 'flops_ideal_speedup', 'decoder_ms',
            'selection_ms', 'total_ms', 'kept_visual_ratio', 'vision_ms', 'head_ms', 'speedup_vs_transformers',
            'attention_backend', 'inputs_sha256', 'frames_sha256')


def test_harness_smoke_run_schema_and_same_inputs(tmp_path):
    harness = _harness()
    argv = ['--shape', 'oft', 'openvla', '--width', '64', '--layers', '4', '--steps', '2', '--warmup', '1',
            '--stride', '1', '--threads', '1', '--out', str(tmp_path)]
    report = harness.main(argv)
    written = json.loads((tmp_path / 'deployment_latency.json').read_text())
    assert [(r['label'], r['total_ms']) for r in written['rows']] == [(r['label'], r['total_ms'])
                                                                      for r in report['rows']]
    meta = written['meta']
    assert meta['command'].endswith(' '.join(argv)) and meta['torch'] == torch.__version__ and meta['device']
    labels = [m[0] for m in harness.METHODS] + [harness.REFERENCE]
    shapes = {row['shape'] for row in written['rows']}
    assert shapes == {'openvla-oft 64x4, vision x0.015625', 'openvla 64x4, vision x0.015625'}
    for shape in shapes:
        rows = [row for row in written['rows'] if row['shape'] == shape]
        assert [row['label'] for row in rows] == labels
        for row in rows:
            missing = [key for key in REQUIRED if key not in row]
            assert not missing, (row['label'], missing)
            assert row['steps'] == 2 and len(row['attention_backend']) == 4
            assert row['speedup_ci95'][0] <= row['speedup'] <= row['speedup_ci95'][1]
        # every configuration saw the same observations and the same preprocessed frames
        assert len({row['inputs_sha256'] for row in rows}) == 1
        assert len({row['frames_sha256'] for row in rows}) == 1
        by_label = {row['label']: row for row in rows}
        assert by_label['none']['speedup'] == 1.0 and by_label['none']['kept_visual_ratio'] == 1.0
        assert by_label['random 25%']['kept_visual_ratio'] == 0.25
        assert by_label['random 25%']['flops_ideal_speedup'] > 1.5
        assert by_label['none']['attention_backend'] == ['sdpa'] * 4
        assert any('probe' in path for path in by_label['fastv 25%']['attention_backend'])
    oft = [row for row in written['rows'] if row['shape'].startswith('openvla-oft')]
    assert all(row['decode_ms'] is None or row['decode_ms'] == 0 for row in oft)
    openvla = [row for row in written['rows'] if row['shape'].startswith('openvla ') and row['method'] == 'none']
    assert openvla[0]['decode_ms'] > 0
    table = (tmp_path / 'deployment_latency.md').read_text()
    assert meta['command'] in table and meta['commit'] in table and '| specprune |' in table
    assert (tmp_path / 'deployment_latency.png').stat().st_size > 0
    # the GPU targets read off the same report: every figure as the report has it, every verdict against its bar
    targets = load_benchmark_script('gpu_targets')
    text = targets.main([str(tmp_path / 'deployment_latency.json'), '--out', str(tmp_path / 'targets.md')])
    assert (tmp_path / 'targets.md').read_text() == text
    found = targets.target_rows(written, 'smoke')
    for shape in shapes:
        by_label = {row['label']: row for row in written['rows'] if row['shape'] == shape}
        got = {row['target']: row for row in found if row['shape'] == shape}
        ratio = 1 / by_label['none']['speedup_vs_transformers']
        executor = got["unpruned executor / transformers' SDPA forward (time)"]
        assert executor['value'] == f'{ratio:.2f}' and executor['verdict'] == ('met' if ratio <= 1.05 else 'missed')
        for label, bar in (('specprune', 1.6), ('vla_pruner 25%', 2.0)):
            for reading, key in (('whole step', 'speedup'), ('decoder and selection', 'decoder_speedup')):
                row, value = got[f'{label} speedup, {reading}'], by_label[label][key]
                assert row['value'] == f'{value:.2f}x' and row['verdict'] == ('met' if value >= bar else 'missed')
        shares = {name: row for name, row in got.items() if name.endswith(' selection / decoder')}
        assert len(shares) == len(by_label) - 2          # every method but the unpruned run and transformers'
        for name, row in shares.items():
            share = by_label[name[:-len(' selection / decoder')]]['selection_share_of_decoder']
            assert row['verdict'] == ('met' if share <= 0.03 else 'missed')


def test_an_unknown_method_label_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        _harness().main(['--methods', 'none', 'specprun', '--out', 'unused'])
    assert "--methods: unknown ['specprun']" in capsys.readouterr().err


def test_harness_times_a_checkpoint_directory(tmp_path):
    from specprune_ros.adapters.tiny import write_tiny_checkpoint
    directory = write_tiny_checkpoint(tmp_path / 'tiny-oft', 'openvla-oft')
    harness = _harness()
    report = harness.main(['--checkpoint', str(directory), '--methods', 'none', 'specprune', '--steps', '2',
                           '--warmup', '1', '--stride', '1', '--threads', '1', '--out', str(tmp_path / 'out'),
                           '--no-plot'])
    rows = report['rows']
    assert [row['label'] for row in rows] == ['none', 'specprune', harness.REFERENCE]
    assert {row['shape'] for row in rows} == {'openvla-oft checkpoint tiny-oft'}
    assert report['shapes'][0]['patches_per_image'] == 64 and report['shapes'][0]['layers'] == 4
    assert len({row['inputs_sha256'] for row in rows}) == 1 and len({row['frames_sha256'] for row in rows}) == 1
    assert rows[1]['kept_visual_ratio'] < 1.0


def test_every_layer_hooks_twins_keep_the_same_tokens(tmp_path):
    """``--every-layer-hooks`` times each method again with its hook after every layer: same tokens, more calls."""
    harness = _harness()
    report = harness.main(['--shape', 'oft', '--width', '64', '--layers', '4', '--methods', 'none', 'specprune',
                           'fastv 25%', '--every-layer-hooks', '--no-reference', '--steps', '2', '--warmup', '1',
                           '--stride', '1', '--threads', '1', '--out', str(tmp_path), '--no-plot'])
    by_label = {row['label']: row for row in report['rows']}
    assert sorted(by_label) == sorted(['none', 'specprune', 'fastv 25%', 'none, hooks after every layer',
                                       'specprune, hooks after every layer', 'fastv 25%, hooks after every layer'])
    for label in ('none', 'specprune', 'fastv 25%'):
        twin = by_label[f'{label}, hooks after every layer']
        assert twin['method'] == by_label[label]['method']
        assert twin['kept_visual_tokens'] == by_label[label]['kept_visual_tokens']
        assert twin['flops_ideal_speedup'] == by_label[label]['flops_ideal_speedup']


def test_layer_times_split_the_decoder_into_its_layers(tmp_path):
    """``--layer-times``: each layer's own time per method, inside its decoder time, and a line in the table."""
    harness = _harness()
    report = harness.main(['--shape', 'reference', '--width', '64', '--layers', '4', '--methods', 'none',
                           'random 25%', 'specprune', '--layer-times', '--steps', '2', '--warmup', '1', '--stride',
                           '1', '--threads', '1', '--out', str(tmp_path), '--no-plot'])
    by_label = {row['label']: row for row in report['rows']}
    for row in by_label.values():
        assert 0 < row['layers_ms'] < row['decoder_ms']
        assert row['layers_speedup'] > 0 and row['layers_over_ideal'] > 0
    assert by_label['none']['layers_speedup'] == 1.0
    table = (tmp_path / 'deployment_latency.md').read_text()
    assert 'Decoder layers alone' in table and 'random 25% ' in table.split('Decoder layers alone')[1]
    plain = harness.main(['--shape', 'reference', '--width', '64', '--layers', '4', '--methods', 'none', '--steps',
                          '1', '--warmup', '1', '--stride', '1', '--threads', '1', '--out', str(tmp_path / 'plain'),
                          '--no-plot'])
    assert np.isnan(plain['rows'][0]['layers_ms']) and 'layers_speedup' not in plain['rows'][0]
    assert 'Decoder layers alone' not in (tmp_path / 'plain' / 'deployment_latency.md').read_text()


def test_harness_reference_layout(tmp_path):
    harness = _harness()
    report = harness.main(['--shape', 'reference', '--width', '64', '--layers', '4', '--methods', 'none', 'random 25%',
                           '--steps', '2', '--warmup', '1', '--stride', '1', '--threads', '1', '--out', str(tmp_path),
                           '--no-plot'])
    rows = report['rows']
    assert [row['label'] for row in rows] == ['none', 'random 25%']          # no transformers forward of this model
    assert report['shapes'][0]['images'] == 2 and report['shapes'][0]['patches_per_image'] == 144
    assert rows[0]['num_visual'] == 288 and rows[1]['kept_visual_tokens'] == 72
    assert len({row['frames_sha256'] for row in rows}) == 1 and len({row['inputs_sha256'] for row in rows}) == 1


def test_saved_frames_replay_to_the_same_inputs(tmp_path, monkeypatch):
    """Frames saved on a machine that renders give the same inputs where the simulator is not used at all."""
    harness = _harness()
    common = ['--shape', 'reference', '--width', '64', '--layers', '2', '--methods', 'none', '--steps', '2',
              '--warmup', '1', '--stride', '1', '--threads', '1', '--no-plot']
    rendered = harness.main([*common, '--out', str(tmp_path / 'rendered')])
    frames = tmp_path / 'frames.npz'
    assert harness.main([*common, '--out', str(tmp_path / 'x'), '--save-frames', str(frames)]) == {'rows': []}

    def no_simulator(*args, **kwargs):
        raise AssertionError('the simulator ran although frames were given')
    monkeypatch.setattr(harness, 'simulator_episode', no_simulator)
    replayed = harness.main([*common, '--out', str(tmp_path / 'replayed'), '--frames', str(frames)])
    assert [r['inputs_sha256'] for r in replayed['rows']] == [r['inputs_sha256'] for r in rendered['rows']]
    assert [r['frames_sha256'] for r in replayed['rows']] == [r['frames_sha256'] for r in rendered['rows']]


def _not_json(constant: str):
    raise ValueError(f'{constant} is not JSON')


def test_appended_shapes_keep_the_run_that_measured_them(tmp_path):
    """--append keeps earlier shapes with their own command and date; a re-measured shape takes the new run."""
    harness = _harness()
    common = ['--shape', 'reference', '--layers', '2', '--methods', 'none', '--steps', '2', '--warmup', '1',
              '--stride', '1', '--threads', '1', '--no-plot', '--out', str(tmp_path), '--append']
    harness.main([*common, '--width', '64'])
    first = json.loads((tmp_path / 'deployment_latency.json').read_text())
    harness.main([*common, '--width', '32'])        # the earlier rows come back with null for what was not timed
    both = json.loads((tmp_path / 'deployment_latency.json').read_text(), parse_constant=_not_json)
    assert [row['layers_ms'] for row in both['rows']] == [None, None]        # no --layer-times
    runs = {info['shape']: info['run'] for info in both['shapes']}
    assert set(runs) == {'reference layout 64x2', 'reference layout 32x2'}
    assert runs['reference layout 64x2'] == first['shapes'][0]['run']
    assert '--width 64' in runs['reference layout 64x2']['command']
    assert '--width 32' in runs['reference layout 32x2']['command']
    text = (tmp_path / 'deployment_latency.md').read_text()
    assert 'Kept from other runs: reference layout 64x2' in text
    assert text.count('Measured by `python benchmarks/deployment_latency.py') == 2
    harness.main([*common, '--width', '64'])           # re-measured: its row and run are replaced, not duplicated
    again = json.loads((tmp_path / 'deployment_latency.json').read_text())
    assert sorted(info['shape'] for info in again['shapes']) == sorted(runs)
    assert len([row for row in again['rows'] if row['shape'] == 'reference layout 64x2']) == 1
    assert 'Kept from other runs: reference layout 32x2' in (tmp_path / 'deployment_latency.md').read_text()


def test_shapes_of_one_run_are_not_listed_as_kept(tmp_path):
    """A run that measures several shapes reports all of them as its own, whatever minute each one finished."""
    harness = _harness()
    harness.main(['--shape', 'reference', '--width', '64', '32', '--layers', '2', '--methods', 'none', '--steps', '2',
                  '--warmup', '1', '--stride', '1', '--threads', '1', '--no-plot', '--out', str(tmp_path)])
    report = json.loads((tmp_path / 'deployment_latency.json').read_text())
    assert len({info['run']['started'] for info in report['shapes']}) == 1
    assert 'Kept from other runs' not in (tmp_path / 'deployment_latency.md').read_text()


def test_a_failing_method_is_left_out_and_the_others_measured(tmp_path, monkeypatch):
    """A method that raises mid-run (a device fault on new hardware, say) is named and dropped; the rest is timed."""
    harness = _harness()
    build = harness.build_method

    def breaks_at_its_second_step(name, config=None, **kwargs):
        method = build(name, config, **kwargs)
        if name == 'fastv':
            begin, calls = method.begin_step, []

            def begin_step(context):
                calls.append(context)
                if len(calls) == 2:
                    raise RuntimeError('device fault')
                return begin(context)
            method.begin_step = begin_step
        return method

    monkeypatch.setattr(harness, 'build_method', breaks_at_its_second_step)
    report = harness.main(['--shape', 'oft', '--width', '64', '--layers', '4', '--methods', 'none', 'fastv 25%',
                           'random 25%', '--no-reference', '--steps', '3', '--warmup', '1', '--stride', '1',
                           '--threads', '1', '--out', str(tmp_path), '--no-plot'])
    assert [row['label'] for row in report['rows']] == ['none', 'random 25%']
    assert all(row['steps'] == 3 for row in report['rows'])
    assert report['shapes'][0]['failed'] == {'fastv 25%': 'RuntimeError: device fault'}
    assert '**Left out**' in (tmp_path / 'deployment_latency.md').read_text()


def test_profile_says_where_each_step_spends_its_time(tmp_path):
    """``--profile N``: N more steps per method under torch.profiler; per-step counts and the costliest operations."""
    harness = _harness()
    report = harness.main(['--shape', 'oft', '--width', '64', '--layers', '4', '--methods', 'none', 'random 25%',
                           '--no-reference', '--steps', '1', '--warmup', '1', '--stride', '1', '--threads', '1',
                           '--profile', '2', '--fuse-projections', 'off', '--out', str(tmp_path), '--no-plot'])
    assert report['shapes'][0]['weight_copies'] is None          # --fuse-projections off: the layers' own products
    for row in report['rows']:
        prof = row['profile']
        assert prof['steps'] == 2 and prof['wall_ms'] > 0 and prof['aten_calls'] > 100
        assert prof['kernel_launches'] == 0 and prof['device_busy_ms'] == 0      # nothing ran on a GPU here
        names = [name for name, ms, calls in prof['top_host']]
        assert any('addmm' in name or 'linear' in name or 'mm' in name for name in names)
    table = (tmp_path / 'deployment_latency.md').read_text()
    assert '| random 25% |' in table.split('Profile (')[1]


class _HostEvent:
    """Stands in for ``torch.cuda.Event(enable_timing=True)``: the host clock when recorded."""

    def record(self) -> None:
        import time
        self.at = time.perf_counter()

    def elapsed_time(self, end: '_HostEvent') -> float:
        return 1e3 * (end.at - self.at)


@pytest.mark.parametrize('events', [True, False])
def test_parts_of_a_step_timed_without_waiting_for_the_device(events):
    """With timing events (CUDA's by default) nothing inside a step waits for the device.

    The parts come from the events once the step is over. With ``--serial-phases`` every part is synchronised
    before and after.
    """
    harness = _harness()
    adapter, _ = harness.build_target(harness.ReferenceShape(64, 2), 'cpu', 'float32')
    syncs = []
    clock = harness.PhaseClock(adapter, lambda: syncs.append(1), device_event=_HostEvent if events else None)
    runner = harness.Runner('random 25%', 'random', {'keep_ratio': 0.25}, build_method('random', {'keep_ratio': 0.25}))
    rng = np.random.default_rng(0)
    frame = harness.Frame(images={c: rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
                                  for c in ('agentview', 'wrist')},
                          proprio=np.zeros(6), instruction=INSTRUCTION, executed_actions=np.zeros((1, 7)))
    with torch.inference_mode():
        runner.run(adapter, frame, ('agentview', 'wrist'))
    if events:
        assert syncs == [] and clock.seconds == {}
        clock.settle()
    else:
        assert len(syncs) == 2 * 3                    # vision, the executor pass and the head, each synchronised
    assert set(clock.seconds) == {'vision', 'runner', 'head'}
    assert all(seconds > 0 for seconds in clock.seconds.values())
    clock.settle()                                    # nothing recorded since: the parts stay as they are
    assert set(clock.seconds) == {'vision', 'runner', 'head'}


def test_selection_graphs_leave_the_host_fewer_operations(tmp_path):
    # the census behind the GPU claim: with the decoder layers replayed as graphs (a recomputing stand-in on the
    # CPU) each pass issues fewer operations than eagerly, and with spans of layers and the selections replayed too
    # each method's hooks and pass issue fewer still; the replays are counted
    census = load_benchmark_script('selection_operations')
    labels = ['none', 'specprune', 'vla_pruner 25%', 'coverage_ranked']
    report = census.main(['--width', '32', '--layers', '6', '--steps', '3', '--methods', *labels,
                          '--out', str(tmp_path)])
    rows = {(row['label'], row['mode']): row for row in report['rows']}
    for label in labels:
        eager, layers, graphed = (rows[label, mode] for mode in ('eager', 'layer graphs', 'graphs'))
        assert eager['steps'] == layers['steps'] == graphed['steps'] == 3
        assert eager['hooks_replays_per_step'] == eager['pass_replays_per_step'] == 0
        assert layers['hooks_replays_per_step'] == 0 and layers['pass_replays_per_step'] >= 1
        assert layers['pass_operations_per_step'] < eager['pass_operations_per_step'], label
        # the selection itself does not change with the layers' path (one-time tables aside)
        assert abs(layers['hooks_operations_per_step'] - eager['hooks_operations_per_step']) <= 1, label
        if label != 'none':
            assert graphed['hooks_replays_per_step'] >= 1
            assert graphed['hooks_operations_per_step'] < layers['hooks_operations_per_step'], label
            assert graphed['pass_operations_per_step'] < layers['pass_operations_per_step'], label
    # the unpruned pass: one graph per layer, then one span of all six layers
    assert rows['none', 'layer graphs']['pass_replays_per_step'] == 6
    assert rows['none', 'graphs']['pass_replays_per_step'] == 1
    assert rows['none', 'graphs']['pass_operations_per_step'] < rows['none', 'layer graphs']['pass_operations_per_step']
    table = (tmp_path / 'selection_operations.md').read_text()
    assert all(label in table for label in labels)
    assert json.loads((tmp_path / 'selection_operations.json').read_text())['rows'] == report['rows']
    # the census leaves the graph switches as it found them (a static method stays one)
    from specprune_ros.core.cuda_graphs import ShapeGraphs
    assert isinstance(vars(ShapeGraphs)['_graphs_on'], staticmethod)
    assert ShapeGraphs(lambda x: x)(torch.ones(2)).tolist() == [1.0, 1.0]


def test_layer_times_of_openvla_are_set_against_the_flops_of_the_pass_they_time(tmp_path):
    """The decode of OpenVLA runs outside the timed layers: layers measured / ideal uses the prefill pass's FLOPs."""
    harness = _harness()
    report = harness.main(['--shape', 'openvla', '--width', '64', '--layers', '4', '--methods', 'none', 'random 25%',
                           '--layer-times', '--steps', '2', '--warmup', '1', '--stride', '1', '--threads', '1',
                           '--no-reference', '--out', str(tmp_path), '--no-plot'])
    row = next(row for row in report['rows'] if row['label'] == 'random 25%')
    assert row['decode_ms'] > 0
    prefill_ratio = row['layers_over_ideal'] / row['layers_speedup']
    assert prefill_ratio < row['flops_ratio']            # the decode's key reads shrink less than the prefill


def test_the_step_order_balances_positions_and_varies_what_runs_before_each_method():
    harness = _harness()
    methods = ['none', 'specprune', 'vla_pruner', 'transformers']
    orders = [harness.step_order(methods, index) for index in range(2 * len(methods))]
    for method in methods:
        assert sorted(order.index(method) for order in orders) == sorted(list(range(len(methods))) * 2)
        before = {order[order.index(method) - 1] for order in orders if order.index(method) > 0}
        assert len(before) >= 2, (method, before)


def test_a_missing_checkpoint_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _harness().main(['--checkpoint', str(tmp_path / 'missing'), '--out', str(tmp_path)])
    assert stop.value.code == 2 and 'does not exist' in capsys.readouterr().err
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'pi0_latency.py'
    pi0 = subprocess.run([sys.executable, str(script), '--checkpoint',
                          str(tmp_path / 'missing')], capture_output=True, text=True, timeout=120)
    assert pi0.returncode == 2 and 'does not exist' in pi0.stderr and 'Traceback' not in pi0.stderr
