"""The one base config every configs/*.py derives from: every field of every mode, each with one comment.

One name per concept across modes: the model to start from is always `model_path`, its dtype
`model.param_dtype`, the declared k grid `eval.k_values`, rows of packed tokens `data.seq_len`.
`arg` strings of the config files are `key=value` items separated by `;` (e.g.
`configs/olmoe.py:k_values=2,4,8;steps=500`), applied by `apply_arg`.

Method defaults say where they come from: "(paper)" follows MoE-PHDS (arXiv 2509.23012); "(our choice)"
is ours, since the paper's hyperparameters are not public.
"""


import ml_collections


def base_config(arg=None):
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | prepare | builtin | eval | sweep | convert | serve (phds_jax/cli/modes.py)
  c.seed = 0  # parameter init (random models), the train-state RNG, random sweep inputs
  c.model_path = ""  # HF or orbax model directory to start from (convert: the source)
  c.tokenizer_path = ""  # directory with the tokenizer; "" uses model_path
  c.workdir = ""  # default output directory (--workdir wins)
  c.compile_topology = ""  # train: only plan, for this TPU slice (v5e-16, v4-32, v5p-32, v6e-8, ...): compile, print
  #                          per-device memory, FLOPs and a roofline, exit 1 when it does not fit (phds_jax/plan/programs.py)
  c.compile_num_slices = 1  # slices of compile_topology joined over DCN (the mesh's "slice" axis)
  c.compile_cache = "auto"  # JAX's persistent compilation cache: a directory, "auto" ($PHDS_CACHE/xla, or
  #                            JAX_COMPILATION_CACHE_DIR when set) or "" (off); a re-run skips compiling
  c.verbose = False  # show library logs (orbax, absl, transformers) and Python tracebacks of user errors

  c.model = ml_collections.ConfigDict()
  c.model.random_init = False  # True: start from random weights of `model.preset` instead of model_path
  c.model.preset = "tiny-olmoe"  # phds_jax.PRESETS name: the shapes of a random model
  c.model.overrides = model_override_fields()  # ModelConfig fields replacing the preset's (None: keep)
  c.model.param_dtype = "float32"  # parameter dtype (training: float32 master weights; convert: "" keeps)
  c.model.expert_backend = "auto"  # how routed experts run: auto | chunked | sorted | ragged | reference
  c.model.expert_dispatch = "all_to_all"  # with mesh.expert > 1: all_to_all (tokens only to their experts'
  #                                        devices) | all_gather (the expert group's tokens on every member)
  c.model.scan_layers = True  # one lax.scan per run of equal layers (compile time flat in depth); False: unrolled.
  #                             Training and its plans; evaluation and serving always scan (the same function)

  c.data = ml_collections.ConfigDict()
  c.data.format = "sft"  # sft: records {prompt, response} or {messages} (loss on responses); text: LM {text} / .txt
  c.data.train_files = ""  # comma-separated sources, each a glob pattern of JSONL / parquet files or saved
  #                         `datasets` directories, or hf:NAME[:SPLIT] from the Hugging Face datasets cache
  c.data.val_files = ""  # comma-separated sources; "" splits val_fraction off the training data
  c.data.prepared = ""  # a prepared dataset (configs/prepare.py writes it; train/eval read it instead of files)
  c.data.mixture = ""  # comma-separated weights, one per data.train_files source: rows drawn from each in
  #                       these proportions ("": sources concatenated, each in proportion to its size)
  c.data.workers = 0  # prepare: tokenizing processes (0 = one per core)
  c.data.val_fraction = 0.05  # held-out share of training examples when val_files is empty
  c.data.seq_len = 1024  # positions per packed row
  c.data.max_loss_tokens = 0  # >0: at most this many trained tokens per row; logits only for them
  c.data.on_error = "skip"  # skip (counted, first ones logged with file:line) | raise
  c.data.seed = 0  # validation split and per-epoch shuffling

  c.phds = ml_collections.ConfigDict()
  c.phds.enabled = True  # False: train at k_pre only (plain SFT / pre-training)
  c.phds.k_values = "4,5,6,7,8"  # the k_train set sampled each step (paper, OLMoE); one value: a fixed-k oracle
  c.phds.k_weights = ""  # sampling weights for k_values ("" = uniform; our choice)
  c.phds.mask = "soft"  # soft: route at k_pre, ranks >= k_train weighted eps (paper); hard: compute at k
  c.phds.soft_mask_eps = 1e-6  # weight of masked experts under the soft mask (paper)
  c.phds.k_mode = "traced"  # traced: one compiled step for every k; static: one compile per distinct k
  c.phds.per_layer = False  # draw one k per MoE layer (Matryoshka-style) instead of one global k (paper: global)
  c.phds.k_per_microbatch = False  # each gradient-accumulation micro-batch draws its own k (needs k_mode=traced;
  #                                  off: one draw per optimizer step, our choice)
  c.phds.anchor = True  # curriculum anchoring on the lowest k at the end of training (paper)
  c.phds.anchor_start_frac = 0.8  # anchoring starts at this fraction of train.steps (our choice)
  c.phds.anchor_ramp_frac = 0.1  # ... and reaches the anchor k this fraction of steps later (our choice)
  c.phds.anchor_shape = "linear"  # linear | cosine | step (our choice)
  c.phds.anchor_k = 0  # 0: the lowest of k_values (paper)
  c.phds.select_k = 0  # the k whose validation loss selects the checkpoint; 0: k_pre (paper), or the one k of
  #                      a fixed-k run (phds.k_values=K: an oracle is selected at its own k)
  c.phds.select_after_anchor = False  # select only among evaluations after anchoring began (our choice: off)
  c.phds.export_k = 0  # num_experts_per_tok written to hf_export; 0: the model's k_pre (an oracle may want K)
  c.phds.seed = 0  # k draws are seeded by (seed, step): identical after a restart

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer steps (the lr and k schedules span them; our choice)
  c.train.stop_at = 0  # >0: stop after this step (checkpointed), e.g. to fit a time slot; resume later
  c.train.on_nan = "stop"  # a non-finite loss or gradient: stop naming the step, or skip the update (our choice)
  c.train.batch_size = 32  # packed rows per step, all hosts together (our choice)
  c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
  c.train.compute_dtype = "bfloat16"  # forward/backward dtype; router softmax stays float32
  c.train.remat = "none"  # what each layer keeps for the backward pass: none | dots (matmul outputs) | full
  c.train.trainable = "all"  # comma-separated subsets (all, attention, experts, router, shared_expert,
  #                            embeddings, norms) and/or re:<regex>; the rest is frozen, without optimizer state
  c.train.objective = "nll"  # phds_jax.losses.OBJECTIVES name: token NLL + router losses
  c.train.lb_coef = -1.0  # load-balance loss coefficient; < 0: the model's own router_aux_loss_coef
  #                         (OLMoE 0.01, Qwen 0.001; our choice to keep what it was trained with)
  c.train.z_coef = 0.0  # router z-loss coefficient (our choice)

  c.optim = ml_collections.ConfigDict()
  # AdamW with warmup and decay; every value below is our choice
  c.optim.lr = 1e-5  # peak learning rate
  c.optim.warmup_steps = 50  # linear warmup
  c.optim.decay = "cosine"  # cosine | linear | constant after warmup
  c.optim.end_lr_frac = 0.1  # final lr as a fraction of the peak
  c.optim.b1 = 0.9  # AdamW first-moment decay
  c.optim.b2 = 0.95  # AdamW second-moment decay
  c.optim.eps = 1e-8  # AdamW epsilon
  c.optim.weight_decay = 0.0  # decoupled, on matrices only
  c.optim.grad_clip = 1.0  # global-norm clipping (0 = off)

  c.eval = ml_collections.ConfigDict()
  c.eval.k_values = "1,2,4,8"  # declared k grid (training validation adds k_pre); each in [1, num_experts]
  c.eval.batch_size = 8  # rows (or scored sequences) per eval batch
  c.eval.every = 100  # training: validation every N steps (and at the end; our choice)
  c.eval.at_start = True  # training: evaluate before the first step (the starting model's losses)
  c.eval.reference_k = 0  # eval/sweep: agreement is measured against this k; 0 = k_pre
  c.eval.label = ""  # eval: name of model_path in tables and plots ("" = "model")
  c.eval.compare = ""  # eval: more checkpoints, "label=path,label2=path2"
  c.eval.agreement_with = ""  # eval: a label; multiple-choice agreement of every checkpoint is measured against
  #                             that checkpoint's predictions at reference_k ("" = each against itself)
  c.eval.tasks = ""  # eval: OLMo suite tasks, comma-separated task:variant (e.g. arc_easy:rc_0shot)
  c.eval.task_files = ""  # eval: user multiple-choice JSONL files, comma-separated
  c.eval.limit = 0  # eval: items per task (0 = all)
  c.eval.text_files = ""  # eval: LM text (.txt or JSONL {"text"}) for perplexity and next-token agreement
  c.eval.sft_files = ""  # eval: SFT JSONL, perplexity on response tokens only
  c.eval.max_rows = 0  # packed rows scored (0 = all): eval's text rows (with data.prepared, its validation
  #                      rows); train: the validation rows of every evaluation (the first ones)
  c.eval.truncate = True  # eval: drop context from the left when an item exceeds max positions (False: error)
  c.eval.roe = ""  # eval: Roster-of-Experts settings "members:tau,..." (e.g. 4:0.5,8:1.0), each one more curve
  c.eval.roe_seed = 0  # eval: the seed of the RoE routings
  c.eval.latency = ml_collections.ConfigDict()
  c.eval.latency.enabled = True  # eval: measure prefill and decode speed per k
  c.eval.latency.batch_size = 1  # sequences per timed call
  c.eval.latency.prompt_len = 128  # prefill tokens
  c.eval.latency.decode_tokens = 16  # decoded tokens per timed call
  c.eval.latency.repeats = 3  # timed calls (median reported); sweep: timed forwards per k

  c.convert = ml_collections.ConfigDict()
  c.convert.dst = ""  # convert: output directory (must not exist unless overwrite)
  c.convert.to = ""  # convert: "hf", "orbax", or "" for the other format than model_path's
  c.convert.overwrite = False  # convert: replace dst (atomically: the old one goes only at the end)
  c.convert.allow_pickle = False  # convert: accept pytorch_model.bin pickles (torch.load weights_only=True)
  c.convert.max_shard_size_gb = 5.0  # convert: safetensors shard size when writing HF

  c.serve = ml_collections.ConfigDict()  # serve mode (phds_jax/serve/, docs/serving.md; phds-serve flags mirror it)
  c.serve.host = "127.0.0.1"  # serve: the address to bind (loopback unless told otherwise)
  c.serve.port = 8000  # serve: the HTTP port
  c.serve.api_key = ""  # serve: required as "Authorization: Bearer KEY" on every route but /health ("" = $PHDS_API_KEY)
  c.serve.model_name = ""  # serve: the model id in /v1/models and responses ("" = model_path's directory name)
  c.serve.slots = 8  # serve: decode slots (requests decoded together by one step)
  c.serve.roe_slots = 2  # serve: decode slots of the Roster-of-Experts engine (requests with roe.members > 1)
  c.serve.roe_members = 4  # serve: the most RoE members a request may ask (0 or 1: no ensemble engine)
  c.serve.max_len = 1024  # serve: KV-cache positions per slot: prompt + max_tokens (at most max_position_embeddings)
  c.serve.max_tokens = 512  # serve: the largest max_tokens a request may ask
  c.serve.k_max = 0  # serve: the largest k a request may ask (0 = num_experts)
  c.serve.buckets = ""  # serve: prompt-length buckets, comma-separated ("" = 16, 64, 256, ... max_len)
  c.serve.widths = ""  # serve: expert widths with a compiled decode step ("" = 1, 2, 4, ... k_max)
  c.serve.rows = ""  # serve: row buckets of the decode step: it runs the slots up to the highest busy one,
  #                    rounded up to one ("" = 1, slots/4 and slots)
  c.serve.max_waiting = 64  # serve: waiting-queue bound; a request beyond it gets 429 with Retry-After
  c.serve.max_body_bytes = 1 << 20  # serve: the largest request body
  c.serve.drain_seconds = 30.0  # serve: SIGTERM lets in-flight requests finish this long, then ends them
  c.serve.timing_steps = 5  # serve: timed decode steps per width at start-up (latency_budget_ms picks k from them)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200  # save every N steps (and at the end)
  c.checkpoint.keep = 2  # latest checkpoints kept for resuming (the best by val loss at k_pre is kept apart)
  c.checkpoint.async_save = True  # write in the background while training continues

  c.distributed = ml_collections.ConfigDict()  # one process per host / GPU node (phds_jax/cli/distributed.py)
  c.distributed.enabled = False  # start JAX's multi-process runtime before anything else
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = detected (TPU VM, SLURM)
  c.distributed.num_processes = 0  # 0 = detected
  c.distributed.process_id = -1  # -1 = detected
  c.distributed.local_device_ids = ""  # this process's devices, e.g. "0,1"; "" = all it sees
  c.distributed.cpu_collectives = "gloo"  # CPU processes: gloo | mpi

  # device mesh within a slice (-1: the rest); on several slices a "slice" axis (DCN) adds data parallelism
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  # logical axis -> comma-separated mesh axes (slice, data, fsdp, expert, tensor; "" replicates)
  c.axis_rules = ml_collections.ConfigDict(_default_rules())
  c.log_every = 10  # train metrics every N steps
  c.export_hf = True  # export the selected (best) checkpoint to workdir/hf_export at the end
  apply_arg(c, arg)
  return c


