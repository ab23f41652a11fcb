"""SemFlow in pixel space on the built-in synthetic scenes: the whole loop on a 2-core CPU.

  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

Override any key on the command line, e.g. `--config.train.num_steps=500`. The argument after a
colon picks a variant: `configs/synthetic.py:tiny` is a seconds-long run for tests and smoke
checks.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Compiled programs are kept here and reused by every later start (resume, eval, the file
  # CLI): a directory (local or gs://) or 'off'; None: <workdir>/compilation_cache.
  c.compilation_cache = config_dict.placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic_scenes"
  c.data.tfds_data_dir = config_dict.placeholder(str)  # None: tfds' default (~/tensorflow_datasets)
  c.data.image_size = 32
  c.data.num_classes = 7
  c.data.num_train = 5000
  c.data.num_validation = 500
  c.data.seed = 0
  c.data.flip = True
  # Cached VAE moments of the training images (python -m semflow_jax.data.encode writes them;
  # SD-VAE models only): a directory, local or gs://; None: the images are encoded every step.
  c.data.image_latents = config_dict.placeholder(str)

  c.model = ml_collections.ConfigDict()
  c.model.autoencoder = "identity"   # 'identity' (pixel space) or 'sd_vae' (see configs/sd15.py)
  c.model.unet = "small"             # 'small' (below) or 'sd' (diffusers UNet, configs/sd15.py)
  c.model.init_from = config_dict.placeholder(str)  # converted weights (semflow_jax.convert)
  c.model.dtype = "float32"          # compute dtype: 'float32' or 'bfloat16' (params stay fp32)
  c.model.remat = False              # recompute UNet blocks in the backward pass
  c.model.remat_policy = "full"      # with remat: 'full' or 'dots' (keep projection outputs)
  # SD attention kernel per layer: 'auto' (splash on TPU for long sequences, cuDNN/XLA fused on
  # GPU, einsum on CPU), 'einsum', 'dot_product' or 'splash' (see models/sd_layers.py).
  c.model.attention = "auto"
  # Anchor colours: 'paper' (Eq. 7: k = 6, s = 50) or 'spread' (the K anchors as far apart as
  # the colour cube allows; 7 classes -> 7 cube corners). See semflow_jax/anchors.py.
  c.model.palette = "spread"
  # Eq. 14 amplitude as a fraction of half the anchor spacing, in [0, 1) (the paper's
  # beta = 0.1 with its palette is 0.255).
  c.model.perturbation = 0.35
  # Components of that noise: 0 = every pixel (Eq. 14); g > 0 = a g x g grid, upsampled. Per-
  # pixel noise alone gives noisy syntheses with little diversity in their layout; the 1x1 and
  # 4x4 components vary colours and regions (benchmarks/RESULTS.md, "Default synthesis").
  c.model.perturbation_grids = (0, 1, 4)
  c.model.time_sampling = "uniform"  # 'uniform' (paper) or 'beta': Beta(time_beta, time_beta)
  c.model.time_beta = 0.5
  c.model.input_skip = False         # True: v = UNet + (2t - 1) z_t; see SemFlow.input_skip
  c.model.base_channels = 64
  c.model.channel_mult = (1, 1, 2)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = (8, 4)
  c.model.num_heads = 4
  c.model.groups = 16
  c.model.dropout = 0.0
  c.model.patch_size = 2

  c.train = ml_collections.ConfigDict()
  # Minutes of training on a CPU (the README gives the measured time); benchmarks/RESULTS.md has
  # the experiments behind these numbers (more, smaller updates beat larger batches here).
  c.train.num_steps = 3000
  c.train.batch_size = 16           # global
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 100
  c.train.schedule = "cosine"        # after warmup: 'cosine', 'linear' (to 0) or 'constant'
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.0           # 0 disables EMA
  c.train.grad_accum_steps = 1      # micro-batches per step (the global batch is unchanged)
  c.train.skip_nonfinite = False    # True: drop a non-finite update and count it; False: stop
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.eval_every = 0            # 0: only after the last step
  c.train.tensorboard = True        # False: no event files (sweeps, tests); the console still logs
  c.train.profile_steps = ()        # (first, last): jax.profiler trace of them in <workdir>/profile

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = -1          # -1: the whole validation split
  # One evaluator per metric (semflow_jax/evaluators/<name>.py): which run at every evaluation.
  c.eval.metrics = ("miou", "roundtrip", "diversity", "colour_only", "fid", "lpips",
                    "hf_energy", "diversity_down4")
  c.eval.batch_size = 100
  c.eval.seg_steps = (1, 25)         # segmentation mIoU at each of these step counts ...
  c.eval.seg_methods = ("euler",)    # ... with each of these samplers: euler, heun, rk4
  # Synthesis (round trip, diversity, FID, LPIPS): one RK4 step (4 network evaluations) meets
  # every target where 25 Euler steps do not (benchmarks/RESULTS.md, "Default synthesis").
  c.eval.synth_steps = 1
  c.eval.synth_method = "rk4"
  c.eval.colour_only = True          # the colour-only classifier's mIoU (the yardstick)
  c.eval.colour_fit_examples = 1000  # training images the colour-only classifier is fitted on
  # Converted FID / LPIPS networks (python -m semflow_jax.convert_eval_nets); None: skipped.
  c.eval.fid_weights = config_dict.placeholder(str)
  c.eval.lpips_weights = config_dict.placeholder(str)
  # FID statistics of the real validation split (.npz); None: eval/fid_reference.npz in the
  # workdir. Computed on first use, then read (a cache describing other data is refused).
  c.eval.fid_reference = config_dict.placeholder(str)
  c.eval.num_sample_images = 8       # rows in the sample grids

  c.sample = ml_collections.ConfigDict()
  c.sample.seg_steps = 25
  c.sample.synth_steps = 25
  c.sample.method = "euler"
  c.sample.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1                   # >1: params and optimiser state sharded over this axis
  c.mesh.fsdp_min_size = 2**14      # tensors with fewer elements stay replicated
  c.mesh.shard_params = True        # False: params whole on every device, optimiser state,
                                    # EMA and gradients sharded over fsdp (ZeRO)
  c.mesh.dcn_data = -1              # slices (data parallel across them); -1: all of them

  if arg == "tiny":
    c.data.image_size = 16
    c.data.num_train = 64
    c.data.num_validation = 16
    c.model.base_channels = 16
    c.model.channel_mult = (1, 2)
    c.model.attention_resolutions = (4,)
    c.model.groups = 8
    c.model.patch_size = 1
    c.train.num_steps = 6
    c.train.batch_size = 16
    c.train.warmup_steps = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.eval.batch_size = 8
    c.eval.seg_steps = (1, 2)
    c.eval.synth_steps = 2
    c.eval.synth_method = "euler"
    c.eval.colour_fit_examples = 32
    c.eval.num_sample_images = 4
    c.sample.seg_steps = 2
    c.sample.synth_steps = 2
  elif arg:
    raise ValueError(f"unknown configs/synthetic.py argument {arg!r}; expected '' or 'tiny'")
  return c
