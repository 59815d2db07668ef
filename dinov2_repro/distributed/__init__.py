"""Process-group setup and rank-aware helpers shared by training, distillation and eval."""
from .env import (
    DistributedEnv,
    barrier,
    choose_backend,
    detect_env,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    parse_nodelist,
    setup_rank_logging,
    shutdown_distributed,
)

__all__ = [
    "DistributedEnv",
    "barrier",
    "choose_backend",
    "detect_env",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "parse_nodelist",
    "setup_rank_logging",
    "shutdown_distributed",
]
