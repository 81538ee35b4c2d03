"""Transport: collectives over a torch.distributed group (gloo on CPU, NCCL on CUDA).
The quantized all-reduce is ``moe_flashcomm.all_reduce`` (module ``comm.all_reduce``)."""
from .autograd import AllToAllHandle
from .check import ConfigMismatchError
from .frame import PeerError, PeerTimeoutError
from .communicator import Communicator, CommunicatorClosedError, all_to_all
from .gate import SizeGate
from .hierarchical import HierarchyError, create_stage_groups, hierarchical_groups
from .topology import LinkCodecs, Topology

__all__ = ["AllToAllHandle", "Communicator", "CommunicatorClosedError", "ConfigMismatchError", "PeerError",
           "PeerTimeoutError",
           "LinkCodecs", "SizeGate", "Topology", "all_to_all"]
__all__ += ["HierarchyError", "create_stage_groups", "hierarchical_groups"]
