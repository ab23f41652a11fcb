"""Speed of semflow_jax on this machine, side by side with PyTorch, in one command.

  python benchmarks/run.py                         # everything; writes the two files below
  python benchmarks/run.py --only=default,sampler  # some sections (the JSON keeps the others)
  python benchmarks/run.py --rounds=3 --quick      # a smoke run: fewer rounds and steps

Writes `benchmarks/results.json` and the table between the `benchmarks/run.py` markers in
`benchmarks/RESULTS.md` (machine, versions, date, load average, the command):

- train_default: the default config's real train step (`semflow_jax.step.make_train_step`:
  SemFlow's loss on uint8 images and labels, gradient clipping, AdamW, state donated) against
  the same step written the way the official PyTorch code trains (`benchmarks/torch_twin.py`:
  the UNet's PyTorch twin, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`), same
  batch: examples/s, ratio, and FLOP utilisation = XLA's cost_analysis FLOPs of the compiled
  step / step time / the 2048^2 float32 matmul rate measured in the same run.
- train_sd: an SD-shaped UNet (block_out_channels (64, 128, 256, 256), 2 layers per block,
  cross-attention dim 256, 8 heads, 32x32x4 latents, batch 8, 77 context tokens), our
  `SDUNet` against diffusers' `UNet2DConditionModel` with the identical configuration; both
  steps are MSE on the flow target at z_t, backward, AdamW.
- sampler: latency of 1 and 25 Euler steps in both directions at batch 1 (default config): the
  jitted whole trajectory (`SemFlow.segment` / `synthesize` under one `jax.jit`, a
  `fori_loop`) against a host loop calling the jitted velocity once per step (how the official
  code samples).
- pipeline: the default config's input pipeline (`pipeline.TrainIterator`) in examples per
  CPU-second, next to what the train step consumes.

How it measures: each side of a comparison runs in its own worker process (no shared thread
pools or allocators), compiles and warms up, then the parent alternates timed rounds between
them, so both see the same machine load; a figure is the median over rounds of the per-step
time, the spread the min..max over rounds. Figures from a machine other jobs are using are
upper bounds on time; the load average is recorded with them.
"""

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN, END = "<!-- benchmarks/run.py: begin -->", "<!-- benchmarks/run.py: end -->"
TARGETS = {"train_speedup_vs_pytorch": 1.0, "train_speedup_vs_pytorch_default": 1.3,
           "sampler_speedup_vs_host_loop": 1.2}
SD_UNET = dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
               cross_attention_dim=256, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_BATCH, SD_LATENT, SD_TOKENS = 8, 32, 77


# --- workers: each runs in its own process, builds one step, then times rounds on request -----

def _serve(conn, step, info):
  """Answer ('run', k) with (wall seconds, CPU seconds) for k steps, until ('stop',)."""
  conn.send(("ready", info))
  while True:
    command = conn.recv()
    if command[0] == "stop":
      return
    k = command[1]
    wall, cpu = time.perf_counter(), time.process_time()
    step(k)
    conn.send((time.perf_counter() - wall, time.process_time() - cpu))


def _jax_step_worker(conn, kind, seed):
  """The JAX side: the compiled step, its FLOPs, and the matmul rate of this process."""
  from semflow_jax import runtime
  runtime.configure_process()  # first: its XLA:CPU flags must precede JAX's backend
  import jax
  import jax.numpy as jnp
  compile_start = time.perf_counter()
  if kind == "default":
    compiled, state, batch = _jax_default_step(seed)
  else:
    compiled, state, batch = _jax_sd_step(seed)
  compile_s = time.perf_counter() - compile_start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = {"state": state}

  def step(k):
    for _ in range(k):
      holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  step(2)  # warm-up: allocations, thread pools
  info = {"compile_s": compile_s, "flops": float(cost.get("flops", float("nan"))),
          "matmul_gflops": _matmul_gflops(jax, jnp)}
  _serve(conn, step, info)


def _matmul_gflops(jax, jnp, n=2048, repeats=5):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times) / 1e9


def _default_config():
  from configs import synthetic
  return synthetic.get_config()


def _default_batch(config, seed):
  rng = np.random.default_rng(seed)
  b, s = config.train.batch_size, config.data.image_size
  return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
          "label": rng.integers(0, config.data.num_classes, (b, s, s, 1), dtype=np.uint8)}


