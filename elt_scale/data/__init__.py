from .loader import Loader, check_data, check_manifest, make_loader
from .order import Order
from .shards import ShardWriter, read_manifest, write_manifest
from .webds import ShardError

__all__ = ["Loader", "Order", "ShardError", "ShardWriter", "check_data", "check_manifest", "make_loader",
           "read_manifest", "write_manifest"]
