"""Every config field the trainer reads, with its default, and the checks run before compiling.

Config files in `configs/` start from `base_config()` and change values; a field that is not
here is a typo, and `validate` names it before anything runs. `sections` builds the config,
`methods` holds each objective's section, `checks` the checks and the saved config's loading.
"""

from clipjax.config.checks import (
    DTYPES,
    RESUME_STEERING,
    RESUME_WARNED,
    _check_workdir,
    check_resume,
    config_file_error,
    load_saved,
    override_error,
    resume_changes,
    unknown_field_error,
    validate,
)
from clipjax.config.sections import (
    apply_local,
    base_config,
    clip_benchmark_recipe,
    eval_entry,
    eval_settings,
)
from clipjax.errors import ConfigError

__all__ = [
    "DTYPES",
    "RESUME_STEERING",
    "RESUME_WARNED",
    "ConfigError",
    "_check_workdir",
    "apply_local",
    "clip_benchmark_recipe",
    "base_config",
    "check_resume",
    "config_file_error",
    "eval_entry",
    "eval_settings",
    "load_saved",
    "override_error",
    "resume_changes",
    "unknown_field_error",
    "validate",
]