def _jax_default_step(seed):
  import jax
  from semflow_jax import parallel, state as state_lib, step as step_lib
  from semflow_jax.semflow import SemFlow
  config = _default_config()
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  batch = parallel.to_global(_default_batch(config, seed), mesh)
  step = jax.jit(step_lib.make_train_step(model, tx, config, mesh), donate_argnums=0)
  return step.lower(state, batch).compile(), state, batch


def _sd_inputs(seed):
  rng = np.random.default_rng(seed)
  shape = (SD_BATCH, SD_LATENT, SD_LATENT, 4)
  return {"z0": rng.normal(size=shape).astype(np.float32),
          "z1": rng.normal(size=shape).astype(np.float32),
          "t": rng.uniform(size=(SD_BATCH,)).astype(np.float32),
          "context": rng.normal(size=(SD_BATCH, SD_TOKENS, 256)).astype(np.float32)}


def _jax_sd_step(seed):
  import jax
  import jax.numpy as jnp
  import optax
  from semflow_jax.models.sd_unet import SDUNet, SDUNetConfig
  unet = SDUNet(SDUNetConfig(**SD_UNET))
  batch = {k: jnp.asarray(v) for k, v in _sd_inputs(seed).items()}
  params = jax.jit(unet.init)(jax.random.PRNGKey(seed), batch["z0"], batch["t"],
                              batch["context"])["params"]
  tx = optax.adamw(1e-4)

  def train_step(state, batch):
    params, opt_state = state

    def loss_fn(params):
      t = batch["t"][:, None, None, None]
      zt = (1 - t) * batch["z0"] + t * batch["z1"]
      v = unet.apply({"params": params}, zt, 1000 * batch["t"], batch["context"])
      return jnp.mean(jnp.square(v - (batch["z1"] - batch["z0"])))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  state = (params, tx.init(params))
  return jax.jit(train_step, donate_argnums=0).lower(state, batch).compile(), state, batch


def _torch_step_worker(conn, kind, seed):
  import torch
  torch.manual_seed(seed)
  if kind == "default":
    from benchmarks import torch_twin
    config = _default_config()
    trainer = torch_twin.TwinTrainer(torch_twin.from_config(config), config, seed)
    batch = {k: torch.from_numpy(v) for k, v in _default_batch(config, seed).items()}

    def one_step():
      return trainer.step(batch["image"], batch["label"])
  else:
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(sample_size=SD_LATENT, **SD_UNET).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    b = {k: torch.from_numpy(v) for k, v in _sd_inputs(seed).items()}
    z0, z1 = (b[k].permute(0, 3, 1, 2).contiguous() for k in ("z0", "z1"))
    t = b["t"][:, None, None, None]

    def one_step():
      optimizer.zero_grad(set_to_none=True)
      zt = (1 - t) * z0 + t * z1
      v = unet(zt, 1000 * b["t"], encoder_hidden_states=b["context"]).sample
      loss = torch.nn.functional.mse_loss(v, z1 - z0)
      loss.backward()
      optimizer.step()
      return loss.detach()

  def step(k):
    for _ in range(k):
      loss = one_step()
    float(loss)

  step(2)
  _serve(conn, step, {"threads": torch.get_num_threads()})


