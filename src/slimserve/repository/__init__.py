"""The on-disk model repository: model.yaml schema, versions, variants, manifests."""

from slimserve.repository.manifest import hash_tree, verify_manifest, write_manifest
from slimserve.repository.schema import BatchingConfig, ModelConfig, VariantInfo, load_model_config
from slimserve.repository.store import Repository, check_name

__all__ = [
    "BatchingConfig",
    "ModelConfig",
    "Repository",
    "VariantInfo",
    "check_name",
    "hash_tree",
    "load_model_config",
    "verify_manifest",
    "write_manifest",
]
