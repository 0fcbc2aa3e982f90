"""Phase I of DP-RandP: contrastive pretraining of a prior on random-process images.

Public API: :class:`PretrainConfig` / :func:`preset`, :func:`pretrain`, the image sources
(:func:`open_store`, :func:`process_source`), and the prior file helpers used by Phases II/III:
:func:`load_prior` and :func:`apply_prior`.
"""

from dprandp.pretrain.checkpoint import apply_prior, load_prior
from dprandp.pretrain.config import PRESETS, PretrainConfig, preset
from dprandp.pretrain.data import ArrayStore, open_store, process_source
from dprandp.pretrain.loss import align_uniform_loss, info_nce_loss
from dprandp.pretrain.trainer import ContrastiveModel, PretrainResult, check_prior_out, pretrain
from dprandp.pretrain.views import ViewConfig, two_views

__all__ = [
    "PRESETS", "ArrayStore", "ContrastiveModel", "PretrainConfig", "PretrainResult", "ViewConfig",
    "align_uniform_loss", "apply_prior", "check_prior_out", "info_nce_loss", "load_prior", "open_store", "preset",
    "pretrain", "process_source", "two_views",
]
