from tuneforge.config.loader import dump_config, load_config
from tuneforge.config.schema import (
    DataConfig,
    EvalConfig,
    FreezeAdapter,
    FullAdapter,
    LoraAdapter,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    TuneForgeConfig,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "FreezeAdapter",
    "FullAdapter",
    "LoraAdapter",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainConfig",
    "TuneForgeConfig",
    "dump_config",
    "load_config",
]
