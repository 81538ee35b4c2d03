"""Framework integrations. DeepSpeed is imported only inside ``enable_deepspeed``, so the
package imports without it."""
from .deepspeed import TESTED_VERSIONS, disable_deepspeed, enable_deepspeed, exchange_stats
from .allreduce import AllReduceStats, all_reduce_stats
from .stats import ExchangeStats

__all__ = ["AllReduceStats", "ExchangeStats", "TESTED_VERSIONS", "all_reduce_stats",
           "disable_deepspeed", "enable_deepspeed", "exchange_stats"]
