"""One typed run configuration: what a member's training run is, in one object.

    RunConfig   every setting of a run: the member, store and run folder, the
                recipe fields it overrides, the training knobs, the device
                and loader settings, and the store's StorageSettings
                (engine/storage.py) with its fsspec options, read cache and
                mining folder.

Filled in three layers, each over the last, as timm's --config and
LightningCLI do: the defaults, then a file (`--config FILE`, JSON or YAML:
RunConfig's fields, or a run folder's config.json), then only the flags the
user actually typed. `--resume` starts from the configuration the run
recorded in RUN/config.json instead of the defaults. train.py and
run_ensemble.py declare the shared flags once (add_arguments).

Credentials never leave the process: `public()` (what config.json holds and
what is printed) redacts the values of credential-like storage options
(engine.storage.is_secret); a resumed run gets them again from its flags or
the environment, as fsspec reads it.

A dataclass rather than pydantic or jsonargparse (both installed): the
recipes are dataclasses validated by their own __post_init__, the flags are
argparse's, and the one thing to add was the layering, a few lines.
Kept free of torch, so that --help answers at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from engine import storage as storages
from engine import store as layout
from engine.device import DEVICES
from engine.recipes import RECIPES, Recipe, get_recipe
from trainers.run_folder import DEFAULT_RUN

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# image sizes the models take: their encoders downsample five times by 2
IMG_SIZE_MULTIPLE = 32


class ConfigError(ValueError):
    """A configuration that cannot work: one line naming the setting."""


# Recipe fields with a flag of their own: (field, type, help). Any other
# field (sampling, view, augment, schedule, ...) is set from a --config file.
RECIPE_FLAGS = (
    ("epochs", int, "epochs (default: the recipe's)"),
    ("img_size", int, f"input size, a multiple of {IMG_SIZE_MULTIPLE} (default: the recipe's)"),
    ("batch_size", int, "batch per process (default: the recipe's)"),
    ("lr", float, "peak learning rate (default: the recipe's)"),
    ("encoder", str, "an smp encoder name (default: the recipe's)"),
    ("grad_clip", float, "clip the gradient norm to this value (default: the recipe's, none)"),
    ("early_stop", int, "stop after this many epochs without a better selection metric "
                        "(default: the recipe's; small_specialist 10, others never)"),
    ("focal_alpha", float, "focal loss alpha (default: the recipe's)"),
    ("focal_gamma", float, "focal loss gamma (default: the recipe's)"),
    ("weight_decay", float, "AdamW weight decay (default: the recipe's)"),
)
RECIPE_FIELDS = tuple(name for name, _, _ in RECIPE_FLAGS)


@dataclasses.dataclass
class RunConfig:
    member: str | None = None
    store: str | Path = layout.DEFAULT_STORE
    out: Path = DEFAULT_RUN
    recipe: dict = dataclasses.field(default_factory=dict)   # fields overriding the member's recipe
    encoder_weights: str = "imagenet"
    seed: int | None = None      # 0, or a resumed run's
    max_steps: int | None = None
    save_every: int = 500
    warmup_steps: int = 0
    grad_accum_steps: int = 1
    precision: str = "auto"
    device: str = "auto"
    workers: int | None = None
    backend: str = "auto"
    memory_format: str = "auto"
    ddp: bool = False
    dist_timeout: float = 60.0   # minutes (trainers/distributed.py's default)
    tensorboard: bool = True
    record_samples: bool = False
    storage: storages.StorageSettings = storages.NO_SETTINGS

    # ------------------------------------------------------------ the recipe

    def resolved_recipe(self) -> Recipe:
        """The member's recipe with this run's overrides, validated as the table's are."""
        return apply_overrides(get_recipe(self.member), self.recipe)

    # ------------------------------------------------------------ to and from JSON

    def public(self) -> dict:
        """JSON values, credentials redacted: what is written and printed."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(store=str(self.store), out=str(self.out), storage=self.storage.public())
        return json.loads(json.dumps(data, default=str))

    def merged(self, data: dict, source: str) -> "RunConfig":
        """A copy with public()'s form (or a hand-written subset of it) set
        over this one; a redacted credential is left out, for the flags or
        the environment to give."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; the settings are "
                              f"{', '.join(sorted(names))}")
        for key in ("recipe", "storage"):
            if not isinstance(data.get(key) or {}, dict):
                raise ConfigError(f"{source}: {key!r} must be a mapping of fields")
        return self.updated({k: v for k, v in data.items() if k != "storage"},
                            storage=data.get("storage"))

    def updated(self, values: dict, storage: dict | None = None) -> "RunConfig":
        """A copy with `values` (field names; "recipe" merged field by field)
        and `storage` (StorageSettings' fields; options merged by name) set."""
        values = dict(values)
        recipe = {**self.recipe, **values.pop("recipe", {})}
        if "store" in values:
            values["store"] = storages.location(str(values["store"]))
        if values.get("out") is not None:
            values["out"] = Path(values["out"])
        settings = self.storage
        if storage:
            options = {**settings.options, **{k: v for k, v in storage.get("options", {}).items()
                                              if v != storages.REDACTED}}
            paths = {k: None if storage[k] is None else Path(storage[k]).absolute()
                     for k in ("cache", "mining_dir", "node_dir") if k in storage}
            settings = dataclasses.replace(settings, options=options, **paths,
                                           **{k: storage[k] for k in ("cache_limit_gb",)
                                              if k in storage})
        return dataclasses.replace(self, **values, recipe=recipe, storage=settings)

    # ------------------------------------------------------------ checks

    def check(self) -> None:
        """Refuse what cannot work, before any worker starts or file is written."""
        if self.member not in RECIPES:
            raise ConfigError(f"member {self.member!r}: choose one of {', '.join(RECIPES)}"
                              if self.member else "--member: which member to train "
                              f"({', '.join(RECIPES)})")
        recipe = self.resolved_recipe()
        at_least = {"epochs": (recipe.epochs, 1), "batch-size": (recipe.batch_size, 1),
                    "img-size": (recipe.img_size, IMG_SIZE_MULTIPLE),
                    "early-stop": (recipe.early_stop, 1), "max-steps": (self.max_steps, 0),
                    "grad-accum-steps": (self.grad_accum_steps, 1),
                    "warmup-steps": (self.warmup_steps, 0), "save-every": (self.save_every, 0),
                    "workers": (self.workers, 0)}
        for flag, (value, least) in at_least.items():
            if value is not None and value < least:
                raise ConfigError(f"--{flag} must be at least {least}, got {value}")
        if recipe.img_size % IMG_SIZE_MULTIPLE:
            raise ConfigError(f"--img-size {recipe.img_size}: must be a multiple of "
                              f"{IMG_SIZE_MULTIPLE} (the encoders halve it five times), e.g. "
                              f"{max(IMG_SIZE_MULTIPLE, recipe.img_size // 32 * 32)}")
        if not recipe.lr >= 0:   # 0 keeps the weights still: a check of the rest of a run
            raise ConfigError(f"--lr must be at least 0, got {recipe.lr}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("--precision fp16: for CUDA only (its gradient scaler); on the "
                              "CPU choose fp32 or bf16")


