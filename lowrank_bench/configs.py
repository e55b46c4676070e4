"""Where the configs live, one group's config composed by Hydra on its own (a sequence's stage tasks: their
defaults lists apply, as they do for `task=...` on the command line), and the command line's overrides checked
against the configs before Hydra runs them (CommandLine: a typo, an unknown option, a stage that does not exist,
malformed syntax, in every job of a sweep: one line, exit 2, before anything is made)."""
from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lowrank_bench.errors import LrbenchError, closest, did_you_mean
from lowrank_bench.extras import launcher_hint

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
TASK_CONF = Path(CONF_DIR) / "task"


def available_tasks() -> list[str]:
    """Every single task config (`task=<name>`), sequences left out."""
    return sorted(p.relative_to(TASK_CONF).with_suffix("").as_posix() for p in TASK_CONF.rglob("*.yaml")
                  if p.parent.name != "continual" and not p.name.startswith("_"))


def task_config(name: str) -> DictConfig:
    """lowrank_bench/conf/task/<name>.yaml as `task=<name>` composes it, detached from the root (plain, not struct)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra job (or a test's compose): its search path
        composed = compose(config_name="config", overrides=[f"task={name}"])
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose(config_name="config", overrides=[f"task={name}"])
    return OmegaConf.create(OmegaConf.to_container(composed.task, resolve=False))


# -- sweep job folders and the help page (the resolvers of lowrank_bench/conf/config.yaml and lowrank_bench/conf/hydra/help/lrbench.yaml) -----
#: at most this many characters of a sweep job's folder name follow its number
FOLDER_CHARS = 80
#: the Hydra setting whose keys a sweep job's folder name leaves out
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def job_folder(num, overrides) -> str:
    """A sweep job's folder name: its number, then what it varies (Hydra's override_dirname: `0_method=lora,seed=0`).
    `/` becomes `-` (task=glue/sst2 names one folder, not two), any character but letters, digits and `_.,=+-`
    becomes `_`, and at most FOLDER_CHARS follow the number (which keeps the names apart)."""
    import re

    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", str(overrides or "").replace("/", "-"))[:FOLDER_CHARS]
    return f"{num}_{name}" if name else str(num)


def sweep_folder_override(overrides: list[str]) -> str | None:
    """The override that names a sweep's job folders by what differs: lowrank_bench/conf/config.yaml's exclude_keys (where and how
    a job reports) plus every key the command line gives one value (each job has it alike). None when the command
    line sets exclude_keys itself."""
    import json

    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(line.lstrip("+~").startswith(EXCLUDE_KEYS) for line in overrides):
        return None
    parsed = OverridesParser.create().parse_overrides(overrides)
    alike = {o.key_or_group for o in parsed if not o.is_sweep_override() and not o.is_hydra_override()}
    node = yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text())
    for key in EXCLUDE_KEYS.split("."):
        node = (node or {}).get(key)
    keys = sorted(set(node or []) | alike)
    return f"{EXCLUDE_KEYS}=[{','.join(json.dumps(k) for k in keys)}]"


def run_groups() -> list[str]:
    """The config groups a run composes: lowrank_bench/conf/config.yaml's defaults, in that order."""
    import yaml

    defaults = yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text()).get("defaults", [])
    return [g for entry in defaults if isinstance(entry, dict) for g in entry if " " not in g]


def help_groups(width: int = 116) -> str:
    """The config groups a run composes, one line per folder, written as an override writes them
    (`task=glue/  cola mnli ...`); shared bases (names starting with `_`) left out."""
    import textwrap

    lines = []
    for group in run_groups():
        for folder in sorted({p.parent for p in (Path(CONF_DIR) / group).rglob("*.yaml")}):
            options = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
            if not options:
                continue
            nested = folder.relative_to(CONF_DIR).as_posix()
            prefix = f"{group}={nested[len(group) + 1:]}/" if "/" in nested else f"{group}="
            lines += textwrap.wrap(" ".join(options), width, initial_indent=f"  {prefix:<22}",
                                   subsequent_indent=" " * 24, break_on_hyphens=False)
    return "\n".join(lines)


