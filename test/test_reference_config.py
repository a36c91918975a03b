"""The reference VLA loads quietly: transformers finds nothing wrong with the decoder config it is built from."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loading_the_reference_vla_prints_no_token_id_warning():
    code = ('from specprune_ros.models.loading import load_model\n'
            "load_model('reference')\nload_model('tiny-random')\nprint('loaded')\n")
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': str(ROOT)})
    output = done.stdout + done.stderr
    assert done.returncode == 0 and 'loaded' in done.stdout, output
    assert 'token_id' not in output and 'within the vocabulary' not in output, output
