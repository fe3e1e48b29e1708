"""Training data: prealigned shard reader, resumable distributed sampler, dynamic-padding collate, loader.

The shard format itself (manifest, fingerprints, checksums) lives in ``dskd_scale.data.format`` (import it directly);
the offline prealignment that writes the shards is the ``dskd_scale.prealign`` package, which this one never imports.
"""

from dskd_scale.data.collate import Collator, pad_right
from dskd_scale.data.dataset import DataError, PrealignedDataset
from dskd_scale.data.loader import TrainLoader, build_train_loader, pad_id_from_manifest
from dskd_scale.data.sampler import ResumableDistributedSampler

__all__ = [
    "Collator",
    "DataError",
    "PrealignedDataset",
    "ResumableDistributedSampler",
    "TrainLoader",
    "build_train_loader",
    "pad_id_from_manifest",
    "pad_right",
]