def serve_fields() -> ml_collections.ConfigDict:
  """The serve block (docs/serving.md); `phds-serve` has one flag per field."""
  return base_config().serve


def model_override_fields() -> ml_collections.ConfigDict:
  """One typed placeholder per ModelConfig field (None), so every field can be set from the command line
  (`--config.model.overrides.num_hidden_layers=2`)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import typing  # pylint: disable=g-import-not-at-top

  from phds_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top

  hints = typing.get_type_hints(ModelConfig)
  fields = {}
  for field in dataclasses.fields(ModelConfig):
    hint = hints[field.name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = typing.get_origin(kinds[0]) or kinds[0]  # Optional[int | tuple] -> int; tuple[int, ...] -> tuple
    fields[field.name] = ml_collections.config_dict.placeholder(kind)
  return ml_collections.ConfigDict(fields)


def _default_rules() -> dict[str, str]:
  from phds_jax.model.axes import DEFAULT_RULES  # pylint: disable=g-import-not-at-top

  return {name: ",".join(axes) for name, axes in DEFAULT_RULES.items()}


def serve_config(arg=None):
  """configs/serve.py and `phds-serve`: the serve mode; model_path defaults to the built-in default's PHDS
  export (workdir/tiny/phds/hf_export, where configs/tiny.py run from this directory leaves it)."""
  import os  # pylint: disable=g-import-not-at-top

  c = base_config()
  c.mode = "serve"
  export = os.path.join("workdir", "tiny", "phds", "hf_export")
  c.model_path = export if os.path.isdir(export) else ""
  c.workdir = "workdir/serve"  # the server writes nothing there
  return apply_arg(c, arg)


def paper_scale(config):
  """Our defaults for fine-tuning a released 7B-14B MoE on one accelerator host (the paper's
  hyperparameters are not public; these are our choice)."""
  config.data.seq_len = 2048
  config.train.steps = 2000
  config.train.batch_size = 64
  config.optim.lr = 1e-5
  config.mesh.data = 1
  config.mesh.fsdp = -1  # shard parameters and optimizer state over every device
  return config


def apply_arg(config, arg):
  """Applies `key=value;key2=value2` (keys may be dotted; bare keys are searched in the blocks)."""
  if not arg:
    return config
  for item in (i.strip() for i in arg.split(";") if i.strip()):
    if "=" not in item:
      raise ValueError(f"config arg item {item!r} is not key=value")
    key, value = item.split("=", 1)
    node, name = _locate(config, key.strip())
    current = node[name]
    node[name] = type(current)(value) if not isinstance(current, bool) else value.lower() in ("1", "true", "yes")
  return config


def set_fields(config, changes):
  """Sets fields named as in `arg` (dotted, or a bare name found in one block) to the given values, e.g.
  {"train.steps": 5, "phds.mask": "hard"}; returns the config."""
  for key, value in changes.items():
    node, name = _locate(config, key)
    node[name] = value
  return config


# Short names for `arg` items that would otherwise be ambiguous.
ALIASES = {"k_values": "phds.k_values", "eval_k_values": "eval.k_values", "steps": "train.steps",
           "lr": "optim.lr", "seed": "seed"}


def _locate(config, key):
  key = ALIASES.get(key, key)
  if "." in key:
    *parents, name = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    return node, name
  if key in config:
    return config, key
  hits = [block for block in config.values() if isinstance(block, ml_collections.ConfigDict) and key in block]
  if len(hits) != 1:
    raise ValueError(f"config arg key {key!r} matches {len(hits)} fields; use its dotted name")
  return hits[0], key
