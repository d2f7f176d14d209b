from .loader import Loader, ShardError, check_data, check_manifest, make_loader
from .shards import ShardWriter, read_manifest, write_manifest

__all__ = ["Loader", "ShardError", "ShardWriter", "check_data", "check_manifest", "make_loader", "read_manifest",
           "write_manifest"]
