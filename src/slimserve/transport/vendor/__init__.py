"""Python modules generated from the *.proto files beside them by scripts/gen_proto.sh; do not
edit them (README.md: what these files are).

Their messages live in `POOL`, slimserve's own descriptor pool, not protobuf's default one:
the files declare package `inference` exactly as Triton's do, and tritonclient.grpc registers
its copies in the default pool, so both can be imported in one process.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
