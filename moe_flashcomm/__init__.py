"""moe-flashcomm: low-bit (2-8 bit, fp8) all-to-all and all-reduce for MoE expert parallelism."""
from .codec import CodecConfig, decode, encode, record_bytes, record_layout
from .comm import AllToAllHandle, Communicator, LinkCodecs, SizeGate, Topology, all_to_all
from .comm.all_reduce import all_reduce
from .config import FlashCommConfig
from .integrations import disable_deepspeed, enable_deepspeed
from .integrations.allreduce import disable_all_reduce, enable_all_reduce

__version__ = "0.1.0"

__all__ = ["CodecConfig", "decode", "encode", "record_bytes", "record_layout"]
__all__ += ["AllToAllHandle", "Communicator", "LinkCodecs", "SizeGate", "Topology", "all_reduce", "all_to_all"]
__all__ += ["FlashCommConfig", "disable_deepspeed", "enable_deepspeed"]
__all__ += ["disable_all_reduce", "enable_all_reduce"]
