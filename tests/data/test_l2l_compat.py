"""The learn2learn adapter of the fast sampler: another learn2learn version stops the run with one line."""
from __future__ import annotations

import learn2learn
import pytest
from omegaconf import OmegaConf

from maml_runner import cli
from maml_runner.data import l2l_compat
from maml_runner.data.fast_episodes import CachedEpisodes, cached_episodes
from maml_runner.data.omniglot import build_omniglot
from maml_runner.data.sinusoid import SinusoidTasks
from maml_runner.errors import UserError
from omniglot_fixture import make_fake_omniglot

MISMATCH = ("learn2learn 0.3.0 is installed, but maml-runner's episode sampler (maml_runner/data/l2l_compat.py) "
            "supports learn2learn 0.2.0 only; install learn2learn==0.2.0 (scripts/setup_env.sh does)")


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    root = make_fake_omniglot(tmp_path_factory.mktemp("omniglot"))
    cfg = OmegaConf.create(dict(root=str(root), ways=2, shots=1, query_shots=1, image_size=28, split=[6, 3, 3],
                                split_seed=1, rotations=[0, 90, 180, 270], cache_dir=str(tmp_path_factory.mktemp("c")),
                                download=False))
    return build_omniglot(cfg)


def test_the_installed_learn2learn_is_the_supported_one(omniglot):
    assert learn2learn.__version__ in l2l_compat.SUPPORTED_VERSIONS
    l2l_compat.check_version()  # no error
    assert isinstance(cached_episodes(omniglot["train"]), CachedEpisodes)


def test_another_learn2learn_version_is_one_line_with_both_versions(omniglot, monkeypatch):
    monkeypatch.setattr(learn2learn, "__version__", "0.3.0")
    with pytest.raises(UserError) as raised:
        cached_episodes(omniglot["train"])  # not a silent fallback to task-by-task sampling
    assert str(raised.value) == MISMATCH
    assert cli.error_line(raised.value) == (f"maml-run: error: {MISMATCH}", 2)


def test_sources_without_learn2learn_do_not_care_about_its_version(monkeypatch):
    monkeypatch.setattr(learn2learn, "__version__", "0.3.0")
    sinusoid = SinusoidTasks(5, 5)
    assert cached_episodes(sinusoid) is sinusoid
