"""``import lofit_lens``: nothing set in the environment, no torch loaded, and the public names
(``lofit_lens.__all__``) loaded on first use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FRESH = """
import contextlib, io, os, sys
when_torch_loads = []

class Watch:  # notes OMP_WAIT_POLICY as torch starts loading (its first submodule)
    def find_spec(self, name, path=None, target=None):
        if name.startswith('torch.') and not when_torch_loads:
            when_torch_loads.append(os.environ.get('OMP_WAIT_POLICY', 'unset'))

sys.meta_path.insert(0, Watch())
import lofit_lens, lofit_lens.cli
print('OMP_WAIT_POLICY' in os.environ, 'torch' in sys.modules)
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    lofit_lens.cli.main(['--help'])
import torch
print(*when_torch_loads)
"""


def test_import_sets_nothing_and_the_command_line_sets_the_wait_policy_before_torch():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", FRESH], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False", "PASSIVE"]


def test_public_names_load_on_first_use():
    import lofit_lens as ll
    from lofit_lens import generate
    from lofit_lens.eval.generation import greedy_generate

    assert set(ll.__all__) == set(ll._MODULE_OF)
    assert set(ll.__all__) | {"__version__"} <= set(dir(ll))
    assert generate is ll.generate is greedy_generate
    for name in ll.__all__:
        assert getattr(ll, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        ll.not_a_name  # noqa: B018


def test_a_submodule_named_like_a_public_name_does_not_replace_it():
    import lofit_lens as ll
    from lofit_lens import doctor

    module = sys.modules["lofit_lens.doctor"]
    ll.doctor = module  # what importing lofit_lens.doctor first does to the package
    assert ll.doctor is doctor is module.doctor
