"""semflow_jax: SemFlow (semantic segmentation and synthesis as one rectified flow) in JAX/Flax.

Direct dependencies are pinned to the versions tested together. The locks pin whole
environments: requirements.lock what training, evaluation, sampling and the studio need (the
main job, TPU VMs), requirements-test.lock that plus the references the tests compare against
and the checkers (CI), requirements-tpu.lock the TPU compiler. Installed from a lock, the
project itself goes in with `pip install --no-deps -e .`; the extras below are for installs
without a lock (pip resolves their dependencies).
"""

from setuptools import find_packages, setup

setup(
    name="semflow_jax",
    version="0.1.0",
    description="SemFlow in JAX/Flax: segmentation and image synthesis with one rectified flow",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # configs/ is read by path (--config=configs/x.py), never installed as a package.
    packages=find_packages(include=["semflow_jax", "semflow_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorflow-cpu==2.21.0",
        "tensorflow-datasets==4.9.10",
        "importlib_resources==7.1.0",  # tfds 4.9.10 imports it without declaring it
        "tensorboard==2.21.0",         # clu's summary writer imports it
        "clu==0.0.12",
        "ml_collections==1.1.0",
        "numpy==2.4.6",
        "pillow==12.3.0",       # gradio 6.31 (the studio extra) needs pillow<13
        "etils==1.15.0",        # epath: every file read and written, local or gs://
        "google-auth==2.63.0",  # the gs:// credentials check before a run starts
    ],
    extras_require={
        # Reading PyTorch weights and computing the empty-prompt CLIP embedding at conversion
        # (semflow_jax.convert, convert_eval_nets), and writing a diffusers folder
        # (semflow_jax.export). torch==2.13.0 is the CPU build where pip's index offers it
        # (the tests' environment); never add torchvision (it breaks diffusers).
        "convert": ["torch==2.13.0", "safetensors==0.8.0", "transformers==5.23.0",
                    "diffusers==0.42.1"],
        # The TPU compiler, for TPU VMs and for planning TPU memory on a CPU (semflow_jax.plan).
        "tpu": ["libtpu==0.0.42.1"],
        # The studio's web page (python -m semflow_jax.studio); nothing else imports Gradio.
        "studio": ["gradio==6.31.0"],
    },
)