def apply_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """`recipe` with some fields replaced (sampling and view field by field),
    checked as the recipe table's entries are (their __post_init__)."""
    # (here: checkpoint imports torch; _tuples: JSON's lists as the table's tuples)
    from trainers.checkpoint import _tuples, recipe_from_dict

    base = dataclasses.asdict(recipe)
    unknown = sorted(set(overrides) - set(base) | ({"name"} & set(overrides)))
    if unknown:
        raise ConfigError(f"recipe field {unknown[0]!r}: cannot be set; the fields are "
                          f"{', '.join(k for k in base if k != 'name')}")
    merged = {**base, **overrides}
    for nested in ("sampling", "view"):
        merged[nested] = {**base[nested], **(overrides.get(nested) or {})}
    try:
        return recipe_from_dict(_tuples(merged))
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"recipe of {recipe.name}: {exc}") from None


# ------------------------------------------------------------ files

def read_file(path: Path, member: str | None = None) -> dict:
    """The settings in a --config file: JSON or YAML (by suffix) with
    RunConfig's fields, or a run folder's config.json (the entry of
    `member`, or of its only member)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:   # json's ValueError, yaml's YAMLError
        raise ConfigError(f"--config {path}: not valid {'YAML' if yaml_file else 'JSON'} "
                          f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got "
                          f"{type(data).__name__}")
    if "members" in data:   # a run folder's record
        entries = data["members"]
        name = member or (next(iter(entries)) if len(entries) == 1 else None)
        if name not in entries:
            raise ConfigError(f"--config {path}: a run folder's record of "
                              f"{', '.join(entries)}; name the member with --member")
        data = entries[name]["config"]
    return data


# ------------------------------------------------------------ flags

def add_arguments(parser: argparse.ArgumentParser, *, ensemble: bool = False) -> None:
    """The flags train.py and run_ensemble.py share, every one a RunConfig
    field (storage flags included), with RunConfig's defaults; parse()
    tells the typed ones from the rest."""
    d = RunConfig()
    whose = "each member's" if ensemble else "the recipe's"
    parser.add_argument("--config", type=Path,
                        help="JSON or YAML file of settings (RunConfig's fields, recipe "
                             "overrides under 'recipe'), or a run folder's config.json; the "
                             "flags typed here override it")
    parser.add_argument("--store", type=storages.location, default=d.store, help="the store")
    parser.add_argument("--out", type=Path, default=d.out,
                        help="the run folder: OUT/models, OUT/logs, OUT/config.json; the members "
                             "of one ensemble share it")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a member over in a run folder that already holds a run of it"
                             + (", or whose recorded settings differ" if ensemble else ""))
    for name, kind, text in RECIPE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, dest=name,
                            help=text.replace("the recipe's", whose))
    parser.add_argument("--encoder-weights", default=d.encoder_weights,
                        help="imagenet (downloaded once into the Hugging Face cache), none "
                             "(random, never downloads), or the path of a timm/smp weight file "
                             "for the encoder")
    parser.add_argument("--seed", type=int, help="plan, augmentation, initialisation and "
                        "dropout all follow it (default: 0, or the resumed run's)")
    parser.add_argument("--max-steps", type=int,
                        help="stop after this many optimiser steps in all (resumed runs "
                             "included); validates and writes checkpoints (default and 0: no "
                             "limit)")
    parser.add_argument("--save-every", type=int, default=d.save_every,
                        help="also write <member>_last.pth every this many optimiser steps "
                             "(0: epoch ends only)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help="optimiser steps of linear learning-rate warm-up before the "
                             "recipe's schedule (which runs per optimiser step)")
    parser.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps,
                        help="batches whose gradients add up into one optimiser step")
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                        help="autocast of training and validation; auto: bf16 on CUDA with "
                             "bf16, fp16 (with a gradient scaler) on older CUDA GPUs, fp32 on "
                             "the CPU")
    parser.add_argument("--device", choices=DEVICES, default=d.device,
                        help="auto: CUDA where present")
    parser.add_argument("--workers", type=int, help="loader reader processes per process (default: "
                        "its share of the cores, less one, at most 8; 0 reads in the training "
                        "process)")
    parser.add_argument("--backend", choices=("auto", "dali", "opencv"), default=d.backend,
                        help="where the loader's per-sample work runs: dali (DALI operators + "
                             "Kornia), opencv (OpenCV in the reader processes); auto: dali on "
                             "CUDA, opencv on the CPU")
    parser.add_argument("--memory-format", choices=("auto", "contiguous", "channels_last"),
                        default=d.memory_format,
                        help="layout of activations and input batches; auto: channels_last on "
                             "CUDA, contiguous on the CPU")
    parser.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                        help="minutes a rank waits for the others before the run fails")
    parser.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                        help="write no TensorBoard event files (default: written when "
                             "tensorboard is installed)")
    parser.add_argument("--record-samples", action="store_true",
                        help="write the meta rows each process trained on to "
                             "logs/<member>_samples_rank<R>.npy")
    parser.add_argument("--mining-dir", type=Path, help="keep mining results in this local "
                        "folder instead of the store (for a read-only store; default: in the store)")
    storages.add_arguments(parser)


def parse(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(every flag, only the flags typed): the second parse, with every
    default None (no typed flag parses to None), leaves out what was not on
    the command line, so a default never overrides a file."""
    args = parser.parse_args(argv)
    saved = {name: parser.get_default(name) for name in vars(args)}
    parser.set_defaults(**dict.fromkeys(saved))
    try:
        typed = parser.parse_args(argv)
    finally:
        parser.set_defaults(**saved)
    return args, argparse.Namespace(**{k: v for k, v in vars(typed).items() if v is not None})


STORAGE_FLAGS = {"storage_option": "options", "cache": "cache",
                 "cache_limit_gb": "cache_limit_gb", "mining_dir": "mining_dir", "node_dir": "node_dir"}


def typed_values(typed: argparse.Namespace) -> tuple[dict, dict]:
    """(RunConfig fields, StorageSettings fields) of the typed flags (parse())."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values, storage, recipe = {}, {}, {}
    for name, value in vars(typed).items():
        if name in STORAGE_FLAGS:
            storage[STORAGE_FLAGS[name]] = dict(value) if name == "storage_option" else value
        elif name in RECIPE_FIELDS:
            recipe[name] = value
        elif name in fields:
            values[name] = value
    if recipe:
        values["recipe"] = recipe
    return values, storage


def from_args(typed: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """`base` (the defaults, or a resumed run's record), then --config's
    file, then the typed flags (parse())."""
    config = base or RunConfig()
    if getattr(typed, "config", None) is not None:
        data = read_file(typed.config, getattr(typed, "member", None) or config.member)
        config = config.merged(data, f"--config {typed.config}")
    values, storage = typed_values(typed)
    return config.updated(values, storage=storage)
