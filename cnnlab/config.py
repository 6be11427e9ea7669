"""The validated run configuration.

Hydra composes the YAML groups in conf/; `validate` merges each group into the structured
schema (a dataclass) registered for its `name`, so unknown keys and wrong types fail with the
key's full name, and then runs each schema's range checks. All of it happens before any data
is loaded or any model trained.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from cnnlab import losses, models, optim, usercode
from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.data import DatasetConfig
from cnnlab.data import schema_for as dataset_schema
from cnnlab.data.augment import AugmentationConfig
from cnnlab.report.sweep import ReportConfig
from cnnlab.rundir import register_resolvers
from cnnlab.trackers import LoggerConfig

register_resolvers()  # conf/config.yaml's hydra.run.dir uses cnnlab.unique_dir

DEVICES = ("auto", "cpu", "cuda", "mps")


def config_dir() -> str:
    """conf/ ships inside the installed package; in a source checkout it sits beside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"cnnlab's config tree (conf/config.yaml) is missing next to {here}; reinstall cnnlab")


def model_defaults(name: str) -> models.ModelConfig:
    """A model's config as a run gets it: conf/model/<name>.yaml, else its schema's defaults."""
    path = Path(config_dir()) / "model" / f"{name}.yaml"
    return typed_group("model", OmegaConf.load(path) if path.is_file() else {"name": name})
PRECISIONS = ("fp32", "bf16")
CHECKPOINT_POLICIES = ("best_and_last", "last", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainerConfig:
    epochs: int = 5
    batch_size: int = 64
    eval_batch_size: int = 1024
    device: str = "auto"
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    num_threads: Optional[int] = None
    progress: bool = True
    resume: Optional[str] = None
    grad_clip: Optional[float] = None
    deterministic: bool = False
    doctor_every: int = 5
    stop_when_stuck: bool = False
    test_every_epoch: bool = False  # score the test set after every epoch too (test_loss/test_acc columns)
    checkpoints: str = "best_and_last"  # what stays on disk: best_and_last|last|none

    def validate(self, prefix: str = "trainer") -> None:
        check_range(f"{prefix}.epochs", self.epochs, 1)
        check_range(f"{prefix}.batch_size", self.batch_size, 1)
        check_range(f"{prefix}.eval_batch_size", self.eval_batch_size, 1)
        check_choice(f"{prefix}.device", self.device, DEVICES)
        check_range(f"{prefix}.seed", self.seed, 0)
        check_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        check_choice(f"{prefix}.compile_mode", self.compile_mode, COMPILE_MODES)
        if self.num_threads is not None:
            check_range(f"{prefix}.num_threads", self.num_threads, 1)
        if self.grad_clip is not None:
            check_range(f"{prefix}.grad_clip", self.grad_clip, 0, low_inclusive=False)
        check_range(f"{prefix}.doctor_every", self.doctor_every, 0)
        check_choice(f"{prefix}.checkpoints", self.checkpoints, CHECKPOINT_POLICIES)


CURVES = ("accuracy", "error")


@dataclass
class VizConfig:
    curves: str = "accuracy"  # accuracy|error (1 - accuracy) in curves.png
    feature_maps: bool = False
    num_images: int = 8
    layer: Optional[str] = None
    channels: int = 15

    def validate(self, prefix: str = "viz") -> None:
        check_choice(f"{prefix}.curves", self.curves, CURVES)
        check_range(f"{prefix}.num_images", self.num_images, 1)
        check_range(f"{prefix}.channels", self.channels, 1)


@dataclass
class RunConfig:
    model: models.ModelConfig
    dataset: DatasetConfig
    optimizer: optim.OptimizerConfig
    scheduler: optim.SchedulerConfig
    loss: losses.LossConfig
    augmentation: AugmentationConfig
    trainer: TrainerConfig
    viz: VizConfig
    report: ReportConfig
    logger: LoggerConfig = dataclasses.field(default_factory=LoggerConfig)  # experiment trackers; none by default
    imports: list[str] = dataclasses.field(default_factory=list)  # the user's modules, imported first
    name: Optional[str] = None  # names the run's directory instead of a timestamp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# group -> (name -> schema); trainer, viz, report and logger have a single schema
SCHEMAS: dict[str, Callable[[str], type]] = {
    "model": models.schema_for,
    "dataset": dataset_schema,
    "optimizer": optim.optimizer_schema,
    "scheduler": optim.scheduler_schema,
    "loss": losses.loss_schema,
    "augmentation": lambda name: AugmentationConfig,
    "trainer": lambda name: TrainerConfig,
    "viz": lambda name: VizConfig,
    "report": lambda name: ReportConfig,
    "logger": lambda name: LoggerConfig,
}
# groups a config may lack: configs saved before trackers existed, and `logger=[]`, mean no tracker
OPTIONAL_GROUPS = ("logger",)


def typed_group(group: str, node: Any) -> Any:
    """Merge one group's node (a DictConfig or dict) into the schema of its `name` and validate it.

    OmegaConf's type and unknown-key errors become ConfigErrors naming the full key.
    """
    schema = SCHEMAS[group](node.get("name"))  # trainer, viz, report and logger have no name
    node = _gather_extra_keys(schema, node)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as err:
        key = f"{group}.{err.full_key}" if err.full_key else group
        reason = str(err).splitlines()[0]
        # a nested schema (logger.mlflow) lists its own keys, not the group's
        owner = err.object_type if dataclasses.is_dataclass(err.object_type) and "." in str(err.full_key) else schema
        fields = {f.name: f for f in dataclasses.fields(owner)}
        field = fields.get(str(err.full_key).rsplit(".", 1)[-1]) if err.full_key else None
        if field is not None and not isinstance(err, (ConfigKeyError, ConfigAttributeError)):  # a known key's value
            raise ConfigError(f"{key}: {reason}; {key} takes a value of type {field.type}") from None
        where = key.rsplit(".", 1)[0] if owner is not schema else f"{group} '{getattr(node, 'name', group)}'"
        raise ConfigError(f"{key}: {reason}. Valid keys of {where}: {', '.join(fields)}") from None
    obj.validate(group)
    return obj


def _gather_extra_keys(schema: type, node: Any) -> Any:
    """A schema with EXTRA_KEYS (model=custom, dataset=custom) takes keys it does not define, added with
    `+model.<key>=...`, into that dict field: they are the arguments of the user's own code."""
    extra = getattr(schema, "EXTRA_KEYS", None)
    if not extra:
        return node
    plain = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else dict(node)
    known = {f.name for f in dataclasses.fields(schema)}
    gathered = dict(plain.get(extra) or {})
    gathered.update({k: v for k, v in plain.items() if k not in known})
    return {**{k: v for k, v in plain.items() if k in known}, extra: gathered}


def check_name(name: Any) -> str | None:
    """name=...: a directory name that works everywhere (and in Hydra's override grammar)."""
    if name is None:
        return None
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", name):
        raise ConfigError(f"name={name!r} cannot name a directory; use up to 80 letters, digits, '.', '_' and '-', "
                          f"starting with a letter or digit, e.g. name=lenet_sigmoid_lr0.1")
    return name


def import_user_modules(cfg: DictConfig) -> list[str]:
    """`imports: [mymodels]`: modules imported before the config is checked, so the models and datasets
    they register (@cnnlab.register_model) are known here, in every sweep worker, and in evaluate."""
    names = cfg.get("imports") or []
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"imports={names!r} must be a list of module names, e.g. 'imports=[mymodels]'")
    for name in names:
        usercode.import_module(name, f"imports={list(names)}")
    return list(names)


