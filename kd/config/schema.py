"""The recipe schema: every key a recipe may hold, its type, default and meaning.

Each section is a small pydantic model that rejects unknown keys, and each component receives only its own section.
The field descriptions are the reference documentation (README "Recipe reference" is generated from them by
`kd.config.reference`), so keep them to one sentence that says what the knob does.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    output_dir: str = Field(description="Run directory: metrics.jsonl, tensorboard/, checkpoints/, recipe.yaml.")
    nproc: int = Field(1, ge=1, description="Processes per node that `kd train` launches when --nproc is not given.")
    log_interval: int = Field(1, ge=1, description="Print a progress line every N optimizer steps (JSONL/TensorBoard get every step).")
    progress_bar: bool = Field(True, description="Show a progress bar with ETA on rank 0.")
    record_sample_ids: bool = Field(False, description="Write the training sample ids each rank consumed per step to sample_ids/rank_R.jsonl (audits data order across resumes).")


class ModelSource(Section):
    path: Optional[str] = Field(None, description="Local Hugging Face model directory, or `asset:NAME` for a packaged model (see README).")
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside `path` to load (dequantized by transformers).")
    config: Optional[dict[str, Any]] = Field(None, description="Inline transformers config (`model_type` + fields) to build a randomly initialised model.")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="Parameter dtype; bf16 also enables DeepSpeed bf16 training for the student.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the checkpoint to run. Off unless you trust the source.")


def _inference_source(cfg):
    """The checks every frozen model on an inference-only engine shares (the teacher, a fusion's small models)."""
    if cfg.path is None and cfg.config is None:
        raise ValueError("set `path` (a model directory) or `config` (an inline model config)")
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ValueError("offload_params needs zero_stage: 3")
    return cfg


class FusionModelConfig(ModelSource):
    """A small model of a fusion (the small base, an expert): its own inference-only engine, like the teacher's."""

    zero_stage: Literal[0, 3] = Field(3, description="3 = parameters sharded across all ranks; 0 = a full replica per rank (small models: usually faster).")
    offload_params: bool = Field(False, description="With zero_stage 3, keep the parameter shards in CPU memory.")

    @model_validator(mode="after")
    def _one_source(self):
        return _inference_source(self)


class FusionGridConfig(Section):
    low: float = Field(0.0, description="Smallest weight a_t an expert may get.")
    high: float = Field(2.0, description="Largest weight a_t; high - low must be a whole number of steps.")
    step: float = Field(0.1, gt=0, description="Spacing of the weights searched between low and high.")

    @model_validator(mode="after")
    def _makes_a_grid(self):
        from kd.fusion.grid import grid_points  # pure Python: raises ValueError naming what is wrong

        grid_points(self.low, self.high, self.step)
        return self


class FusionConfig(Section):
    small_base: FusionModelConfig = Field(description="The small base model every expert was fine-tuned from (same tokenizer as the large base).")
    experts: list[FusionModelConfig] = Field(description="The task experts (fine-tunes of small_base), at least one; in this order on every rank, and in the tie rule.")
    mode: Literal["single", "joint", "static"] = Field("single", description="single: per position one expert active, the best of T x G candidates (the paper's); joint: all weights together (full grid for <= 2 experts, else coordinate descent); static: the fixed static_weights (proxy-tuning).")
    grid: FusionGridConfig = Field(default_factory=FusionGridConfig, description="The weights searched per expert (single, joint).")
    static_weights: Optional[list[float]] = Field(None, description="mode static: one weight per expert (default 1 each).")
    chunk_rows: int = Field(512, ge=1, description="Positions solved at once; memory ~ chunk_rows x vocab x 4 bytes x (experts + 4) for fp32 models (+2 for bf16).")
    sweeps: int = Field(10, ge=1, description="mode joint with more than 2 experts: most coordinate-descent sweeps per position.")

    @model_validator(mode="after")
    def _consistent(self):
        if not self.experts:
            raise ValueError("`experts` lists no model: fusion needs at least one expert (a fine-tune of small_base)")
        if self.static_weights is not None:
            if self.mode != "static":
                raise ValueError(f"static_weights is set but mode is {self.mode!r}; set mode: static or drop static_weights")
            if len(self.static_weights) != len(self.experts):
                raise ValueError(f"static_weights has {len(self.static_weights)} entries for {len(self.experts)} experts: give one per expert")
        return self


class TeacherConfig(ModelSource):
    zero_stage: Literal[0, 3] = Field(3, description="3 = parameters sharded across all ranks (teachers larger than one GPU); 0 = a full replica per rank.")
    offload_params: bool = Field(False, description="With zero_stage 3, keep the teacher's parameter shards in CPU memory.")
    fusion: Optional[FusionConfig] = Field(None, description="Dynamic logit fusion: this model is the large base, steered per position by small experts (README \"Dynamic logit fusion\"); unset = one teacher.")
    store: Optional[str] = Field(None, description="Train from a teacher store written by `kd precompute` (top-k log-probs per token) instead of running this model; the section still names the teacher the store was computed from (tokenizer, config, init_from_teacher_layers). README \"Offline teacher\".")

    @model_validator(mode="after")
    def _one_source(self):
        return _inference_source(self)


class StudentConfig(ModelSource):
    init_from_teacher_layers: Optional[list[int]] = Field(
        None, description="Build the student from the teacher's config keeping these teacher layers (in order) and copy their weights, with embeddings, final norm and lm_head.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage of the student's training engine.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO-Offload, stage >= 1).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "config", "init_from_teacher_layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of `path`, `config`, `init_from_teacher_layers`" + (f" (got {', '.join(given)})" if given else ""))
        if self.init_from_teacher_layers is not None and not self.init_from_teacher_layers:
            raise ValueError("init_from_teacher_layers must list at least one layer")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


class DatasetSource(Section):
    path: str = Field(description="A local .jsonl/.json/.parquet/.txt file, a directory saved with `save_to_disk`, a hub dataset name, or `asset:NAME`.")
    split: str = Field("train", description="Split to read (hub datasets and DatasetDicts).")
    name: Optional[str] = Field(None, description="Hub dataset configuration name.")


class DataConfig(Section):
    kind: Literal["text", "chat"] = Field("text", description="text: documents concatenated and packed into seq_len blocks; chat: one conversation per sample, loss on assistant tokens only.")
    train: DatasetSource = Field(description="Training data.")
    eval: Optional[DatasetSource] = Field(None, description="Held-out data; when unset, `eval_fraction` of the training documents is held out.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of training documents held out for eval when `eval` is unset.")
    seq_len: int = Field(512, ge=8, description="Tokens per sample; must not exceed the models' maximum position.")
    text_field: str = Field("text", description="Column holding the text (kind: text).")
    messages_field: str = Field("messages", description="Column holding a list of {role, content} turns (kind: chat).")
    prompt_field: str = Field("prompt", description="Column holding the prompt when samples are prompt/response pairs (kind: chat).")
    response_field: str = Field("response", description="Column holding the response when samples are prompt/response pairs (kind: chat).")
    overlong: Literal["truncate", "error"] = Field("truncate", description="What to do with a chat sample longer than seq_len: cut it (and count it) or stop with an error.")
    max_documents: Optional[int] = Field(None, ge=1, description="Use only the first N documents (quick experiments).")
    shuffle: bool = Field(True, description="Shuffle samples each epoch (seeded by train.seed, so runs are reproducible).")
    num_proc: int = Field(1, ge=1, description="Processes for tokenization (datasets.map).")


class TAIDConfig(Section):
    t_start: float = Field(0.4, ge=0.0, le=1.0, description="Interpolation weight t of the teacher at step 0.")
    t_end: float = Field(1.0, ge=0.0, le=1.0, description="Largest t (1.0 = the pure teacher distribution).")
    alpha: float = Field(5e-4, ge=0.0, description="Step size of the adaptive update of t.")
    beta: float = Field(0.99, ge=0.0, lt=1.0, description="Momentum of the relative loss change that drives the adaptive update.")
    adaptive: bool = Field(True, description="false: t follows the linear schedule t_start -> t_end alone.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.t_start > self.t_end:
            raise ValueError("t_start must not exceed t_end")
        return self


class TRGConfig(Section):
    context_weight: float = Field(20.0, ge=0.0, description="a: weight of the contextual (intra-sequence similarity) loss; its MSE between M x M softmax rows is small (~0.03 at M = 16), so a ~ 20 gives it a gradient like the other terms'.")
    local_weight: float = Field(1.0, ge=0.0, description="b: weight of the local kNN-graph loss.")
    global_weight: float = Field(1.0, ge=0.0, description="c: weight of the global contrastive (InfoNCE) loss.")
    nodes_per_sequence: int = Field(16, ge=2, description="M: loss tokens sampled per sequence as graph nodes.")
    k: int = Field(4, ge=1, description="Neighbours per node in the teacher's kNN graph.")
    sigma: float = Field(0.1, gt=0.0, description="Bandwidth of the edge weights exp(-d^2 / (2 sigma)) between unit-norm features (d^2 in [0, 4]): the temperature of each node's neighbour distribution.")
    tau_start: float = Field(0.1, gt=0.0, description="InfoNCE temperature at step 0.")
    tau_end: float = Field(0.05, gt=0.0, description="InfoNCE temperature at the last step (annealed linearly).")
    layers: Literal["final", "mapped"] = Field("final", description="final: final-norm hidden states; mapped: every student layer l with teacher layer round(l * L_t / L_s).")


class LossConfig(Section):
    name: str = Field("forward_kl", description="forward_kl | reverse_kl | jsd | tvd | skew_kl | skew_reverse_kl | taid | ce, or a dotted path `pkg.module.Class`.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature applied to both student and teacher logits in the divergence.")
    ce_weight: float = Field(0.0, ge=0.0, le=1.0, description="w in (1 - w) * divergence + w * cross-entropy on the labels.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: mixture weight of the teacher in M = beta * p + (1 - beta) * q.")
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="skew_kl / skew_reverse_kl: skew weight of the mixture (DistiLLM).")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments passed to a custom (dotted-path) loss.")
    kernel: Literal["auto", "triton", "torch", "eager"] = Field("auto", description="auto: fused Triton kernels on CUDA, the chunked PyTorch path elsewhere; triton / torch force one; eager: the plain reference formulas.")
    fused_linear: bool = Field(False, description="Compute the student's and the teacher's lm_heads inside the loss kernel (kd.ops.fused_linear_divergence), a block of rows at a time: neither model's N x V logits are materialized. Divergence losses and taid, with or without trg; Llama/Qwen/Mistral-style heads (a teacher without one hands over its logits).")
    sparse_tail: Literal["bucket", "renormalize"] = Field("bucket", description="With a stored top-k teacher (teacher.store): bucket keeps the teacher's tail mass as one more bucket against the student's mass off the k ids (nothing dropped); renormalize renormalizes both over the k ids and ignores the tail (axolotl's behaviour).")
    taid: TAIDConfig = Field(default_factory=TAIDConfig, description="TAID schedule (used when name is taid).")
    trg: Optional[TRGConfig] = Field(None, description="Add token-relationship-graph terms on hidden states on top of the logit loss (unset = off).")


class TrainConfig(Section):
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to train; the run stops at max_steps or after `epochs`, whichever comes first.")
    epochs: Optional[float] = Field(None, gt=0, description="Passes over the training samples (may be fractional).")
    micro_batch_size: int = Field(1, ge=1, description="Samples per rank per forward/backward.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per rank per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this value (0 = off).")
    seed: int = Field(0, description="Seed for model init, data order and dropout.")
    max_nonfinite_steps: int = Field(3, ge=1, description="Stop after this many consecutive steps with a NaN/inf loss or gradient norm (each is skipped).")

    @model_validator(mode="after")
    def _has_length(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        return self


class EvalConfig(Section):
    interval: int = Field(0, ge=0, description="Evaluate on the held-out split every N steps (0 = only at the start and end).")
    max_batches: Optional[int] = Field(None, ge=1, description="Evaluate on at most N micro-batches per rank (None = the whole split).")
    at_start: bool = Field(True, description="Evaluate before the first step, so curves start at step 0.")


class CheckpointConfig(Section):
    interval: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Keep the newest K checkpoints, delete older ones.")
    at_end: bool = Field(True, description="Save a checkpoint when training ends.")
    allow_recipe_change: bool = Field(False, description="Resume even though teacher, student, tokenizer, data or loss differ from the checkpoint's recipe.")


class OnPolicyConfig(Section):
    """On-policy distillation (GKD, Agarwal et al. 2024) and sequence-level KD (Kim & Rush 2016): on a fraction of the
    optimizer steps the prompts of the step's chat samples are completed on the engines and the loss runs on those
    completions."""

    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of optimizer steps that are on-policy (TRL's GKD `lmbda`); whether step s is, is decided from train.seed and s, the same on every rank. 1 = every step.")
    source: Literal["student", "teacher"] = Field("student", description="Who writes the completions: the student (on-policy, GKD) or the teacher (sequence-level KD).")
    max_new_tokens: int = Field(64, ge=1, description="Completion length limit; a row also stops at EOS (which is a loss token).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    gather: Literal["auto", "always", "never"] = Field("auto", description="ZeRO-3: gather the generating model's parameters once per rollout (always), layer by layer at every forward (never: a model that does not fit whole on one device), or always when it fits (auto).")
    long_prompts: Literal["truncate", "error"] = Field("truncate", description="A prompt longer than data.seq_len - max_new_tokens: keep its last tokens (counted as onpolicy/truncated_prompts) or stop with an error.")
    sample_interval: int = Field(50, ge=0, description="Every N optimizer steps, the first generated step writes rank 0's first sample_count prompt/completion pairs to samples.jsonl in the run directory and to TensorBoard as text; 0 = off.")
    sample_count: int = Field(2, ge=1, description="Prompt/completion pairs written per sample step (at most rank 0's rows of the step).")


class CompeteJudgeConfig(Section):
    name: str = Field("likelihood", description="likelihood: mean log-prob per token of each answer under the judge model (works at any scale); prompted: the judge model scores both answers 1-10 in both orders (Lion's referee); or a dotted path `pkg.module.Class`.")
    model: Optional[ModelSource] = Field(None, description="The judge model, a full replica on every rank; unset = the teacher. The likelihood judge needs the recipe's tokenizer.")
    threshold: float = Field(1.0, description="An instruction is hard when teacher score - student score >= threshold (in the judge's units: points on 1-10, or nats per token); must lie inside the judge's scale.")
    retries: int = Field(2, ge=0, description="prompted: re-asks for a reply whose closing score lines do not parse (then the pair is counted and left out).")
    temperature: float = Field(0.0, ge=0.0, description="prompted: sampling temperature of the first reply (0 = greedy).")
    retry_temperature: float = Field(0.7, gt=0.0, description="prompted: sampling temperature of the retries.")
    max_new_tokens: int = Field(256, ge=1, description="prompted: length limit of the judge's reply.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra settings a custom (dotted-path) judge reads from its section.")

    @model_validator(mode="after")
    def _threshold_in_scale(self):
        spans = {"prompted": 9.0, "likelihood": float("inf")}  # high - low of the built-in judges' scales
        if self.name in spans and not 0 < self.threshold <= spans[self.name]:
            bound = "> 0" + (f" and <= {spans[self.name]:g}" if spans[self.name] != float("inf") else "")
            raise ValueError(f"threshold {self.threshold} is outside the {self.name} judge's scale: a score gap "
                             f"teacher - student must be {bound}")
        return self


class CompeteAugmentConfig(Section):
    hard: int = Field(8, ge=0, description="New instructions asked for per round from hard seeds (same domain, task type, length, difficulty).")
    easy: int = Field(8, ge=0, description="New instructions asked for per round from easy seeds (same domain, rarer topic).")
    max_new_tokens: int = Field(64, ge=1, description="Length limit of a generated instruction; one cut off by it is dropped.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of the augmentor.")
    min_words: int = Field(3, ge=1, description="A candidate with fewer words is dropped (too_short).")
    restate_threshold: float = Field(0.8, gt=0.0, le=1.0, description="A candidate whose words are at least this fraction a subsequence of the augmentor's prompt is dropped (restates_prompt).")
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0, description="A candidate with ROUGE-L F above this against the pool or a kept candidate is dropped (near_duplicate; Lion: 0.7).")


class CompeteConfig(Section):
    """Competitive distillation (`kd compete RECIPE`, README "Competitive distillation"): data.train holds the seed
    instructions, data.eval the fixed held-out set that never enters the pool."""

    rounds: int = Field(ge=1, description="Rounds of imitation -> discrimination -> generation.")
    imitation_steps: int = Field(ge=1, description="Optimizer steps of student training on the pool per round (train.* sets the batch and optimizer).")
    min_pool: int = Field(4, ge=1, description="Fewest distinct seed instructions a run starts with.")
    max_seed_instructions: Optional[int] = Field(None, ge=1, description="Use only the first N distinct seed instructions of data.train.")
    judge_max: Optional[int] = Field(None, ge=1, description="Judge at most N pool instructions per round (a seeded sample); unset = the whole pool.")
    answer_max_new_tokens: int = Field(128, ge=1, description="Length limit of teacher and student answers.")
    answer_temperature: float = Field(0.0, ge=0.0, description="Sampling temperature of the answers (0 = greedy).")
    batch_size: int = Field(8, ge=1, description="Prompts per rollout on each rank.")
    chunk: int = Field(32, ge=1, description="Items (answers, judgements, candidates) between two saves of the round state: a killed run redoes at most this many.")
    teacher_steps: int = Field(0, ge=0, description="Teacher phase: optimizer steps per round training the teacher (cross-entropy) on the instructions where the student's answer scored higher, from the next round on the teacher that answers and judges; 0 = off (the teacher stays frozen).")
    teacher_lr: Optional[float] = Field(None, gt=0, description="Peak learning rate of the teacher phase (unset = train.lr).")
    judge: CompeteJudgeConfig = Field(default_factory=CompeteJudgeConfig, description="The assessor of the discrimination phase.")
    augment: CompeteAugmentConfig = Field(default_factory=CompeteAugmentConfig, description="The generation phase: new instructions from hard and easy seeds.")


class Recipe(Section):
    run: RunConfig = Field(description="Where the run writes and how it is launched.")
    teacher: TeacherConfig = Field(description="The frozen teacher and its inference-only DeepSpeed engine.")
    student: StudentConfig = Field(description="The trained student and its DeepSpeed training engine.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer directory; defaults to the teacher's `path`.")
    data: DataConfig = Field(description="Training and held-out data.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The distillation loss.")
    train: TrainConfig = Field(description="Optimizer, schedule, batch shape and length of training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="DeepSpeed checkpoints.")
    resume: Union[Literal["auto", "never"], str] = Field("auto", description="auto: continue from the newest checkpoint in the run directory if any; never: start fresh; or a checkpoint directory.")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="Extra DeepSpeed config merged into the student engine's config (advanced; e.g. communication settings).")
    on_policy: Optional[OnPolicyConfig] = Field(None, description="On-policy / sequence-level distillation on generated completions (needs data.kind: chat); unset = every step on the data as it is.")
    compete: Optional[CompeteConfig] = Field(None, description="Competitive distillation rounds, run by `kd compete RECIPE` (needs data.kind: chat and data.eval); unset = not a compete recipe.")

    @model_validator(mode="after")
    def _compete_data(self):
        if self.compete is not None:
            if self.data.kind != "chat":
                raise ValueError("compete needs instructions: set data.kind: chat (data.train holds the seed instructions)")
            if self.data.eval is None:
                raise ValueError("compete needs data.eval: a fixed held-out chat set that never enters the pool")
        return self

    @model_validator(mode="after")
    def _on_policy_fits(self):
        if self.on_policy is None:
            return self
        if self.teacher.store is not None:
            raise ValueError("on_policy scores generated completions with the teacher, which a teacher.store cannot "
                             "do (it holds the teacher's signal for the stored samples only); unset one of them")
        if self.data.kind != "chat":
            raise ValueError("on_policy needs prompts to complete: set data.kind: chat (text data has no prompts)")
        if self.on_policy.max_new_tokens >= self.data.seq_len:
            raise ValueError(f"on_policy.max_new_tokens ({self.on_policy.max_new_tokens}) leaves no room for a prompt "
                             f"inside data.seq_len ({self.data.seq_len}); lower it or raise data.seq_len")
        return self
