"""The run configuration: one frozen dataclass tree per training run.

A run is ``configs/runs/<name>.yaml`` plus dotted overrides (``kd.temperature=2.0``), loaded with
``dskd_scale.config.loader.load_config(RunConfig, path, overrides)``. Components never receive the
root: the engine gets ``EngineConfig``/``OptimConfig``, the models ``ModelConfig``, the loop the rest.
Every ``validate`` message starts with the dotted key path and says what to set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CRITERIA = ("sft", "vanilla_kd", "dskd", "dskd_eta", "dskd_cma", "uld", "mined")
# Criteria that need the teacher at all, and those that need the t2s projector / s2t map.
TEACHER_CRITERIA = frozenset(CRITERIA) - {"sft"}
PROJECTOR_CRITERIA = frozenset({"dskd", "dskd_eta", "dskd_cma"})
DSKD_V2_CRITERIA = frozenset({"dskd", "dskd_eta"})  # t2s projector + s2t map (pinv initialised)
DIVERGENCES = (
    "forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "adaptive_kl", "total_variation",
)
ARCHITECTURES = ("llama", "gpt2", "qwen2", "mistral")
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
SCHEDULES = ("cosine", "linear", "constant")
PLACEMENTS = ("zero3", "replicated")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraConfig:
    """LoRA through ``peft`` for the student (the paper's TinyLLaMA setting: r=256, alpha=8, dropout 0.1)."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def problems(self) -> list[str]:
        problems = []
        if self.enabled and self.r <= 0:
            problems.append(f"lora.r must be > 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """A causal LM: loaded with ``from_pretrained(path)``, or built randomly when ``architecture`` is set.

    The random build (tests, demo) takes the architecture and sizes from here and the vocabulary size
    from the tokenizer, so a teacher and a student of different families can be made on their own tokenizers.
    """

    path: str = ""
    tokenizer: str = ""
    architecture: str = ""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 0
    max_position_embeddings: int = 1024
    init_seed: int = 0
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Teacher only. "zero3": a frozen DeepSpeed engine at engine.zero_stage (partitioned under ZeRO-3, weights
    # gathered every forward). "replicated": a full frozen copy on every rank, no DeepSpeed (no per-step gathers).
    placement: str = "zero3"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path

    def problems(self, prefix: str) -> list[str]:
        problems = []
        if not self.path and not self.architecture:
            problems.append(f"{prefix}.path is empty: set {prefix}.path (a Hugging Face model folder) "
                            f"or {prefix}.architecture (one of {', '.join(ARCHITECTURES)}) for a random model")
        if self.architecture and self.architecture not in ARCHITECTURES:
            problems.append(f"{prefix}.architecture must be one of {', '.join(ARCHITECTURES)}, "
                            f"got {self.architecture!r}")
        if not self.tokenizer_path:
            problems.append(f"{prefix}.tokenizer is empty: set {prefix}.tokenizer (a tokenizer folder)")
        if self.architecture and (self.hidden_size <= 0 or self.num_layers <= 0 or self.num_heads <= 0):
            problems.append(f"{prefix}.hidden_size/num_layers/num_heads must be > 0 for a random model")
        if self.architecture and self.hidden_size % max(self.num_heads, 1):
            problems.append(f"{prefix}.hidden_size ({self.hidden_size}) must be divisible by "
                            f"{prefix}.num_heads ({self.num_heads})")
        problems += [p.replace("lora.", f"{prefix}.lora.", 1) for p in self.lora.problems()]
        if self.placement not in PLACEMENTS:
            problems.append(f"{prefix}.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        elif self.placement == "replicated" and prefix != "teacher":
            problems.append(f"{prefix}.placement=replicated is for the frozen teacher only; the trained {prefix} "
                            f"is always a ZeRO engine (remove {prefix}.placement)")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    """Prealigned shards (``tools/prealign.py`` output) and how they are batched."""

    train_dir: str = ""
    eval_dir: str = ""
    # Without eval_dir: hold out this fraction (< 1) or count (>= 1) of train_dir for eval loss; 0: none.
    eval_holdout: float = 0.0
    micro_batch_size: int = 4
    eval_micro_batch_size: int = 0
    group_by_length: bool = True
    num_workers: int = 0
    seed: int = 10

    def problems(self) -> list[str]:
        problems = []
        if not self.train_dir:
            problems.append("data.train_dir is empty: set data.train_dir to a folder written by tools/prealign.py")
        if self.micro_batch_size <= 0:
            problems.append(f"data.micro_batch_size must be > 0, got {self.micro_batch_size}")
        if self.num_workers < 0:
            problems.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class KDConfig:
    """Which criterion, and its knobs (the README's criterion table says which one fits a model pair)."""

    criterion: str = "dskd"
    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"
    skew_lambda: float = 0.1
    adaptive_kl_alpha: float = 0.5
    t2s_agreement_threshold: float = 1.0
    # "pinv": ideal initialisation gathered at start-up; "file": load projector_init_file; "random".
    projector_init: str = "pinv"
    projector_init_file: str = ""
    # "pinv": closed-form s2t map rebuilt each step; "learned": a trainable linear map.
    s2t_map: str = "pinv"
    # DSKD v2: which KD terms enter the loss ("student": kd_t2s + ce_t2s, "teacher": kd_s2t; the paper's ablation).
    spaces: str = "both"
    # DSKD v2 denominators: "global" token means (invariant to the rank x micro-batch split) or "official":
    # the official code's per-micro-batch local counts of agreeing/mapped rows (design.md Contract 3).
    normalization: str = "global"
    chunk_size: int = 1024
    # MinED vocabulary map (tools/build_mined_map.py output), for kd.criterion=mined.
    mined_map: str = ""

    def problems(self) -> list[str]:
        problems = []
        if self.criterion not in CRITERIA:
            problems.append(f"kd.criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"kd.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            problems.append(f"kd.temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            problems.append(f"kd.divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.projector_init not in ("pinv", "file", "random"):
            problems.append(f"kd.projector_init must be pinv, file or random, got {self.projector_init!r}")
        if self.projector_init == "file" and not self.projector_init_file:
            problems.append("kd.projector_init_file is empty but kd.projector_init is 'file'")
        if self.s2t_map not in ("pinv", "learned"):
            problems.append(f"kd.s2t_map must be pinv or learned, got {self.s2t_map!r}")
        if self.spaces not in ("both", "student", "teacher"):
            problems.append(f"kd.spaces must be both, student or teacher, got {self.spaces!r}")
        if self.normalization not in ("global", "official"):
            problems.append(f"kd.normalization must be global or official, got {self.normalization!r}")
        if (self.spaces, self.normalization) != ("both", "global") and self.criterion not in DSKD_V2_CRITERIA:
            problems.append(f"kd.spaces and kd.normalization apply to dskd/dskd_eta only, not {self.criterion!r}")
        if self.chunk_size <= 0:
            problems.append(f"kd.chunk_size must be > 0, got {self.chunk_size}")
        if self.criterion == "mined" and not self.mined_map:
            problems.append("kd.mined_map is empty: kd.criterion=mined needs a map from tools/build_mined_map.py")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """AdamW with decoupled projector LR, warm-up + schedule, clipping and accumulation."""

    lr: float = 5e-4
    projector_lr: float = 5e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 1e-7
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_steps: int = 0
    epochs: int = 1
    # Stop with an error (exit 3) after this many optimizer steps in a row were skipped for non-finite
    # gradients (a diverged run); 0 never stops. fp16 loss scaling skips a few steps at the start by design.
    max_consecutive_skipped_steps: int = 50

    def problems(self) -> list[str]:
        problems = []
        if self.lr <= 0 or self.projector_lr <= 0:
            problems.append(f"optim.lr and optim.projector_lr must be > 0, got {self.lr}, {self.projector_lr}")
        if self.schedule not in SCHEDULES:
            problems.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.grad_accum <= 0:
            problems.append(f"optim.grad_accum must be > 0, got {self.grad_accum}")
        if self.warmup_steps < 0 or self.max_steps < 0 or self.epochs <= 0:
            problems.append("optim.warmup_steps and optim.max_steps must be >= 0 and optim.epochs > 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            problems.append(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.grad_clip < 0:
            problems.append(f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.max_consecutive_skipped_steps < 0:
            problems.append("optim.max_consecutive_skipped_steps must be >= 0 (0: never stop), got "
                            f"{self.max_consecutive_skipped_steps}")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """DeepSpeed settings. The DS dict is built in code from this; ``zero_tuning`` may add ZeRO knobs only."""

    zero_stage: int = 3
    precision: str = "fp32"
    offload_optimizer: str = "none"
    offload_param: str = "none"
    teacher_offload_param: str = "none"
    nvme_path: str = "/local_nvme"
    zero_tuning: str = ""
    dist_backend: str = ""
    # Skip the JIT build of DeepSpeed's CPU shared-memory comm op (plain gloo instead); CPU only.
    skip_cpu_shm_op: bool = False

    def problems(self) -> list[str]:
        problems = []
        if self.zero_stage not in (0, 1, 3):
            problems.append(f"engine.zero_stage must be 0, 1 or 3, got {self.zero_stage} (ZeRO-2 is not wired to the "
                            "student-head gradient routing; ZeRO-3 partitions more anyway)")
        if self.precision != "fp32" and self.zero_stage != 3:
            problems.append(f"engine.precision={self.precision} needs engine.zero_stage=3 (below it DeepSpeed's "
                            "BF16/FP16 optimizer consumes gradients before the head gradient is routed)")
        if self.precision not in PRECISIONS:
            problems.append(f"engine.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for key in ("offload_optimizer", "offload_param", "teacher_offload_param"):
            if getattr(self, key) not in OFFLOAD_DEVICES:
                problems.append(f"engine.{key} must be one of {', '.join(OFFLOAD_DEVICES)}, "
                                f"got {getattr(self, key)!r}")
        if self.zero_stage != 3 and ("none" != self.offload_param or "none" != self.teacher_offload_param):
            problems.append("engine.offload_param / engine.teacher_offload_param need engine.zero_stage=3")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    keep_last: int = 2
    # "auto": resume from the latest complete checkpoint under output_dir/checkpoints if any; "never"; or a path.
    resume: str = "auto"
    export_at_end: bool = True

    def problems(self) -> list[str]:
        problems = []
        if self.every_steps < 0:
            problems.append(f"checkpoint.every_steps must be >= 0 (0: only on signal/end), got {self.every_steps}")
        if self.keep_last < 1:
            problems.append(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    every_steps: int = 10
    eval_every_steps: int = 0
    eval_max_batches: int = 0
    tensorboard: bool = True
    progress_bar: bool = True

    def problems(self) -> list[str]:
        if self.every_steps <= 0:
            return [f"log.every_steps must be > 0, got {self.every_steps}"]
        return []


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 10
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def needs_teacher(self) -> bool:
        return self.kd.criterion in TEACHER_CRITERIA

    def validate(self) -> list[str]:
        # Sections report full dotted paths here: the loader validates only the sections a YAML sets,
        # and a section left at its defaults (e.g. no data.train_dir) must still be checked.
        problems = self.student.problems("student")
        for section in (self.data, self.kd, self.optim, self.engine, self.checkpoint, self.log):
            problems += section.problems()
        if self.needs_teacher:
            problems += self.teacher.problems("teacher")
            if self.teacher.lora.enabled:
                problems.append("teacher.lora.enabled must be false: the teacher is frozen")
            if self.teacher.placement == "replicated" and self.engine.teacher_offload_param != "none":
                problems.append(f"engine.teacher_offload_param={self.engine.teacher_offload_param} offloads a ZeRO-3 "
                                "teacher's partition, but teacher.placement=replicated keeps a full copy on every "
                                "rank's device: set one of them back")
        if not self.output_dir:
            problems.append("output_dir is empty: set output_dir (checkpoints, logs and exports go there)")
        if self.engine.precision == "fp16" and self.kd.criterion in PROJECTOR_CRITERIA:
            problems.append("engine.precision=fp16 with DSKD overflows (NaN losses; issue #15 of the official DSKD "
                            "repository): use bf16")
        if self.optim.warmup_steps and self.optim.max_steps and self.optim.warmup_steps > self.optim.max_steps:
            problems.append(f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds optim.max_steps "
                            f"({self.optim.max_steps})")
        return problems