def _sampler_worker(conn, batch_size, rounds, step_counts, seed):
  """Whole jitted trajectory vs host loop, interleaved inside this one process."""
  from semflow_jax import runtime
  runtime.configure_process()
  import jax
  import jax.numpy as jnp
  from semflow_jax.semflow import SemFlow
  config = _default_config()
  model = SemFlow.from_config(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  s = config.data.image_size
  images = jnp.asarray(rng.integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, config.data.num_classes, (batch_size, s, s),
                                    dtype=np.uint8))
  key = jax.random.PRNGKey(seed + 1)
  velocity = jax.jit(model.velocity)
  encode_image, encode_labels = jax.jit(model.encode_image), jax.jit(model.encode_labels)
  to_labels = jax.jit(lambda p, z: model.decode_anchors(model.decode(p, z)))
  to_image = jax.jit(lambda p, z: jnp.clip(model.decode(p, z), -1.0, 1.0))
  whole_segment = jax.jit(model.segment, static_argnums=(2,))
  whole_synthesize = jax.jit(model.synthesize, static_argnums=(3,))

  def host_loop(z, t_start, t_end, steps):
    dt = (t_end - t_start) / steps
    for i in range(steps):  # the official sampler: one network call per step from Python
      z = z + dt * velocity(params, z, t_start + i * dt)
    return z

  cases = {}
  for steps in step_counts:
    cases[f"segment_{steps}"] = (
        lambda n=steps: whole_segment(params, images, n),
        lambda n=steps: to_labels(params, host_loop(encode_image(params, images), 0., 1., n)))
    cases[f"synthesize_{steps}"] = (
        lambda n=steps: whole_synthesize(params, labels, key, n),
        lambda n=steps: to_image(params, host_loop(encode_labels(params, labels, key), 1., 0.,
                                                   n)))
  results = {}
  for name, (whole, host) in cases.items():
    agree = np.asarray(whole()), np.asarray(host())  # compile both, and check they agree
    if agree[0].dtype == np.int32:
      agreement = float(np.mean(agree[0] == agree[1]))
    else:
      agreement = float(1 - np.abs(agree[0] - agree[1]).max())
    times = {"whole": [], "host_loop": []}
    for _ in range(rounds):
      for side, fn in (("whole", whole), ("host_loop", host)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[side].append(time.perf_counter() - start)
    ratios = np.array(times["host_loop"]) / np.array(times["whole"])
    results[name] = {"whole_ms": _stats(times["whole"], 1e3),
                     "host_loop_ms": _stats(times["host_loop"], 1e3),
                     "speedup": float(np.median(ratios)), "agreement": agreement}
  conn.send(("done", results))


def _pipeline_worker(conn, batches, seed, tfds_data_dir):
  """Examples per CPU-second of the default config's training input pipeline."""
  from semflow_jax.data import pipeline
  config = _default_config()
  config.data.tfds_data_dir = tfds_data_dir
  builder = pipeline.get_builder(config.data)  # generated once (about a minute) if absent
  it = pipeline.TrainIterator(builder, config.train.batch_size, seed, flip=config.data.flip,
                              preprocess=pipeline.Preprocess.from_config(config.data))
  per_epoch = builder.info.splits["train"].num_examples // config.train.batch_size
  for _ in range(per_epoch):  # warm-up: one epoch fills the cache of encoded examples
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  n = batches * config.train.batch_size
  conn.send(("done", {"examples_per_cpu_s": n / cpu, "examples_per_s_wall": n / wall,
                      "batches": batches, "batch_size": config.train.batch_size}))


# --- the parent: start workers, alternate rounds, write the results ---------------------------

def _start(target, *args):
  parent, child = mp.get_context("spawn").Pipe()
  process = mp.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
  process.start()
  return process, parent


def _receive(conn, process, what):
  while not conn.poll(5):
    if not process.is_alive():
      raise RuntimeError(f"{what} worker exited with status {process.exitcode}")
  return conn.recv()


def _stats(values, scale=1.0):
  v = np.asarray(values) * scale
  return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
          "n": len(v)}


def compare_train_steps(kind, rounds, steps_per_round, seed, log):
  """JAX and PyTorch train steps of one model, timed in alternating rounds."""
  workers = {"jax": _start(_jax_step_worker, kind, seed),
             "torch": _start(_torch_step_worker, kind, seed)}
  info = {}
  for side, (process, conn) in workers.items():
    _, info[side] = _receive(conn, process, f"{kind}/{side}")
    log(f"  {kind}: {side} ready {info[side]}")
  times = {side: [] for side in workers}
  cpu = {side: [] for side in workers}
  for r in range(rounds):
    for side, (process, conn) in workers.items():
      conn.send(("run", steps_per_round))
      wall, cpu_s = _receive(conn, process, f"{kind}/{side}")
      times[side].append(wall / steps_per_round)
      cpu[side].append(cpu_s / steps_per_round)
    log(f"  {kind} round {r + 1}/{rounds}: " + "  ".join(
        f"{side} {times[side][-1] * 1e3:.0f} ms" for side in workers))
  for process, conn in workers.values():
    conn.send(("stop",))
    process.join(60)
  batch = SD_BATCH if kind == "sd" else _default_config().train.batch_size
  result = {"batch_size": batch, "steps_per_round": steps_per_round}
  for side in workers:
    step_s = float(np.median(times[side]))
    result[side] = {"step_ms": _stats(times[side], 1e3), "cpu_ms": _stats(cpu[side], 1e3),
                    "examples_per_s": batch / step_s,
                    **{k: v for k, v in info[side].items() if k != "matmul_gflops"}}
  result["speedup"] = float(np.median(np.array(times["torch"]) / np.array(times["jax"])))
  jax_step_s = result["jax"]["step_ms"]["median"] / 1e3
  result["matmul_gflops"] = info["jax"]["matmul_gflops"]
  result["jax"]["gflops_per_s"] = result["jax"]["flops"] / jax_step_s / 1e9
  result["mfu"] = result["jax"]["gflops_per_s"] / info["jax"]["matmul_gflops"]
  return result


