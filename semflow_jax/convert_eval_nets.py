"""The FID and LPIPS networks' PyTorch weights -> converted checkpoints that evaluation reads.

Download once (these are the files the published numbers are computed with):
- FID: pytorch-fid's InceptionV3,
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
- LPIPS trunk: torchvision's AlexNet, https://download.pytorch.org/models/alexnet-owt-7be5be79.pth
- LPIPS v0.1 heads: `lpips/weights/v0.1/alex.pth` inside the lpips package
    (`pip download --no-deps lpips==0.1.4` and unzip the wheel, or `pip install --no-deps lpips`)

then

  python -m semflow_jax.convert_eval_nets --inception=pt_inception-2015-12-05-6726825d.pth \\
      --lpips_alex=alexnet-owt-7be5be79.pth --lpips_heads=alex.pth --output=gs://bucket/eval_nets

and point evaluation at the result:

  --config.eval.fid_weights=gs://bucket/eval_nets --config.eval.lpips_weights=gs://bucket/eval_nets

The output directory holds `inception/` and/or `lpips/`, each an Orbax checkpoint of the Linen
parameters (`params/`) and `conversion.json` (source files and their SHA-256). The two networks
can be converted together or separately, into one directory or two.

Conversion is the one used for Stable Diffusion (semflow_jax/convert.py): keys renamed
mechanically (`Mixed_6e.branch7x7dbl_3.conv.weight` -> `Mixed_6e/branch7x7dbl_3/conv/kernel`,
`features.3.weight` -> `alexnet/features_3/kernel`, `lin2.model.1.weight` ->
`lin2/model_1/kernel`), kernels transposed to HWIO, every shape checked against
`jax.eval_shape` of the Linen module, and a missing, unexpected or mis-shaped key refused by name
before anything is written. The keys the networks do not use are dropped by rule, never
silently: Inception's 1008-way classifier `fc.*` and BatchNorm's `num_batches_tracked`;
AlexNet's `classifier.*`.
"""

import hashlib
from typing import Dict, Optional

import numpy as np
from absl import app, flags, logging

from semflow_jax import checkpoint, cli, storage
from semflow_jax.checkpoint import ConversionError
from semflow_jax.models import inception as inception_lib
from semflow_jax.models import lpips as lpips_lib
from semflow_jax.weights import INCEPTION, LPIPS, convert_state_dict, read_state_dict

# The published file's SHA-256 begins with the hash in its name (the torch.hub convention).
INCEPTION_SHA256_PREFIX = "6726825d"


# -- state dicts -> params (pure) ------------------------------------------------------------------
def _drop(state_dict: Dict[str, np.ndarray], unused) -> Dict[str, np.ndarray]:
  return {k: v for k, v in state_dict.items() if not unused(k)}


def inception_params(state_dict: Dict[str, np.ndarray], source: str = "inception state dict"):
  """pytorch-fid's FID InceptionV3 state dict -> `inception.InceptionV3` params."""
  state_dict = _drop(state_dict, lambda k: k.startswith("fc.") or
                     k.endswith(".num_batches_tracked"))
  return convert_state_dict(state_dict, inception_lib.abstract_params(), source)


def lpips_params(trunk: Dict[str, np.ndarray], heads: Dict[str, np.ndarray],
                 trunk_source: str = "AlexNet state dict",
                 heads_source: str = "LPIPS heads state dict"):
  """torchvision's AlexNet state dict + lpips' v0.1 heads -> `lpips.LPIPS` params."""
  abstract = lpips_lib.abstract_params()
  trunk = _drop(trunk, lambda k: k.startswith("classifier."))
  params = {"alexnet": convert_state_dict(trunk, abstract["alexnet"], trunk_source)}
  head_abstract = {k: v for k, v in abstract.items() if k != "alexnet"}
  params.update(convert_state_dict(heads, head_abstract, heads_source))
  negative = [f"lin{i}" for i in range(len(lpips_lib.CHANNELS))
              if np.any(params[f"lin{i}"]["model_1"]["kernel"] < 0)]
  if negative:  # lpips clamps the heads to >= 0 in training; a negative one is not v0.1
    logging.warning("%s: heads %s have negative weights; these are not lpips' v0.1 heads",
                    heads_source, negative)
  return params


