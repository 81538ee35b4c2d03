"""Framework integrations. DeepSpeed is imported only inside ``enable_deepspeed``, so the
package imports without it."""
from .deepspeed import TESTED_VERSIONS, disable_deepspeed, enable_deepspeed, exchange_stats
from .stats import ExchangeStats

__all__ = ["ExchangeStats", "TESTED_VERSIONS", "disable_deepspeed", "enable_deepspeed",
           "exchange_stats"]