def offer_registered_models(argv: list[str]) -> None:
    """Before Hydra composes: the modules an `imports=[...]` override names are imported, and every model
    registered in Python (@cnnlab.register_model, entry points) becomes a `model=<name>` option, with its
    schema's defaults as its config in Hydra's ConfigStore (a YAML of that name, shipped or in the user's
    --config-dir, comes first)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for text in argv:
        if text.lstrip("+").startswith("imports="):
            try:
                value = OverridesParser.create().parse_override(text).value()
            except HydraException:
                continue  # not parseable: the command-line check reports it
            import_user_modules(OmegaConf.create({"imports": value if isinstance(value, list) else [value]}))
    shipped = {p.stem for p in (Path(config_dir()) / "model").glob("*.yaml")}
    for name in models.available():
        if name not in shipped:
            node = OmegaConf.to_container(OmegaConf.structured(models.schema_for(name)))
            ConfigStore.instance().store(group="model", name=name, node=node)


def validate(cfg: DictConfig) -> RunConfig:
    """Check every group of a composed config and return it as typed dataclasses."""
    unknown = sorted(set(cfg.keys()) - set(SCHEMAS) - {"imports", "name"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; valid: {', '.join(SCHEMAS)}, imports, name")
    name = check_name(cfg.get("name"))
    imports = import_user_modules(cfg)
    missing = [g for g in SCHEMAS if g not in cfg and g not in OPTIONAL_GROUPS]
    if missing:
        raise ConfigError(f"config group(s) {', '.join(missing)} missing; select one, e.g. {missing[0]}=...")
    run = RunConfig(**{group: typed_group(group, cfg[group] if group in cfg else {}) for group in SCHEMAS},
                    imports=imports, name=name)
    _check_finite(run.to_dict(), "")
    if run.scheduler.warmup_epochs >= run.trainer.epochs:
        raise ConfigError(
            f"scheduler.warmup_epochs={run.scheduler.warmup_epochs} must be shorter than trainer.epochs={run.trainer.epochs}"
        )
    return run


def _check_finite(node: Any, key: str) -> None:
    """nan and inf pass every range check (a comparison with nan is false): refuse them in any key."""
    if isinstance(node, dict):
        for name, value in node.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_finite(value, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}={node} is not a finite number; give {key} a finite value")
