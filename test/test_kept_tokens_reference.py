"""Every method keeps exactly the recorded visual tokens on fixed reference-VLA episodes.

See ``kept_tokens_reference.py``: executor and selection speed work must not change what the methods keep.
"""
import json

import pytest

from kept_tokens_reference import FIXTURE, record_reference


@pytest.fixture(scope='module')
def recorded():
    return record_reference()


def test_fixture_covers_every_registered_method(recorded):
    expected = json.loads(FIXTURE.read_text())
    assert recorded['methods'] == expected['methods']
    assert all(len(e['methods']) == len(expected['methods']) for e in expected['episodes'])


def test_kept_tokens_match_the_recorded_fixture(recorded):
    expected = json.loads(FIXTURE.read_text())
    assert len(recorded['episodes']) == len(expected['episodes'])
    for got, want in zip(recorded['episodes'], expected['episodes']):
        label = f"{want['family']} seed {want['seed']}"
        # the simulator and the unpruned policy must replay the same frames, else the comparison means nothing
        assert got['observations_sha1'] == want['observations_sha1'], f'{label}: the recorded observations changed'
        assert got['steps'] == want['steps']
        for method, steps in want['methods'].items():
            for index, (g, w) in enumerate(zip(got['methods'][method], steps)):
                assert g == w, f'{label}, {method}, step {index}: kept tokens differ from the fixture'