def completions(word: str) -> list[str] | None:
    """Tab completion of `group=partial` for every option of a config group, nested ones included
    (`task=glue/s` -> task=glue/sst2 task=glue/stsb); None where the word is not a group's (Hydra completes it)."""
    key, equals, partial = word.partition("=")
    group = key.lstrip("+~")
    if not equals or group not in run_groups():
        return None
    folder = Path(CONF_DIR) / group
    options = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")
                     if not any(part.startswith("_") for part in p.relative_to(folder).parts))
    return [f"{key}={option}" for option in options if option.startswith(partial)]


def register_resolvers() -> None:
    """`${lrbench_job_folder:num,overrides}` (hydra.sweep.subdir) and `${lrbench_config_groups:}` (the help page)."""
    for name, function in (("lrbench_job_folder", job_folder), ("lrbench_config_groups", help_groups)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


register_resolvers()


# -- the command line's overrides, checked before Hydra runs them ------------------------------------------------
#: settings whose keys are names, not settings (a Hugging Face config's fields, a PEFT config's, a sequence's
#: protocols and stand-alone accuracies): anything may be added under them
FREE_FORM = ("model.config", "model.config_overrides", "model.architecture", "method.config", "task.protocols",
             "task.standalone_accuracy")
#: settings the code reads that no YAML spells out (curriculum/sequence.py: read_standalone)
READ_BUT_UNSET = ("task.standalone_accuracy",)
STAGES, EVERY_STAGE = "task.stages", "task.every_stage"


def package_of(path: Path) -> str:
    """The package a config file lands in: its `# @package` line, else its group (lowrank_bench/conf/method/x.yaml: method)."""
    import re

    header = re.search(r"^#\s*@package\s+(\S+)", path.read_text(), re.MULTILINE)
    package = header.group(1) if header else ".".join(path.relative_to(CONF_DIR).parts[:-1])
    return "" if package == "_global_" else package


def flat_keys(node, prefix: str = "") -> list[str]:
    """`a`, `a.b`, `a.b.c`, ... of a nested mapping."""
    keys = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            keys += [path, *flat_keys(value, path)]
    return keys


def known_settings() -> frozenset[str]:
    """Every setting some config of conf/ defines, as `group.key` (a sequence's stage names as `*`: any stage may
    take any stage setting), plus READ_BUT_UNSET. `+key=value` adds one of these or nothing (Hydra's own settings,
    `hydra.*`, and lowrank_bench/conf/reproduce/ are not among them)."""
    return schema()[0]


@functools.cache
def schema() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(every setting, a single task's settings (what a stage may set), the groups a run may go without: those
    whose entry in lowrank_bench/conf/config.yaml's defaults is null (eval, experiment))."""
    import yaml

    keys, task_keys = set(READ_BUT_UNSET), set()
    for path in sorted(Path(CONF_DIR).rglob("*.yaml")):
        folders = path.relative_to(CONF_DIR).parts[:-1]
        if folders[:1] in (("hydra",), ("reproduce",)):
            continue
        data = yaml.safe_load(path.read_text()) or {}
        data.pop("defaults", None)
        package = package_of(path)
        keys.update(star_stage(key) for key in flat_keys(data, package))
        if package == "task" and folders[:2] != ("task", "continual"):
            task_keys.update(data)
    defaults = yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text()).get("defaults", [])
    optional = {group for entry in defaults if isinstance(entry, dict) for group, choice in entry.items()
                if choice is None}
    return frozenset(keys), frozenset(task_keys), frozenset(optional)


def star_stage(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2] + ["*"] + parts[3:]) if key.startswith(STAGES + ".") else key


