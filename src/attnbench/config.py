"""The params schema: params.yaml is validated here, once, before any stage does work.

Every error is one line naming the key, the bad value and what is allowed.
A variant's own options are validated by the Options class beside it in
variants/, looked up through the registry, so this file never lists them.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .model import ModelConfig
from .variants import REGISTRY, NoBooleanNumbers, PositiveAutoInt, VariantOptions, parse_entry

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
SEED_LIMIT = 2**63  # a signed 64-bit integer: a bound every reader of a seed takes


def _positive_increasing(v: list[int]) -> list[int]:
    if any(t <= 0 for t in v) or v != sorted(set(v)):
        raise ValueError(f"must be positive and strictly increasing, got {v}")
    return v


SeqLens = Annotated[list[int], AfterValidator(_positive_increasing)]


class ConfigError(ValueError):
    """A bad params file; the message is one line meant for the user."""


class _VariantOptionsError(Exception):
    """Raised past pydantic (not a ValueError) so the message keeps its full key path."""


class Strict(NoBooleanNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Strict):
    name: str = Field("cpu-small", pattern=NAME_PATTERN, description="results/<name> and reports/<name> hold this config's outputs")


class SplitFractions(Strict):
    train: float = Field(0.9, gt=0, lt=1)
    val: float = Field(0.05, gt=0, lt=1)
    test: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class DataConfig(Strict):
    source: Literal["enwik8", "local", "sample"] = "sample"
    url: str = "http://mattmahoney.net/dc/enwik8.zip"
    member: str = Field("enwik8", description="the file to extract from the archive")
    md5: str | None = Field(
        "a1fa5ffddb56f4953e226637dabbb36a", pattern=r"^[0-9a-f]{32}$", description="published md5 of the extracted member"
    )
    path: str | None = Field(None, description="the file for source=local: text, .gz or .zip")
    max_bytes: int = Field(100_000_000, gt=0, description="prepare keeps the first max_bytes bytes")
    splits: SplitFractions = SplitFractions()
    max_archive_ratio: float = Field(20.0, gt=1, description="refuse archives that inflate more than this (zip bombs)")

    @model_validator(mode="after")
    def _local_needs_path(self):
        if self.source == "local" and not self.path:
            raise ValueError("source=local needs data.path (a text, .gz or .zip file)")
        return self


class ModelParams(Strict):
    d_model: int = Field(64, gt=0)
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    seq_len: int = Field(128, gt=0)
    mlp_ratio: int = Field(4, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        return self


def check_shardable(processes: int, grad_accum: int, batch_size: int) -> None:
    """Data-parallel processes split each step evenly: whole micro-batches or rows of each (distributed.shard)."""
    if grad_accum % processes and batch_size % processes:
        raise ValueError(
            f"train.nproc = {processes} must divide train.grad_accum ({grad_accum}) or train.batch_size ({batch_size}), "
            "so that every process gets an equal share of each batch"
        )


class TrainConfig(Strict):
    steps: int | None = Field(None, gt=0, description="budget in optimizer steps (or set tokens)")
    tokens: int | None = Field(None, gt=0, description="budget in training tokens (or set steps)")
    batch_size: int = Field(16, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="of the weights, the batches and the noise; an entry `<variant>-seed<N>` "
                      "of `variants` trains with N instead")
    eval_every: int = Field(50, gt=0)
    eval_batches: int = Field(8, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveAutoInt = Field(
        "auto", description="CPU threads of each train, evaluate and profile job (split among train.nproc processes); auto = "
        "every core the job may use: the orchestrator's grant (OMP_NUM_THREADS), else the process's CPU affinity")
    compile: bool = Field(False, description="torch.compile the model; where it fails, training goes on eagerly with a warning "
                          "(train.json's `compiled` says which ran)")
    nproc: int = Field(1, gt=0, description="data-parallel training processes, one per GPU: > 1 runs train under torchrun (DDP)")

    def gpus(self, per_job: int) -> int:
        """The GPUs a train, evaluate or profile job takes: `per_job`, or none where training runs on the CPU (the
        front ends, the GPU slots and a Slurm job's request all read it)."""
        return 0 if self.device == "cpu" else per_job

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError(f"set exactly one of train.steps and train.tokens (got steps={self.steps}, tokens={self.tokens})")
        check_shardable(self.nproc, self.grad_accum, self.batch_size)  # before any work
        return self


class EvaluateConfig(Strict):
    max_tokens: int | None = Field(None, gt=0, description="cap on test tokens scored; null = the whole test split")
    batch_size: int = Field(16, gt=0)


class ProfileConfig(Strict):
    seq_lens: SeqLens = Field([64, 128, 256, 512], min_length=2)
    tokens_per_step: int = Field(4096, gt=0, description="batch = tokens_per_step // T sequences")
    warmup: int = Field(1, ge=0)
    warmup_seconds: float = Field(0.0, ge=0, description="then more untimed steps until the point has run this long: on a "
                                  "GPU its repeats then see the clocks of a steady load (BenchmarkConfig.warmup_seconds "
                                  "says why); 0 on the CPU default, where 1 s a point would add minutes")
    repeats: int = Field(3, gt=0)
    whole_model: bool = True
    seed: int = Field(0, description="torch's seed before each point: lca's and sca's saved activations depend on their random clusters")


class BenchmarkConfig(Strict):
    """The GPU benchmark (`python -m attnbench benchmark`, and the front ends' `benchmark` target outside the
    default DAG); the command's flags of the same names override these."""

    seq_lens: SeqLens = Field([1024, 2048, 4096, 8192, 16384, 32768], min_length=1, description="T of the attention rows")
    tokens: int = Field(65536, gt=0, description="tokens per timed step: attention batch = tokens // T, training tokens // model.seq_len")
    heads: int = Field(8, gt=0, description="heads of the attention rows")
    head_dim: int = Field(64, gt=0, description="head size of the attention rows, and of the train_sizes models (d_model // head_dim heads)")
    warmup: int = Field(3, ge=0, description="untimed calls of each point's step before its samples")
    warmup_seconds: float = Field(1.0, ge=0, description="then more untimed calls, until the device has run the step this "
                                  "long: a short step's samples then see the clocks that training at a steady load sees (on "
                                  "an H100, mha's kernels draw the 700 W cap within about 0.2 s and the SM clock falls from "
                                  "1,980 MHz to about 1,750; a step drawing less keeps 1,980)")
    repeats: int = Field(10, gt=0, description="timed samples per point (the median counts)")
    sample_seconds: float = Field(2.0, ge=0, description="then more samples, until they span this much of the device's "
                                  "time: under the H100's power cap mha's clock swings with a period of about a second (its "
                                  "8K samples' means over 0.2 s ranged 4.77-5.24 ms within 2 s), so a median of fewer would "
                                  "depend on the phase it caught")
    parts: list[Literal["attention", "train"]] = Field(["attention", "train"], min_length=1)
    modes: list[Literal["eager", "compiled", "graphs"]] = Field(
        ["compiled", "graphs"], min_length=1, description="the variants' attention rows: eager, under torch.compile, and compiled "
        "as CUDA graphs (reduce-overhead: the kernels without the host's launch time)")
    train_sizes: list[Annotated[str, Field(pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")]] = Field(
        [], description="more model sizes for the training rows (plain GPT and mha), d_model x layers, e.g. 768x12")

    @model_validator(mode="after")
    def _whole_heads(self):
        for d_model, layers in self.train_models:
            if d_model % self.head_dim:
                raise ValueError(f"train_sizes '{d_model}x{layers}': d_model {d_model} is not a multiple of head_dim {self.head_dim}")
        return self

    @property
    def train_models(self) -> list[tuple[int, int]]:
        """train_sizes as (d_model, layers)."""
        return [tuple(map(int, size.split("x"))) for size in self.train_sizes]


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # MLflow's stores, bar
# its file store, which MLflow 3 refuses ("maintenance mode")


def _tracking_uri(uri: str | None) -> str | None:
    if uri is None:
        return uri
    full_scheme = uri.partition(":")[0]
    scheme = full_scheme.partition("+")[0]  # postgresql+psycopg2, sqlite+pysqlite: a driver
    form = {"sqlite": f"{full_scheme}:///", "databricks": "databricks"}.get(scheme, f"{full_scheme}://")
    if scheme not in TRACKING_SCHEMES or not uri.startswith(form):
        raise ValueError(f"must be null (the local store) or an MLflow tracking URI: sqlite:///<file>, http(s)://<host>:<port>, "
                         f"or one of {', '.join(TRACKING_SCHEMES[3:])}")
    return uri


class TrackingConfig(Strict):
    uri: Annotated[str | None, AfterValidator(_tracking_uri)] = Field(
        None, description="MLflow tracking URI; null = sqlite:///mlflow.db in the working directory")
    experiment: str | None = Field(None, description="null = attnbench/<run.name>")


class Params(Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelParams = ModelParams()
    train: TrainConfig = TrainConfig(steps=200)
    evaluate: EvaluateConfig = EvaluateConfig()
    profile: ProfileConfig = ProfileConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    tracking: TrackingConfig = TrackingConfig()
    # SerializeAsAny: dump each variant's own Options fields, not those of the base class (none).
    variants: dict[str, SerializeAsAny[VariantOptions]] = Field(default_factory=lambda: {"mha": REGISTRY["mha"].Options()})

    @field_validator("variants", mode="before")
    @classmethod
    def _known_variants(cls, raw: Any) -> dict[str, VariantOptions]:
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"must map variant names to their options, got {raw!r}")
        parsed = {}
        for name, options in raw.items():
            variant, _ = parse_entry(name)
            try:
                parsed[name] = REGISTRY[variant].Options.model_validate(options or {})
            except ValidationError as err:
                raise _VariantOptionsError(_first_error(err, prefix=f"variants.{name}.")) from None
        return parsed

    @model_validator(mode="after")
    def _entries_of_a_variant_differ_in_their_seed_only(self):
        """So that the report's spread over a variant's entries is its seeds' spread, and the variant itself is one of
        them (what the benchmark times)."""
        seen: dict[str, dict[int, str]] = {}  # variant -> {seed: entry}
        for entry, options in self.variants.items():
            variant, seed = parse_entry(entry)
            if variant not in self.variants:
                raise ValueError(f"variants.{entry}: trains {variant} with another seed, but {variant} is not in variants; add it, "
                                 "with the same options")
            seed = self.train.seed if seed is None else seed
            if seed >= SEED_LIMIT:
                raise ValueError(f"variants.{entry}: seed {seed} is too large; allowed: 0 to 2**63 - 1")
            if not (same := seen.setdefault(variant, {})):
                same[seed] = entry
                continue
            first = next(iter(same.values()))
            if options != self.variants[first]:
                raise ValueError(f"variants.{entry}: options {options.model_dump()} differ from {first}'s {self.variants[first].model_dump()}; "
                                 "the entries of one variant differ in their seed only (copy its options)")
            if seed in same:
                raise ValueError(f"variants.{entry}: seed {seed} is {same[seed]}'s too (train.seed: {self.train.seed}); the entries "
                                 "of one variant need seeds of their own")
            same[seed] = entry
        return self

    @property
    def results_dir(self) -> Path:
        return Path("results") / self.run.name

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"attnbench/{self.run.name}"

    def model_for(self, entry: str) -> ModelConfig:
        return ModelConfig(variant=parse_entry(entry)[0], **self.model.model_dump(), variant_options=self.variant_options(entry))

    def train_for(self, entry: str) -> TrainConfig:
        """The train section as `entry` trains: with its own seed for `<variant>-seed<N>`."""
        self.variant_options(entry)  # a clear error for an entry this file does not configure
        seed = parse_entry(entry)[1]
        return self.train if seed is None else TrainConfig.model_validate(self.train.model_dump() | {"seed": seed})

    def benchmark_with(self, overrides: dict[str, Any]) -> BenchmarkConfig:
        """The benchmark section with the command line's values in place of the file's, validated as the file is."""
        try:
            return BenchmarkConfig.model_validate(self.benchmark.model_dump() | overrides)
        except ValidationError as err:
            raise ConfigError(f"command line: {_first_error(err, prefix='benchmark.')}") from None

    def logged(self, variant: str, *sections: str) -> dict:
        """What a stage run of `variant` logs to MLflow as params: the variant, the model, its options, and the
        named sections of this file (train as `variant` trains: `train_for`)."""
        sections_as_run = {name: (self.train_for(variant) if name == "train" else getattr(self, name)).model_dump() for name in sections}
        return {"variant": variant, "model": self.model.model_dump(), "variant_options": self.variant_options(variant), **sections_as_run}

    def variant_options(self, name: str) -> dict:
        """The options of `name` as plain data (what goes into checkpoints and MLflow)."""
        if name not in self.variants:
            raise ConfigError(f"variant {name!r} is not in this params file's variants; present: {', '.join(self.variants)}")
        return self.variants[name].model_dump()


def _keys_of_section(path: list[str]) -> list[str] | None:
    """The keys the section at `path` (["train"], ["variants", "lca"], [] for the top) allows; None if unknown."""
    model: type[BaseModel] = Params
    while path:
        if model is Params and path[0] == "variants":
            try:
                model, path = REGISTRY[parse_entry(path[1])[0]].Options, path[2:]
            except (IndexError, ValueError):
                return None
            continue
        annotation = model.model_fields[path[0]].annotation if path[0] in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model, path = annotation, path[1:]
    return list(model.model_fields)


def _first_error(err: ValidationError, prefix: str = "") -> str:
    e = err.errors(include_url=False)[0]
    msg = e["msg"].removeprefix("Value error, ")
    parts = [p for p in prefix.split(".") if p] + [str(p) for p in e["loc"]]
    loc = ".".join(parts)
    if e["type"] == "extra_forbidden":
        allowed = _keys_of_section(parts[:-1])
        if not allowed:
            return f"{loc}: unknown key"
        close = difflib.get_close_matches(parts[-1], allowed, n=1)
        return f"{loc}: unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; allowed: {', '.join(allowed)}"
    value = e.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{loc}{shown}: {msg}" if loc else msg


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ConfigError with a one-line message."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_first_error(err)}") from None
    except _VariantOptionsError as err:
        raise ConfigError(f"{source}: {err}") from None
