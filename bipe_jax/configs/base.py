"""Base config: every key any experiment may set is declared here, with its default.

Experiment configs (`configs/*.py` in the repository, or any file passed as
`--config=PATH`) start from `get_config()` here and change values;
`bipe_jax.config.validate` rejects keys not declared here.
"""
import ml_collections

from bipe_jax import encodings


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # "stdlib" (this Python's standard library source, test dirs excluded) or a
  # comma-separated list of files / globs of .txt, .jsonl(.gz) or .array_record.
  c.data.source = "stdlib"
  c.data.format = "auto"          # auto | text | jsonl | arrayrecord
  c.data.text_field = "text"      # jsonl / ArrayRecord (json records) field
  c.data.heldout_fraction = 0.05  # deterministic document-level held-out split
  c.data.max_documents = 0        # 0 = all
  c.data.seq_len = 1024           # training window length (tokens)
  # windows: concatenate documents (BOS between) and cut windows, positions
  #   and attention run across documents (the release's way).
  # documents: pack whole documents into rows; positions restart and
  #   attention is masked at every document start.
  c.data.packing = "windows"
  c.data.cache_dir = ""           # tokenized-corpus cache; "" = <workdir>/data

  # data.source = "arithmetic": expressions modulo a prime with chains of
  # thought (bipe_jax/tasks/arithmetic.py).
  c.arithmetic = ml_collections.ConfigDict()
  c.arithmetic.modulus = 7          # a prime; numbers are 0 .. modulus-1
  c.arithmetic.train_max_ops = 4    # training expressions have 1 .. this many operators
  c.arithmetic.test_max_ops = 8     # accuracy is reported for 1 .. this many
  c.arithmetic.train_examples = 20_000
  c.arithmetic.test_examples = 100  # per number of operators (fewer where fewer exist)
  c.arithmetic.test_fraction = 0.1  # expressions whose hash falls below this are test-only
  c.arithmetic.seed = 0             # data seed (fixed across model seeds and kinds)

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.model = ""          # path to a SentencePiece .model; "" = train one
  c.tokenizer.vocab_size = 4096   # when training
  c.tokenizer.sample_bytes = 4_000_000  # corpus sample the tokenizer trains on

  c.segmentation = ml_collections.ConfigDict()
  c.segmentation.modality = "code"  # text | code | cot: which pieces end a segment
  c.segmentation.separator_ids = ()  # explicit ids override (release: (13, 869))
  c.segmentation.cot_delimiter = ";"  # step delimiter for modality "cot"
  # pe.levels = K: K-1 comma-separated id lists, finest first, ";" between
  # ("869;13": sentences in lines); an id listed for level c ends a unit of
  # level c and of every finer one. "" = by modality, a blank line ending a
  # level-2 unit (README "More than two levels").
  c.segmentation.level_separator_ids = ""

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.n_kv_heads = 12
  c.model.d_ff = 3072
  c.model.norm_eps = 1e-5
  c.model.init_std = 0.02
  c.model.dtype = "float32"        # activation / compute dtype
  c.model.param_dtype = "float32"

  c.pe = ml_collections.ConfigDict()
  c.pe.kind = encodings.DEFAULT_KIND  # see bipe_jax.encodings.KINDS
  # Every kind's parameters (max_intra, intra, levels, max_level_ids, rope_base,
  # alibi_multiplier, xpos_scale_base, max_random_position, fire_*,
  # release_padding_row, and the rope_scaling.* section): their defaults,
  # meaning and checks live in the typed parameter classes next to each kind's
  # code in bipe_jax/encodings/ (RopeParams in rope.py, RopeScaling in
  # rope_scaling.py, ...).
  for key, default in encodings.PE_DEFAULTS.items():
    c.pe[key] = encodings.params.to_config(default)

  c.attention = ml_collections.ConfigDict()
  c.attention.impl = "auto"       # auto | reference | dense | chunked | pallas | cudnn (see bipe_jax/attention)
  c.attention.block_q = 0         # query / key tile of the blockwise kernels (chunked, pallas);
  c.attention.block_k = 0         # 0 = the kernel's default (chunked and pallas TPU 512x512, pallas GPU 64x64);
                                  # block_q is also dense's query row block (default 256)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256
  c.train.steps = 100_000
  c.train.lr = 1e-4
  c.train.warmup_steps = 10_000
  c.train.schedule = "polynomial"  # polynomial | cosine
  c.train.end_lr_factor = 0.0      # final lr = lr * end_lr_factor
  c.train.poly_power = 1.0
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.clip_norm = 1.0
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  # A NaN/Inf loss, gradient or update: "stop" the run (naming the step and the
  # last good checkpoint) or "skip" the update and count it.
  c.train.on_nonfinite = "stop"
  # Micro-batches per step (a scan): train.batch_size is the global batch and
  # batch_size / grad_accum_steps rows go through the model at once.
  c.train.grad_accum_steps = 1
  # Recompute each block's activations in the backward pass to save memory:
  # none | full (save nothing) | dots (keep matmul outputs) | dots_no_batch
  # (keep only weight-stationary matmuls, the usual choice on TPU).
  c.train.remat = "none"
  # A work dir whose latest checkpoint's parameters start this run (fresh
  # optimizer, step 0; see bipe_jax/warm_start.py); "" = random init.
  c.train.init_from = ""

  # Device mesh (bipe_jax/sharding.py). Axes, outermost first: data (replicas),
  # fsdp (params and optimizer state sharded), tensor (heads / mlp / vocab
  # split). "AXIS=SIZE,..."; -1 takes the remaining devices; unnamed axes are
  # 1 and data takes the rest ("fsdp=8" on 16 devices is data=2,fsdp=8).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = "data=-1,fsdp=1,tensor=1"
  # Across TPU slices (multi-slice over DCN), same syntax; the mesh is
  # shape x dcn_shape. "" = slices along data.
  c.mesh.dcn_shape = ""
  # Logical axis name -> mesh axes, by priority: a mesh axis already taken by
  # an earlier rule is skipped, so activations [batch, length, embed] put
  # batch on data+fsdp and leave embed whole, while parameters [embed, mlp]
  # put embed on fsdp and mlp on tensor.
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("embed", "fsdp"),
      ("head_dim", None),
      ("positions", None),
      ("length", None),
  )

  c.eval = ml_collections.ConfigDict()
  c.eval.lengths = (1024, 2048, 3072, 4096, 5120, 6144, 8192)
  c.eval.max_tokens = 262_144      # held-out tokens per length (0 = all)
  c.eval.batch_tokens = 16_384     # tokens per forward pass
  return c