def stage_settings(extra=()) -> set[str]:
    """What a stage (`task.stages.<stage>.<key>`, `task.every_stage.<key>`) may set: any task setting (it goes into
    the stage's task config), whatever a sequence's stages and protocols set, and `extra` (the stage's budget and
    optimiser keys: curriculum/sequence.py)."""
    known, task_keys, _ = schema()
    keys = set(extra) | task_keys
    keys.update(k.split(".")[3] for k in known if k.startswith(STAGES + ".*.") and k.count(".") == 3)
    keys.update(k.split(".")[2] for k in known if k.startswith(EVERY_STAGE + ".") and k.count(".") == 2)
    keys.update(k.split(".")[4] for k in known if k.startswith("task.protocols.") and k.count(".") == 4)
    return keys - {"*"}


def group_options(loader, group: str) -> list[str]:
    """The options of a config group, nested ones with their folder (task: ..., glue/sst2, ..., toy/sentiment)."""
    options = list(loader.get_group_options(group))
    for sub in loader.list_groups(group):
        options += [f"{sub}/{option}" for option in group_options(loader, f"{group}/{sub}")]
    return sorted(options)


def one_line(text: str) -> str:
    """A Hydra or OmegaConf message on one line, without its advice on stack traces and search paths."""
    lines = []
    for line in str(text).splitlines():
        if line.strip().startswith(("Set the environment variable HYDRA_FULL_ERROR", "See https://")):
            continue
        if line.strip().startswith(("Config search path", "Search path")):
            break
        lines.append(line.strip())
    return " ".join(line for line in lines if line)


_ABSENT = object()


