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
# Criteria whose teacher input is only the last hidden state at the aligned rows (what teacher.cache_dir holds).
# uld (i-th response token pairs), mined (MinED rows) and dskd_cma (whole sequences + embeddings) need more.
TEACHER_CACHE_CRITERIA = frozenset({"dskd", "dskd_eta", "vanilla_kd"})
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
    # Teacher only: a teacher hidden-state cache (tools/cache_teacher.py output). Set, no teacher engine is
    # built: the losses read the cached last hidden states with the batch, only the frozen head is loaded.
    cache_dir: str = ""

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
        if self.cache_dir and prefix != "teacher":
            problems.append(f"{prefix}.cache_dir is for the frozen teacher only (remove {prefix}.cache_dir)")
        if self.cache_dir and not self.path:
            problems.append(f"{prefix}.cache_dir needs {prefix}.path (the saved model the cache was written from and "
                            f"is fingerprinted against); a random {prefix}.architecture has no weights to check")
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


# Criteria whose terms are defined on aligned rows, so student rollouts (which have no gold labels) can feed them;
# the others define their KD rows from gold labels (uld, dskd_cma, mined) or have no KD term (sft).
ON_POLICY_CRITERIA = ("vanilla_kd", "dskd", "dskd_eta")


@dataclass(frozen=True, slots=True, kw_only=True)
class OnPolicyConfig:
    """On-policy distillation: with probability ``ratio`` an optimizer step learns from student samples of the
    step's prompts instead of the gold responses (README "On-policy distillation", design.md Contract 6)."""

    ratio: float = 0.0  # lambda: probability that an optimizer step is on-policy; 0: off-policy only
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    # Online alignment of the rollouts: "exact" or "paper"; empty: the training shards' manifest choice.
    whitespace: str = ""
    # "once": gather the ZeRO-3 student once per step into a plain copy and generate from it (needs the whole
    # student + KV cache on each device); "per_token": generate through ZeRO-3's layer-by-layer gathers (bounded
    # memory, one all-gather per layer per token: much slower).
    gather: str = "once"
    max_gather_gb: float = 0.0  # "once" refuses above this per rank; 0: the device's free memory

    @property
    def enabled(self) -> bool:
        return self.ratio > 0.0

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 <= self.ratio <= 1.0:
            problems.append(f"kd.on_policy.ratio must be in [0, 1] (0: off-policy only), got {self.ratio}")
        if self.max_new_tokens <= 0:
            problems.append(f"kd.on_policy.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"kd.on_policy.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"kd.on_policy.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"kd.on_policy.top_k must be >= 0 (0: off), got {self.top_k}")
        if self.gather not in ("once", "per_token"):
            problems.append(f"kd.on_policy.gather must be once or per_token, got {self.gather!r}")
        if self.max_gather_gb < 0:
            problems.append(f"kd.on_policy.max_gather_gb must be >= 0 (0: free device memory), got "
                            f"{self.max_gather_gb}")
        if self.whitespace not in ("", "exact", "paper"):
            problems.append(f"kd.on_policy.whitespace must be exact, paper or empty (the manifest's choice), "
                            f"got {self.whitespace!r}")
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
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    def problems(self) -> list[str]:
        problems = self.on_policy.problems()
        if self.on_policy.enabled and self.criterion not in ON_POLICY_CRITERIA:
            problems.append(f"kd.on_policy.ratio={self.on_policy.ratio} needs kd.criterion in "
                            f"{', '.join(ON_POLICY_CRITERIA)}, got {self.criterion!r}: student rollouts have no gold "
                            f"labels, and {self.criterion} "
                            + ("has no KD term" if self.criterion == "sft" else "defines its KD rows from them")
                            + " (set kd.on_policy.ratio=0 or change kd.criterion)")
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
    # "torch": torch.optim.AdamW on the ZeRO partitions (no build step; on ZeRO-3 each group is one flat fp32
    # tensor, so a fused kernel buys little). "deepspeed": DeepSpeed's FusedAdam on GPU / CPUAdam for an offloaded
    # optimizer, JIT-compiled at start-up unless the ops were prebuilt (DS_BUILD_FUSED_ADAM=1, DS_BUILD_CPU_ADAM=1);
    # the FusedAdam JIT needs nvcc and, in DeepSpeed 0.19.8, fails when TORCH_CUDA_ARCH_LIST holds an arch such as
    # "9.0a" (seen on an H200). "auto": torch, except DeepSpeed's CPUAdam for engine.offload_optimizer on a GPU
    # (C++ only, several times faster than torch's AdamW on CPU tensors). CPU-only runs always use torch's.
    adam_impl: str = "auto"

    def problems(self) -> list[str]:
        problems = []
        if self.adam_impl not in ("auto", "torch", "deepspeed"):
            problems.append(f"optim.adam_impl must be auto, torch or deepspeed, got {self.adam_impl!r}")
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

    def teacher_cache_problems(self) -> list[str]:
        """What ``teacher.cache_dir`` cannot serve: other criteria, another eval folder, live on-policy steps."""
        if not self.teacher.cache_dir:
            return []
        problems = []
        if self.kd.criterion not in TEACHER_CACHE_CRITERIA:
            problems.append(f"teacher.cache_dir cannot serve kd.criterion={self.kd.criterion}: it needs teacher hidden "
                            "states beyond the aligned rows the cache holds; use one of "
                            f"{', '.join(sorted(TEACHER_CACHE_CRITERIA))}, or unset teacher.cache_dir")
        if self.data.eval_dir:
            problems.append(f"teacher.cache_dir covers data.train_dir only, not data.eval_dir={self.data.eval_dir}: "
                            "use data.eval_holdout (its examples are in the cache), or unset teacher.cache_dir")
        if self.kd.on_policy.enabled:  # design.md "Teacher hidden-state cache": mixing is left for later
            problems.append("teacher.cache_dir with kd.on_policy.ratio > 0: on-policy steps score fresh student "
                            "rollouts, which no cache holds, and a cached run builds no live teacher; set "
                            "kd.on_policy.ratio=0 or unset teacher.cache_dir")
        return problems

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
            problems += self.teacher_cache_problems()
        if self.kd.on_policy.enabled and self.teacher.cache_dir:
            problems.append(f"kd.on_policy.ratio={self.kd.on_policy.ratio} needs the live teacher (rollouts are new "
                            "text, not in teacher.cache_dir): unset teacher.cache_dir or set kd.on_policy.ratio=0")
        if not self.output_dir:
            problems.append("output_dir is empty: set output_dir (checkpoints, logs and exports go there)")
        if self.engine.precision == "fp16" and self.kd.criterion in PROJECTOR_CRITERIA:
            problems.append("engine.precision=fp16 with DSKD overflows (NaN losses; issue #15 of the official DSKD "
                            "repository): use bf16")
        if self.optim.warmup_steps and self.optim.max_steps and self.optim.warmup_steps > self.optim.max_steps:
            problems.append(f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds optim.max_steps "
                            f"({self.optim.max_steps})")
        return problems
