"""The peer: learn2learn's own MAML-on-Omniglot pipeline, as a user of learn2learn would run it.

What users run (learn2learn 0.2.0, examples/vision/maml_omniglot.py with the CNN): tasks from
`l2l.vision.benchmarks.get_tasksets('omniglot', ...)` over torchvision's `Omniglot` (a PNG decoded and resized per
sample, per task), `l2l.vision.models.OmniglotCNN`, one `l2l.algorithms.MAML.clone()` per task, the task's 2*shots
samples per class split alternately into support and query, `backward` per task, gradients averaged, Adam.
Used by scripts/bench_speed.py (the PEER column) and scripts/time_to_accuracy.py. Nothing here is the runner's code.

    from l2l_peer import PeerMAML, prepare_peer_root   # scripts/ is on sys.path when a script there runs
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

import learn2learn as l2l
import torch
import torch.nn.functional as F

PARTS = ("images_background", "images_evaluation")
DEFAULT_PEER_ROOT = Path(tempfile.gettempdir()) / "maml_runner_l2l_omniglot"


def prepare_peer_root(omniglot_root, peer_root=DEFAULT_PEER_ROOT) -> Path:
    """The layout torchvision's `Omniglot(root)` reads, built from the runner's Omniglot folder without writing there.

    `<peer_root>/omniglot-py/<part>.zip` are symlinks to `<omniglot_root>/<part>.zip`; `<part>/` is the extracted
    zip (torchvision reads the PNG files from it; extracted once, into a temporary folder, then renamed, so an
    interrupted extraction is redone). learn2learn writes its label bookkeeping (`omniglot-bookkeeping.pkl`) into
    peer_root the first time. Returns peer_root.
    """
    omniglot_root, peer_root = Path(omniglot_root).expanduser(), Path(peer_root).expanduser()
    folder = peer_root / "omniglot-py"
    folder.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        archive = omniglot_root / f"{part}.zip"
        if not archive.is_file():
            raise FileNotFoundError(f"the peer needs {archive} (learn2learn reads the original zips' layout)")
        link = folder / f"{part}.zip"
        if link.is_symlink() or link.exists():
            if link.resolve() != archive.resolve():
                raise FileExistsError(f"{link} exists and is not a link to {archive}: use another --peer-root")
        else:
            link.symlink_to(archive.resolve())
        if not (folder / part).is_dir():
            partial = Path(tempfile.mkdtemp(prefix=f"{part}.", dir=folder))
            with zipfile.ZipFile(archive) as opened:
                opened.extractall(partial)
            (partial / part).rename(folder / part)
            shutil.rmtree(partial)
    return peer_root


@contextlib.contextmanager
def integrity_check_bypassed():
    """torchvision's Omniglot checks each zip's md5 against the original download and, on a mismatch, tries to
    download it again (and fails offline). The shared zips are repacked (same PNG files, different zip bytes, see
    the data folder's README), so their md5 never matches: accept a part when its zip and extracted folder exist."""
    from torchvision.datasets.omniglot import Omniglot

    def present(dataset) -> bool:
        part = dataset._get_target_folder()
        return (Path(dataset.root) / f"{part}.zip").exists() and (Path(dataset.root) / part).is_dir()

    with mock.patch.object(Omniglot, "_check_integrity", present):
        yield


def peer_tasksets(peer_root, ways: int, shots: int):
    """learn2learn's benchmark tasksets (train / validation / test; 2*shots samples per class, as in the example).

    The first call on a peer_root loads every image once for learn2learn's bookkeeping (about a minute).
    learn2learn's split draws from the global `random` (`random.shuffle` of the 1,623 class ids): seed it first.
    """
    with integrity_check_bypassed():
        return l2l.vision.benchmarks.get_tasksets("omniglot", train_ways=ways, train_samples=2 * shots,
                                                  test_ways=ways, test_samples=2 * shots, root=str(peer_root))


def split_support_query(data: torch.Tensor, labels: torch.Tensor, shots: int, ways: int):
    """The example's split: a task's samples come sorted by class, 2*shots per class; every other sample (even
    positions) is support, the rest query. Returns (support_x, support_y, query_x, query_y)."""
    support = torch.zeros(data.size(0), dtype=torch.bool)
    support[torch.arange(shots * ways) * 2] = True
    return data[support], labels[support], data[~support], labels[~support]


class PeerMAML:
    """learn2learn's MAML example loop (training step and evaluation), with the runner's hyperparameters.

    Arguments: tasksets (from `peer_tasksets`), ways, shots, inner_lr, inner_steps, outer_lr, first_order, device.
    """

    def __init__(self, tasksets, ways: int, shots: int, inner_lr: float, inner_steps: int, outer_lr: float,
                 first_order: bool, device):
        self.tasksets, self.ways, self.shots, self.steps = tasksets, ways, shots, inner_steps
        self.device = torch.device(device)
        self.model = l2l.vision.models.OmniglotCNN(ways).to(self.device)
        self.maml = l2l.algorithms.MAML(self.model, lr=inner_lr, first_order=first_order)
        self.optimizer = torch.optim.Adam(self.maml.parameters(), outer_lr)

    def adapted_query(self, batch, steps: int, first_order: bool | None = None):
        """(query loss, query accuracy) of a clone adapted with `steps` steps on the batch's support samples;
        first_order=True keeps no second-order graph (evaluation), None = the wrapper's setting."""
        data, labels = (t.to(self.device) for t in batch)
        support_x, support_y, query_x, query_y = split_support_query(data, labels, self.shots, self.ways)
        learner = self.maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support_x), support_y), first_order=first_order)
        predictions = learner(query_x)
        accuracy = (predictions.argmax(dim=1) == query_y).float().mean()
        return F.cross_entropy(predictions, query_y), accuracy

    def train_iteration(self, meta_batch: int) -> tuple[float, float]:
        """One meta-iteration, sampling included: per task sample, clone, adapt, backward; average; Adam step.
        Returns the mean query loss and accuracy (read with `.item()` per task, as the example does)."""
        self.optimizer.zero_grad()
        loss_sum = accuracy_sum = 0.0
        for _ in range(meta_batch):
            loss, accuracy = self.adapted_query(self.tasksets.train.sample(), self.steps)
            loss.backward()
            loss_sum += loss.item()
            accuracy_sum += accuracy.item()
        for parameter in self.maml.parameters():
            parameter.grad.mul_(1.0 / meta_batch)
        self.optimizer.step()
        return loss_sum / meta_batch, accuracy_sum / meta_batch

    def fixed_validation_tasks(self, count: int, seed: int) -> list:
        """`count` validation tasks drawn once (so every validation sees the same tasks); the global `random`
        state is restored afterwards, so drawing them does not change the training tasks."""
        state = random.getstate()
        random.seed(seed)
        try:
            return [self.tasksets.validation.sample() for _ in range(count)]
        finally:
            random.setstate(state)

    def validation_accuracy(self, tasks: list, steps: int) -> float:
        """Mean query accuracy over the tasks after `steps` adaptation steps each (the model stays in train mode:
        batch statistics of each task, as in the example's validation; no second-order graph: nothing is
        back-propagated)."""
        return sum(self.adapted_query(task, steps, first_order=True)[1].item() for task in tasks) / len(tasks)


def peer_available(omniglot_root) -> bool:
    """Whether the runner's Omniglot folder has the two zips the peer needs."""
    return all(os.path.isfile(Path(omniglot_root).expanduser() / f"{part}.zip") for part in PARTS)
