"""Every configuration of lofit-ray: typed dataclasses, one YAML + `--set` loader, checked on load.

One set of defaults. The YAML sections of a job are the same dataclasses the components take (`phase1:` is a
`Phase1Config`, handed to `selectors.select_heads` as is), so a value keeps its name and type from the file to
the code that uses it. Each field's help text is its `metadata["help"]`; the CLI builds its flags from it.
Every error names the dotted field and the fix; unknown keys are errors too, so a typo never silently falls
back to a default.

    fields.py         ConfigError, field help text, range checks
    sections.py       what every job shares: training, phase 1 / phase 2, LoRA, ReFT, ITI, the task, MLflow
    search_job.py     the search job: the search policy, searched spaces, Ray resources, DeepSpeed
    reproduce_job.py  the reproduce job and the study: models x tasks x methods, per-method spaces, seeds
    loading.py        the YAML + `--set` loader (also finds shipped configs by name)
"""
from .fields import ConfigError
from .loading import build, coerce, config_file, from_dict, load_config, parse_set, shipped_configs, to_dict
from .reproduce_job import (PAPER_METHODS, REPRODUCE_METHODS, REPRODUCE_TASKS, GatesSpace, ItiSpace, LofitSpace,
                        LoraSpace, MethodSpaces, OffsetSpace, ReftSpace, ReproduceConfig, ReproduceMLflowConfig,
                        ReproduceSearchConfig)
from .search_job import (DeepSpeedConfig, ScalingConfig, SearchConfig, SearchJobConfig, SearchPolicy, SearchSpaceConfig,
                     Space)
from .sections import (SELECTION_METRICS, SELECTORS, ItiConfig, LoraConfig, MLflowConfig, Phase1Config, Phase2Config,
                       ReftConfig, TaskConfig, TrainingConfig)

__all__ = [
    "ConfigError", "build", "coerce", "config_file", "from_dict", "load_config", "parse_set", "shipped_configs",
    "to_dict", "PAPER_METHODS", "REPRODUCE_METHODS", "REPRODUCE_TASKS", "GatesSpace", "ItiSpace", "LofitSpace",
    "LoraSpace", "MethodSpaces", "OffsetSpace", "ReftSpace", "ReproduceConfig", "ReproduceMLflowConfig",
    "ReproduceSearchConfig", "DeepSpeedConfig", "ScalingConfig", "SearchConfig", "SearchJobConfig", "SearchPolicy",
    "SearchSpaceConfig", "Space", "SELECTION_METRICS", "SELECTORS", "ItiConfig", "LoraConfig", "MLflowConfig",
    "Phase1Config", "Phase2Config", "ReftConfig", "TaskConfig", "TrainingConfig",
]