def run_once(target, what, *args):
  process, conn = _start(target, *args)
  _, result = _receive(conn, process, what)
  process.join(60)
  return result


def machine_info():
  import importlib.metadata as md
  cpu = "unknown"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"model name\s*:\s*(.*)", f.read())
      cpu = names[0] if names else cpu
  memory = None
  if os.path.exists("/proc/meminfo"):
    with open("/proc/meminfo") as f:
      memory = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1)) / 2**20
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "tensorflow-cpu",
                  "tensorflow"):
    try:
      versions[package] = md.version(package)
    except md.PackageNotFoundError:
      pass
  from semflow_jax import runtime
  runtime.configure_process()  # XLA_FLAGS as the workers have it
  return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),
          "memory_gib": round(memory, 1) if memory else None,
          "python": platform.python_version(), "versions": versions,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def headline(results):
  out = {}
  if "train_sd" in results:
    out["train_speedup_vs_pytorch"] = results["train_sd"]["speedup"]
    out["train_mfu_sd"] = results["train_sd"]["mfu"]
  if "train_default" in results:
    out["train_speedup_vs_pytorch_default"] = results["train_default"]["speedup"]
    out["train_mfu_default"] = results["train_default"]["mfu"]
  if "sampler" in results:
    ratios = [case["speedup"] for case in results["sampler"]["cases"].values()]
    out["sampler_speedup_vs_host_loop"] = float(np.exp(np.mean(np.log(ratios))))
  if "pipeline" in results and "train_default" in results:
    consumed = results["train_default"]["jax"]["examples_per_s"]
    out["pipeline_cores_needed_default"] = consumed / results["pipeline"]["examples_per_cpu_s"]
  return out


def markdown(results):
  m, h = results["machine"], results["headline"]
  v = m["versions"]
  lines = [
      f"Written by `{results['command']}` on {results['date']}: {m['cpu']}, {m['cores']} cores, "
      f"{m['memory_gib']} GiB; Python {m['python']}, JAX {v.get('jax')}, flax {v.get('flax')}, "
      f"PyTorch {v.get('torch')}, diffusers {v.get('diffusers')}; `XLA_FLAGS={m['xla_flags']}`. "
      f"Load average {results['load_average']['start']:.1f} at the start and "
      f"{results['load_average']['end']:.1f} at the end (on {m['cores']} cores: above that, "
      "other work shared the machine and the times are upper bounds). Medians over rounds "
      "after warm-up, min..max in brackets; ratios are medians of per-round ratios.", ""]
  lines += ["| measurement | semflow_jax | reference | ratio | target |",
            "| --- | --- | --- | --- | --- |"]

  def verdict(key, value):
    target = TARGETS.get(key)
    if target is None:
      return ""
    return f">= {target}: " + ("met" if value >= target else
                                f"**missed by {100 * (1 - value / target):.0f} %**")

  def span(s, fmt="{:.0f}"):
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}..{fmt.format(s['max'])})"

  for key, title, kind in (("train_default", "default config train step", "default"),
                           ("train_sd", "SD-shaped UNet train step", "sd")):
    if key not in results:
      continue
    r = results[key]
    ratio_key = "train_speedup_vs_pytorch" + ("_default" if kind == "default" else "")
    reference = "PyTorch twin" if kind == "default" else "diffusers UNet2DConditionModel"
    lines.append(
        f"| {title}, batch {r['batch_size']}: ms/step (examples/s) | "
        f"{span(r['jax']['step_ms'])} ({r['jax']['examples_per_s']:.1f}) | {reference}: "
        f"{span(r['torch']['step_ms'])} ({r['torch']['examples_per_s']:.1f}) | "
        f"{r['speedup']:.2f} (`{ratio_key}`) | {verdict(ratio_key, r['speedup'])} |")
    lines.append(
        f"| {title}: FLOP utilisation | {r['jax']['flops'] / 1e9:.1f} GFLOP/step (XLA cost "
        f"analysis), {r['jax']['gflops_per_s']:.1f} GFLOP/s = {100 * r['mfu']:.1f} % of "
        f"{r['matmul_gflops']:.0f} GFLOP/s (2048^2 float32 matmul, same run) | | | |")
  if "sampler" in results:
    s = results["sampler"]
    for name, case in s["cases"].items():
      direction, steps = name.rsplit("_", 1)
      lines.append(
          f"| {direction}, {steps} Euler step{'s' if steps != '1' else ''}, batch "
          f"{s['batch_size']}: ms | jitted trajectory {span(case['whole_ms'], '{:.1f}')} | "
          f"host loop {span(case['host_loop_ms'], '{:.1f}')} | {case['speedup']:.2f} | |")
    key = "sampler_speedup_vs_host_loop"
    lines.append(f"| sampler, geometric mean of the {len(s['cases'])} cases above | | | "
                 f"{h[key]:.2f} (`{key}`) | {verdict(key, h[key])} |")
  if "pipeline" in results:
    p = results["pipeline"]
    consumed = results.get("train_default", {}).get("jax", {}).get("examples_per_s")
    needed = (f"; the JAX train step consumes {consumed:.0f} examples/s = "
              f"{consumed / p['examples_per_cpu_s']:.3f} cores of input pipeline"
              if consumed else "")
    lines.append(f"| default input pipeline | {p['examples_per_cpu_s']:.0f} examples per "
                 f"CPU-second{needed} | | | |")
  return "\n".join(lines)