# -- files -----------------------------------------------------------------------------------------
def _read(path: str, flag: str):
  """(state dict, SHA-256) of a weights file (local or gs://; fetched once)."""
  if not storage.exists(path):
    raise ConversionError(f"--{flag}={path}: no such file")
  with storage.local_copy(path) as local:
    digest = hashlib.sha256()
    with open(local, "rb") as f:
      for block in iter(lambda: f.read(16 << 20), b""):
        digest.update(block)
    return read_state_dict(local), digest.hexdigest()


def _save(output: str, net: str, params, sources: dict) -> str:
  target = storage.join(output, net)
  checkpoint.save_converted(target, params, {}, {"network": net, **sources})
  logging.info("wrote %s", target)
  return target


def convert(output: str, inception: Optional[str] = None, lpips_alex: Optional[str] = None,
            lpips_heads: Optional[str] = None, overwrite: bool = False) -> str:
  """Convert the given networks into `output`/inception and/or `output`/lpips; returns output.

  Every input is read and checked before anything is written, so a bad file leaves `output`
  as it was; each network's previous conversion stays in use until its new one is complete
  (checkpoint.save_converted).
  """
  output = storage.resolve(output)
  if inception is None and lpips_alex is None and lpips_heads is None:
    raise ConversionError("nothing to convert: give --inception and/or --lpips_alex with "
                          "--lpips_heads")
  if (lpips_alex is None) != (lpips_heads is None):
    raise ConversionError("LPIPS needs both --lpips_alex (the AlexNet trunk) and --lpips_heads "
                          "(lpips' weights/v0.1/alex.pth)")
  nets = ([INCEPTION] if inception else []) + ([LPIPS] if lpips_alex else [])
  for net in nets:
    if storage.exists(storage.join(output, net)) and not overwrite:
      raise ConversionError(f"{storage.join(output, net)} already exists (pass --overwrite to "
                            "replace it)")

  converted = {}
  if inception:
    logging.info("converting the FID InceptionV3 from %s", inception)
    state_dict, digest = _read(inception, "inception")
    params = inception_params(state_dict, inception)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
      logging.warning("%s is not pytorch-fid's pt_inception-2015-12-05-6726825d.pth (SHA-256 "
                      "%s...): FID computed with it is not comparable to published FIDs",
                      inception, digest[:8])
    converted[INCEPTION] = (params, {"inception": inception, "inception_sha256": digest})
  if lpips_alex:
    logging.info("converting LPIPS from %s and %s", lpips_alex, lpips_heads)
    (trunk, trunk_digest), (heads, heads_digest) = (_read(lpips_alex, "lpips_alex"),
                                                    _read(lpips_heads, "lpips_heads"))
    params = lpips_params(trunk, heads, lpips_alex, lpips_heads)
    converted[LPIPS] = (params, {"lpips_alex": lpips_alex, "lpips_alex_sha256": trunk_digest,
                                 "lpips_heads": lpips_heads,
                                 "lpips_heads_sha256": heads_digest})
  for net, (params, sources) in converted.items():
    # The previous conversion of `net` stays in use until the new one is complete.
    _save(output, net, params, sources)
  return output


# -- command line ----------------------------------------------------------------------------------
def _define_flags():
  """Defined only when run as a program (tests import this module for its functions, and
  `--output` is taken by semflow_jax.main)."""
  flags.DEFINE_string("inception", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
  flags.DEFINE_string("lpips_alex", None, "torchvision's AlexNet state dict "
                      "(alexnet-owt-7be5be79.pth), the LPIPS trunk.")
  flags.DEFINE_string("lpips_heads", None, "lpips' v0.1 linear heads "
                      "(lpips/weights/v0.1/alex.pth).")
  cli.define_output_flags("Directory to write (local or gs://); config.eval.fid_weights and "
                          "config.eval.lpips_weights point here.",
                          "Replace networks already converted in --output.")


def main(argv):
  del argv
  cli.run_converter(convert, ("inception", "lpips_alex", "lpips_heads"))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