def has(cfg, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT


def under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class CommandLine:
    """The overrides of one `lrbench` command, checked against the configs before Hydra composes and runs them
    (train.main): malformed syntax, an unknown option of a config group (nested ones listed: task=glue/sst2), a
    setting that no config has (`method.rr=8`, `+trainer.max_step=2`: the closest real one named), `+` on a
    setting already set, a stage that is not in the sequence, `~` on a setting the run reads. In a `-m` sweep every
    value of every swept key is checked (each once, the other swept keys at their first value), so a bad value
    refuses the whole sweep before any job runs. Each refusal is an LrbenchError of one line."""

    def __init__(self, overrides: list[str], multirun: bool = False, stage_keys=(), valid=lambda key: None):
        self.overrides, self.multirun = list(overrides), multirun
        self._stage_extra = stage_keys  # (or a function returning them: called only if a stage is set)
        self.valid = valid  # key -> what is valid (validate.py), for the message of `~key`
        self._before: dict[tuple, DictConfig] = {}
        self._options: dict[str, list[str]] = {}

    @functools.cached_property
    def stage_keys(self) -> set[str]:
        extra = self._stage_extra() if callable(self._stage_extra) else self._stage_extra
        return stage_settings(extra)

    def check(self) -> None:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        GlobalHydra.instance().clear()  # (a run earlier in this process leaves Hydra initialised)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            self.loader = GlobalHydra.instance().config_loader()
            self.parser = OverridesParser.create(config_loader=self.loader)
            parsed = [self.parse(line) for line in self.overrides]
            for override in parsed:
                self.check_choices(override)
            if self.multirun and any(o.is_sweep_override() for o in parsed):
                self.check_sweep_config(parsed)
            for variant in self.variants(parsed):
                self.check_variant(variant)

    # -- syntax, sweeps and choices ------------------------------------------------------------------------------
    def parse(self, line: str):
        from hydra.errors import HydraException

        reason = "no '='" if "=" not in line and not line.startswith("~") else ""
        if not reason:
            try:
                override = self.parser.parse_overrides([line])[0]  # (the plural sets the loader: glob sweeps)
            except HydraException as err:
                reason = one_line("\n".join(x for x in str(err).splitlines() if not x.startswith("Error parsing")))
            else:
                if override.key_or_group:
                    return override
                reason = "no key"
        raise LrbenchError(f"malformed override {line!r} ({reason}); write key=value, +key=value (a setting the "
                           "config does not set), ~key, or group=option (key=a,b,c sweeps, with -m)")

    def is_group(self, override) -> bool:
        return self.loader.repository.group_exists(override.key_or_group) and not isinstance(override.value(), dict)

    def values(self, override) -> list[str] | None:
        """The values of a sweep (None: one Hydra's sweeper enumerates itself, left to it)."""
        if not override.is_discrete_sweep():
            return None
        return list(override.sweep_string_iterator())

    def check_choices(self, override) -> None:
        """Every option a group override names (each value of a sweep) exists."""
        line = override.input_line
        if override.is_sweep_override():
            if not self.multirun:
                raise LrbenchError(f"{line}: several values make a sweep, which runs with -m (--multirun); one run "
                                   f"takes one value (a list: {override.key_or_group}=[a,b]; a string with commas: "
                                   f"{override.key_or_group}='a,b')")
            if override.is_hydra_override():
                raise LrbenchError(f"{line}: Hydra's own settings cannot be swept; give one value")
        if not self.is_group(override):
            return
        group = override.key_or_group
        if group not in self._options:
            self._options[group] = group_options(self.loader, group)
        options = self._options[group]
        shown = [o for o in options if not o.split("/")[-1].startswith("_")]
        needed = group not in schema()[2] and not override.is_hydra_override()
        if override.is_delete():
            if needed:
                raise LrbenchError(f"{line}: every run needs a {group}; valid: {', '.join(shown)}")
            return
        values = self.values(override) if override.is_sweep_override() else [override.value()]
        for value in values or []:
            if value in (None, "null"):
                raise LrbenchError(f"{group}=null: every run needs a {group}; valid: {', '.join(shown)}" if needed
                                   else f"{group}=null: a config group takes no null; to run without {group}, write "
                                   f"~{group}")
            if value in options:
                continue
            where = f" (in the sweep {line})" if override.is_sweep_override() else ""
            raise LrbenchError(f"{group}={value}{where}: no such {group}{did_you_mean(str(value), shown)}; valid: "
                               f"{', '.join(shown)}")

    def variants(self, parsed) -> list[list[str]]:
        """Each value of each sweep once: the first values together, then every other value of one sweep with the
        other sweeps at their first (not the product: a bad value is a bad value in every job it is in)."""
        lines = []
        for override in parsed:
            values = self.values(override) if override.is_sweep_override() else None
            if override.is_sweep_override() and values is None:
                lines.append([])  # (an interval: the sweeper's; nothing to check here)
            elif values is not None:
                lines.append([f"{override.get_key_element()}={value}" for value in values])
            else:
                lines.append([override.input_line])
        first = [options[0] for options in lines if options]
        variants = [first]
        for index, options in enumerate(lines):
            for option in options[1:]:
                variant = [o[0] for o in lines[:index] if o] + [option] + [o[0] for o in lines[index + 1:] if o]
                variants.append(variant)
        return variants

    def check_sweep_config(self, parsed) -> None:
        """Before any job, Hydra composes the sweep's own config: the overrides that are not swept, with each swept
        group at its default (so `-m method=bidora,dora method.orientation=row` fails there, on the default LoRA)."""
        try:
            self.check_variant([o.input_line for o in parsed if not o.is_sweep_override()])
        except LrbenchError as err:
            raise LrbenchError(f"{err} (in a -m sweep Hydra first composes the config with each swept group at its "
                               "default; a setting that only swept options have is given with ++key=value)") from None

    # -- one job's overrides --------------------------------------------------------------------------------------
    def compose_groups(self, group_lines: tuple[str, ...]) -> DictConfig:
        """The config as its defaults compose it with these group choices: before any setting is overridden."""
        from hydra import compose
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if group_lines not in self._before:
            try:
                self._before[group_lines] = compose(config_name="config", overrides=list(group_lines),
                                                    return_hydra_config=True)
            except (HydraException, OmegaConfBaseException, ValueError) as err:
                raise LrbenchError(f"{' '.join(group_lines)}: {one_line(err)}{launcher_hint(str(err))}") from None
        return self._before[group_lines]

    def check_variant(self, lines: list[str]) -> None:
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        parsed = [self.parse(line) for line in lines]
        groups = tuple(o.input_line for o in parsed if self.is_group(o))
        settings = [o for o in parsed if not self.is_group(o)]
        before = self.compose_groups(groups)
        for override in settings:
            self.check_setting(override, before)
        cfg = copy.deepcopy(before)
        for override in settings:
            try:
                ConfigLoaderImpl._apply_overrides_to_config([override], cfg)
            except (HydraException, OmegaConfBaseException) as err:
                cause = f" ({one_line(err.__cause__)})" if err.__cause__ else ""
                raise LrbenchError(f"{override.input_line}: {one_line(err)}{cause}") from None
        self.check_new_stages(settings, before, cfg)

    def check_setting(self, override, before: DictConfig) -> None:
        key, line = override.key_or_group, override.input_line
        if override.is_hydra_override():  # Hydra's own settings: a complete schema of their own
            if not has(before, key) and not (override.is_add() or override.is_force_add()):
                raise self.unknown(key, before)
            return
        exists, value = has(before, key), override.value()
        plain = not (override.is_add() or override.is_force_add())
        if override.is_delete():
            if under(key, FREE_FORM) or self.stage_of(key) and key.count(".") == 2:
                return
            if not exists:
                raise self.unknown(key, before)
            valid = self.valid(key)
            raise LrbenchError(f"{line} removes a setting the run reads; set it instead: "
                               + (f"{key} must be {valid}" if valid else f"{key}=<value>"))
        if exists:
            current = OmegaConf.select(before, key, throw_on_resolution_failure=False)
            if isinstance(current, DictConfig) and value is not None and not isinstance(value, dict):
                inner = ", ".join(str(k) for k in list(current)[:8]) + (", ..." if len(current) > 8 else "")
                raise LrbenchError(f"{line}: {key} holds settings ({inner}), not one value; set one of them: "
                                   f"{key}.<setting>=value")
            if override.is_add() and current is not None and not isinstance(value, (dict, list)):
                raise LrbenchError(f"{line}: {key} is already a setting (={current}); write "
                                   f"{line.lstrip('+')} without the +")
            for sub in flat_keys(value if isinstance(value, dict) else {}, key):
                if not has(before, sub):
                    self.check_new(sub, before, plain, line, defining=key)
            return
        self.check_new(key, before, plain, line)
        for sub in flat_keys(value if isinstance(value, dict) else {}, key):
            self.check_new(sub, before, False, line, defining=key)

    def stage_of(self, key: str) -> str | None:
        return key.split(".")[2] if key.startswith(STAGES + ".") else None

    def check_new(self, key: str, before: DictConfig, plain: bool, line: str, defining: str = "") -> None:
        """A setting the composed config does not have: one that some config or a sequence's stage defines (added
        with +), or an error naming the closest real one. `defining`: the override's own key, when `key` is inside
        the mapping it gives (+task.stages.cola={task: glue/cola}: a new stage)."""
        top = key.split(".")[0]
        if under(key, FREE_FORM):
            pass
        elif self.stage_of(key) is not None or key == STAGES:
            self.check_stage_setting(key, before, line, defining)
        elif key.startswith(EVERY_STAGE + ".") and has(before, EVERY_STAGE):
            setting = key.split(".")[2]
            if setting not in self.stage_keys:
                raise LrbenchError(f"unknown stage setting {key}{did_you_mean(setting, self.stage_keys)}; valid: "
                                   f"{', '.join(sorted(self.stage_keys))}")
        elif key not in known_settings():
            raise self.unknown(key, before)
        elif not has(before, top):
            raise LrbenchError(f"{line}: no {top} is chosen in this run; its settings apply with {top}=<option>")
        if plain:
            add = "++" if self.multirun else "+"  # (++: add or override, whichever each job of a sweep needs)
            raise LrbenchError(f"{key} is not set by this run's config ({self.choices(before)}); to add it "
                               f"write {add}{line}")

    def check_stage_setting(self, key: str, before: DictConfig, line: str, defining: str) -> None:
        task = OmegaConf.select(before, "task.name", default="?")
        if not has(before, STAGES):
            raise LrbenchError(f"{line}: task={task} is not a continual sequence, it has no stages (they apply with "
                               "task=continual/<name>)")
        defined = list(OmegaConf.select(before, STAGES) or {})
        parts = key.split(".")
        stage = parts[2] if len(parts) > 2 else None
        new_stage = defining == f"{STAGES}.{stage}"
        if len(parts) > 3 and stage not in defined and not new_stage:
            raise LrbenchError(f"{line}: {task} has no stage {stage!r}{did_you_mean(stage, defined)}; its stages: "
                               f"{', '.join(defined)} (a new stage: +{STAGES}.<name>={{task: <task>, ...}}, named "
                               f"in task.sequence)")
        if len(parts) > 3 and parts[3] not in self.stage_keys:
            raise LrbenchError(f"unknown stage setting {key}{did_you_mean(parts[3], self.stage_keys)}; valid: "
                               f"{', '.join(sorted(self.stage_keys))}")

    def check_new_stages(self, settings, before: DictConfig, cfg: DictConfig) -> None:
        """A stage added on the command line runs only if task.sequence names it."""
        if not has(before, STAGES):
            return
        defined = set(OmegaConf.select(before, STAGES) or {})
        sequence = list(OmegaConf.select(cfg, "task.sequence", default=None) or [])
        for override in settings:
            stage = self.stage_of(override.key_or_group)
            if stage is not None and stage not in defined and stage not in sequence and not override.is_delete():
                now, named = ", ".join(sequence), ", ".join([*sequence, stage])
                raise LrbenchError(f"{override.input_line}: stage {stage!r} is not in task.sequence=[{now}], so it "
                                   f"would never run; name it there: task.sequence=[{named}]")

    def choices(self, before: DictConfig) -> str:
        picked = OmegaConf.select(before, "hydra.runtime.choices", default={}) or {}
        return ", ".join(f"{g}={picked[g]}" for g in ("method", "model", "task") if picked.get(g))

    def unknown(self, key: str, before: DictConfig) -> LrbenchError:
        """`unknown setting trainer.max_step (did you mean trainer.max_steps?)`: a sibling first, else any setting."""
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(before, parent, default=None, throw_on_resolution_failure=False) if parent else before
        if isinstance(node, DictConfig):
            siblings = [k for k in node if k != "hydra"]
            siblings += [k.rsplit(".", 1)[-1] for k in known_settings() if k.rpartition(".")[0] == parent]
            match = closest(last, siblings)
            if match:
                return LrbenchError(f"unknown setting {key} (did you mean {parent + '.' if parent else ''}{match}?)")
            if parent:
                return LrbenchError(f"unknown setting {key}; {parent} has: {', '.join(sorted(set(siblings)))}")
        everything = [k for k in known_settings() if "*" not in k]
        return LrbenchError(f"unknown setting {key}{did_you_mean(key, everything)}")


def check_command_line(overrides: list[str], multirun: bool = False, stage_keys=(), valid=lambda key: None) -> None:
    """Raise LrbenchError (one line) on an override that Hydra would refuse with its own message, or that the run
    would silently ignore (CommandLine)."""
    CommandLine(overrides, multirun, stage_keys, valid).check()