def write_results(results, json_path, md_path):
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write("\n")
  section = f"{BEGIN}\n{markdown(results)}\n{END}"
  text = open(md_path).read() if os.path.exists(md_path) else "# Measured results\n"
  if BEGIN in text and END in text:
    text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
  else:
    text = text.rstrip("\n") + ("\n\n## Speed: train step vs PyTorch, FLOP utilisation, sampler, "
                                "input pipeline (`benchmarks/run.py`)\n\n") + section + "\n"
  with open(md_path, "w") as f:
    f.write(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="default,sd,sampler,pipeline",
                      help="comma-separated sections: default, sd, sampler, pipeline")
  parser.add_argument("--rounds", type=int, default=7, help="timed rounds per comparison")
  parser.add_argument("--quick", action="store_true", help="one step per round (smoke run)")
  parser.add_argument("--json", default=os.path.join(HERE, "results.json"))
  parser.add_argument("--markdown", default=os.path.join(HERE, "RESULTS.md"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tfds_data_dir", default=None,
                      help="where the synthetic dataset is (generated there if absent); default: "
                           "the default config's (tfds' ~/tensorflow_datasets)")
  args = parser.parse_args()
  sections = args.only.split(",")
  unknown = set(sections) - {"default", "sd", "sampler", "pipeline"}
  if unknown:
    parser.error(f"--only: unknown sections {sorted(unknown)}")
  sys.path.insert(0, REPO)
  os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
  started = time.time()

  def log(message):
    print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

  results = {}
  if os.path.exists(args.json) and set(sections) != {"default", "sd", "sampler", "pipeline"}:
    with open(args.json) as f:
      results = json.load(f)  # keep the sections not re-measured
  results.update({"machine": machine_info(), "date": datetime.date.today().isoformat(),
                  "command": "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:]),
                  "load_average": {"start": os.getloadavg()[0]}})
  if "default" in sections:
    log("default config: JAX vs the PyTorch twin")
    results["train_default"] = compare_train_steps("default", args.rounds,
                                                   1 if args.quick else 5, args.seed, log)
  if "sd" in sections:
    log("SD-shaped UNet: JAX vs diffusers (compiling the JAX step takes a few minutes)")
    results["train_sd"] = compare_train_steps("sd", max(3, args.rounds - 2), 1, args.seed, log)
  if "sampler" in sections:
    log("sampler: jitted trajectory vs host loop, batch 1")
    results["sampler"] = {"batch_size": 1, "cases": run_once(
        _sampler_worker, "sampler", 1, 5 if args.quick else 3 * args.rounds, (1, 25),
        args.seed)}
  if "pipeline" in sections:
    log("input pipeline of the default config")
    results["pipeline"] = run_once(_pipeline_worker, "pipeline", 20 if args.quick else 100,
                                   args.seed, args.tfds_data_dir)
  results["load_average"]["end"] = os.getloadavg()[0]
  results["headline"] = headline(results)
  results.update(results["headline"])
  results["targets"] = TARGETS
  write_results(results, args.json, args.markdown)
  log(f"wrote {args.json} and {args.markdown}")
  for key, value in results["headline"].items():
    print(f"  {key}: {value:.3f}")


if __name__ == "__main__":
  main()
