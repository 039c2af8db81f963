"""What a record says about how it was made, beyond its configuration: the execution (engine, processes, threads,
one entry per training session), a fingerprint of the data actually read and the digest of the final weights.

These are the facts ``metabench verify`` needs to tell float noise from a real difference, and what published
weights are checked against.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from metabench.datasets.datamodule import EpisodicDataModule
from metabench.models.algorithms import MetaLearner
from metabench.run.config import RunConfig, flatten_config, training_shape
from metabench.run.weights import module_state, state_sha256

ROLES = ("train", "val", "test")
# Where things are: never part of what a test changed about the training protocol.
PATH_KEYS = frozenset({"data.root", "data.cache_dir", "out_dir", "records_dir", "logger"})


class TrainingSessions(Callback):
    """``[[first step, processes, threads], ...]``: one entry per ``fit`` (a resume adds one), in the checkpoint."""

    def __init__(self) -> None:
        self.sessions: list[list[int]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sessions.append([int(trainer.global_step), int(trainer.world_size), torch.get_num_threads()])

    def state_dict(self) -> dict[str, Any]:
        return {"sessions": self.sessions}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sessions = [list(map(int, s)) for s in state_dict.get("sessions", [])]


def sessions_in_checkpoint(checkpoint: dict[str, Any]) -> list[list[int]]:
    """The :class:`TrainingSessions` of a Lightning checkpoint; [] for a checkpoint written before they existed."""
    states = checkpoint.get("callbacks", {})
    return next(([list(map(int, s)) for s in v.get("sessions", [])] for k, v in states.items()
                 if TrainingSessions.__name__ in k), [])


def data_sha256(datamodule: EpisodicDataModule) -> str:
    """sha256 of the prepared train, val and test splits: names, class and image identities, offsets, image bytes
    (and masks). Independent of where the files were and of the cache: two machines that read the same pixels
    under the same identities get the same digest."""
    digest = hashlib.sha256()
    for role in ROLES:
        if role == "val" and not datamodule.validates:  # val_episodes 0: the split may not exist (Reptile's)
            continue
        split = datamodule.sampler(role).split
        digest.update(repr((role, split.name, split.class_names, split.image_ids)).encode())
        digest.update(np.ascontiguousarray(split.offsets, dtype="<i8").tobytes())
        for tensor in (split.images, split.masks):
            if tensor is not None:
                digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(memoryview(tensor.detach().to("cpu").contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def record_provenance(module: MetaLearner, datamodule: EpisodicDataModule, processes: int,
                      sessions: list[list[int]]) -> dict[str, Any]:
    """The record fields ``execution``, ``data_sha256`` and ``weights_sha256`` of an evaluation of ``module``."""
    return {"execution": {"engine": module.engine, "processes": int(processes), "threads": torch.get_num_threads(),
                          "training": [list(s) for s in sessions]},
            "data_sha256": data_sha256(datamodule), "weights_sha256": state_sha256(module_state(module))}


def protocol_changes(trained: RunConfig | dict[str, Any], tested: RunConfig) -> dict[str, Any]:
    """``{dotted key: trained value}`` where ``tested`` (a ``metabench test`` configuration) differs from the
    training configuration, paths left out; a key the trained configuration lacks counts as its default."""
    before = training_shape(flatten_config(trained if isinstance(trained, dict) else trained.to_dict()))
    defaults = training_shape(flatten_config(RunConfig().to_dict()))
    # training episode shapes compare as training used them (test_run writes them out explicitly)
    return {key: before.get(key, defaults.get(key)) for key, value in training_shape(
            flatten_config(tested.to_dict())).items()
            if key not in PATH_KEYS and before.get(key, defaults.get(key)) != value}
